r"""Left-to-right language modelling on the passage corpus (`text`): continue a passage from its first part.

As the original, the text is cut into the pieces of `re.split(r"(\S+)", text)` (white space and words alternating,
2w + 1 pieces for w words) and split at a point drawn uniformly from `split_bounds` (about half of the words with the
default ratios of 0.5); the left part is the query, the right part the target, re-drawn each time the passage is read.
Texts for which the bounds allow a split that leaves no word to generate are skipped (with the default ratios: texts
of one word); the original produced empty targets for them.

Also home of `CorpusTask`, what the three tasks that train on the retrieval corpus itself (lm, mlm, section) share:
rows are passages (`{"id", "title", "section", "text", ...}`), empty or short texts are skipped
(`--min_words_per_lm_instance`), the instance's own passage is dropped from its retrieved passages (`filter_by_id`),
and generations are scored by exact match, token F1 and ROUGE.
"""

import random
import re

from src import metrics
from src.errors import UserError
from src.tasks.base import Example
from src.tasks.base import Task as BaseTask

_PIECES = re.compile(r"(\S+)")


class CorpusTask(BaseTask):
    """A task whose rows are passages of the corpus; subclasses build the query and target from the text."""

    metrics = ("eval_loss", "accuracy", "f1", "rouge_1", "rouge_2", "rouge_L")
    filter_by_id = True  # the row is a passage of the index: retrieving it would give the answer away

    def __init__(self, min_words_per_lm_instance: int | None = None, **_options) -> None:
        self.min_words = min_words_per_lm_instance

    def passage_id(self, raw: dict, where: str) -> str:
        """The row's `id` as a string (retrieval compares it with the passages' ids to drop the row's own)."""
        if "id" not in raw:
            raise UserError(f"{where}: task '{self.name}' needs the field 'id' (to keep the passage out of retrieval)")
        if not isinstance(raw["id"], (str, int)) or isinstance(raw["id"], bool):
            raise UserError(f"{where}: field 'id' of task '{self.name}' must be a string or an integer")
        return str(raw["id"])

    def usable_text(self, raw: dict, where: str) -> str | None:
        """The row's `text`, or None when it is empty or has fewer words than --min_words_per_lm_instance."""
        text = self.require(raw, "text", where)
        if not text.strip() or (self.min_words is not None and len(text.split()) < self.min_words):
            return None
        return text

    def evaluate(self, prediction: str, answers: list[str]) -> dict[str, float]:
        """Raw exact match (`accuracy`), SQuAD token F1 and ROUGE-1/2/L F-measures (rouge-score), best over answers.

        The original's F1 for these tasks compared raw white-space tokens (no lower-casing or punctuation removal).
        """
        return {
            "accuracy": float(prediction in answers),
            "f1": metrics.f1(prediction, answers),
            **metrics.rouge(prediction, answers),
        }


def gold(text: str) -> str:
    """A target as the evaluation loop can see it generated: the loop strips generations and T5's tokenizer
    collapses white space, so a perfect generation of "  a\\nb" reads "a b" (the original compared raw targets)."""
    return " ".join(text.split())


def split_bounds(n_pieces: int, min_ratio: float, max_ratio: float) -> tuple[int, int]:
    """The original's range of split points (inclusive) over the n pieces of `re.split(r"(\\S+)", text)`.

    The pieces alternate white space and words (2w + 1 of them for w words), so a split point k leaves k // 2
    words on the left; with the default ratios (0.5) that is about half of the words.
    """
    low = int(max(2, n_pieces * min_ratio))
    high = int(max(min(n_pieces - 2, n_pieces * max_ratio), low + 1))
    return low, high


class Task(CorpusTask):
    name = "lm"

    def __init__(
        self,
        min_words_per_lm_instance: int | None = None,
        min_lm_context_ratio: float = 0.5,
        max_lm_context_ratio: float = 0.5,
        **_options,
    ) -> None:
        super().__init__(min_words_per_lm_instance)
        self.min_ratio, self.max_ratio = min_lm_context_ratio, max_lm_context_ratio

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        text = self.usable_text(raw, where)
        passage_id = self.passage_id(raw, where)
        if text is None:
            return None
        pieces = _PIECES.split(text)
        low, high = split_bounds(len(pieces), self.min_ratio, self.max_ratio)
        if high > len(pieces) - 2:  # a split there could leave no word to generate (the original allowed it)
            return None
        k = rng.randint(low, high)  # a new split each time the passage is read (each epoch)
        query, target = "".join(pieces[:k]), "".join(pieces[k:])
        return Example(query, target, [gold(target)], self.file_passages(raw, where), {"id": passage_id})
