"""FEVER fact verification: a `claim` and its `label` (SUPPORTS / REFUTES / NOT ENOUGH INFO) read as true/false/maybe.

The files are FEVER's own jsonl (`preprocessing/prepare_fever.py`): `{"id", "claim", "label", ...}`; other fields are
kept as metadata. The query is `question: {claim} answer: <extra_id_0>` (qa's default prompt, fixed as in the
original) and the target `<extra_id_0> {true|false|maybe}`. Scored by raw exact match (`accuracy`), without
`eval_loss`, as the original. Unlike the original, a row's `passages` are kept for `--use_file_passages`.
"""

import random

from src.errors import UserError
from src.tasks.base import Example
from src.tasks.base import Task as BaseTask

LABELS = {"SUPPORTS": "true", "REFUTES": "false", "NOT ENOUGH INFO": "maybe"}
PROMPT = "question: {claim} answer: <extra_id_0>"


class Task(BaseTask):
    name = "fever"
    metrics = ("accuracy",)

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        claim = self.require(raw, "claim", where)
        label = self.require(raw, "label", where)
        if label not in LABELS:
            raise UserError(f"{where}: field 'label' of task 'fever' must be one of {', '.join(LABELS)}; got {label!r}")
        answer = LABELS[label]
        metadata = self.metadata(raw, where, ("claim", "passages"))
        return Example(
            PROMPT.format(claim=claim), f"<extra_id_0> {answer}", [answer], self.file_passages(raw, where), metadata
        )

    def evaluate(self, prediction: str, answers: list[str]) -> dict[str, float]:
        return {"accuracy": float(prediction.strip() in answers)}
