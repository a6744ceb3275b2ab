"""The base task: `query` and `target` strings given in the data, scored by exact string match.

A task turns a raw jsonl object into an `Example` (`process`), may expand it into several (`expand`: answer-order
permutations for multiple choice), scores one generation (`evaluate`), and may compute metrics that need every row
of an evaluation at once (`postprocess`: multiple-choice de-biasing).
"""

import random
from dataclasses import dataclass, field

from src.errors import UserError


@dataclass
class Example:
    """One processed instance: what the model reads (`query`), learns to write (`target`) and is scored on."""

    query: str
    target: str
    answers: list[str]
    passages: list[dict] | None = None  # given in the file (`--use_file_passages`), else retrieved
    metadata: dict = field(default_factory=dict)
    # Multiple choice: each option's target ("<extra_id_0> A", ...); see src/batching.py choice_tokens.
    choices: tuple[str, ...] | None = None


class Task:
    """Turns raw jsonl objects into `Example`s and scores generations. Subclass it to add a task."""

    name = "base"
    metrics: tuple[str, ...] = ("accuracy", "eval_loss")
    # Tasks whose training data is the retrieval corpus itself drop the instance's own passage from its results.
    filter_by_id = False

    def __init__(self, **_options) -> None:
        pass

    def require(self, raw: dict, key: str, where: str, kind: type = str):
        """The value of `raw[key]`, or a UserError naming the file:line, the task and the field."""
        if key not in raw:
            raise UserError(f"{where}: task '{self.name}' needs the field '{key}'")
        if not isinstance(raw[key], kind):
            raise UserError(f"{where}: field '{key}' of task '{self.name}' must be a {kind.__name__}")
        return raw[key]

    def file_passages(self, raw: dict, where: str) -> list[dict] | None:
        """The instance's own `passages` list, checked, when it has one."""
        passages = raw.get("passages")
        if passages is None:
            return None
        if not isinstance(passages, list) or not all(isinstance(p, dict) for p in passages):
            raise UserError(f"{where}: field 'passages' must be a list of objects")
        return [{"title": p.get("title", ""), "text": p.get("text", ""), **p} for p in passages]

    def metadata(self, raw: dict, where: str, drop: tuple[str, ...]) -> dict:
        """The fields kept with the example (written back with results), `gold_ids` checked."""
        gold = raw.get("gold_ids")
        if gold is not None and not (isinstance(gold, list) and all(isinstance(g, (str, int)) for g in gold)):
            raise UserError(f"{where}: field 'gold_ids' must be a list of passage ids, got {type(gold).__name__}")
        metadata = {k: v for k, v in raw.items() if k not in drop}
        if gold is not None:
            metadata["gold_ids"] = [str(g) for g in gold]
        return metadata

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        """Build an Example from one jsonl object (None drops it). `where` is "file:line" for error messages."""
        query = self.require(raw, "query", where)
        target = self.require(raw, "target", where)
        metadata = self.metadata(raw, where, ("query", "target", "passages"))
        return Example(query, target, [target], self.file_passages(raw, where), metadata)

    def expand(self, example: Example, train: bool, rng: random.Random) -> list[Example]:
        """The examples one instance is read as (several for answer-order permutations); by default itself."""
        return [example]

    def evaluate(self, prediction: str, answers: list[str]) -> dict[str, float]:
        """Per-example scores in [0, 1]; the evaluation loop averages them and reports percentages."""
        return {"accuracy": float(prediction in answers)}

    def postprocess(self, rows: list[dict]) -> tuple[list[dict], dict[str, list[float]]]:
        """After a file's evaluation on one rank: the rows to write and per-example scores needing every row.

        `rows` are this rank's result rows in order (all expansions of an instance are on the same rank). Returns
        the rows to write and, per metric, one score in [0, 1] per counted example. By default: no change.
        """
        return rows, {}
