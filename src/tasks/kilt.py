"""KILT tasks in the KILT jsonl format: `{"id", "input", "output": [{"answer": ..., "provenance": [...]}, ...]}`.

The query is `question: {input} answer: <extra_id_0>` (fixed, as the original). The answers are the distinct
non-empty `output[].answer` strings, stripped, in file order; the target is `<extra_id_0> {answer}` with an answer
drawn at random each time the row is read (each epoch). For KILT's FEVER files the labels become words: when the
data file's name (the path part of `where`, "path:line", without its directories) contains "fever" (any case), or the
row has a `filename` field that does (the original's test), SUPPORTS reads "true" and any other label "false".

A row without any non-empty answer (KILT's hidden test sets) cannot be trained on or scored: it is skipped (the
original crashed on it), with one warning per task naming the first such row. Scored by raw exact match
(`accuracy`), SQuAD-normalised `exact_match` and `f1`, without `eval_loss`, as the original. Unlike the original, a
row's `passages` are kept for `--use_file_passages`.
"""

import logging
import os
import random

from src import metrics
from src.errors import UserError
from src.tasks.base import Example
from src.tasks.base import Task as BaseTask

logger = logging.getLogger(__name__)

PROMPT = "question: {input} answer: <extra_id_0>"


def is_fever(raw: dict, where: str) -> bool:
    """Whether the row comes from a FEVER file: its data file's name, or its `filename` field, contains "fever"."""
    path = where.rsplit(":", 1)[0]  # `where` is "path:line"; a path may itself contain ':'
    filename = raw.get("filename")
    names = [os.path.basename(path)] + ([filename] if isinstance(filename, str) else [])
    return any("fever" in name.lower() for name in names)


class Task(BaseTask):
    name = "kilt"
    metrics = ("accuracy", "exact_match", "f1")

    def __init__(self, **_options) -> None:
        self._warned_unanswered = False

    def answers(self, raw: dict, where: str) -> list[str]:
        """The distinct non-empty `output[].answer` strings (stripped), in order."""
        output = self.require(raw, "output", where, list)
        answers: list[str] = []
        for k, item in enumerate(output):
            if not isinstance(item, dict):
                raise UserError(f"{where}: field 'output' of task 'kilt' must be a list of objects (item {k})")
            answer = item.get("answer")
            if answer is None:  # provenance-only items carry no answer
                continue
            if not isinstance(answer, str):
                raise UserError(f"{where}: field 'output[{k}].answer' of task 'kilt' must be a string")
            answer = answer.strip()
            if answer and answer not in answers:
                answers.append(answer)
        if is_fever(raw, where):
            labels = ["true" if a == "SUPPORTS" else "false" for a in answers]
            answers = list(dict.fromkeys(labels))
        return answers

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        query = PROMPT.format(input=self.require(raw, "input", where))
        answers = self.answers(raw, where)
        if not answers:
            if not self._warned_unanswered:
                logger.warning("%s: no non-empty answer in 'output'; task 'kilt' skips such rows", where)
                self._warned_unanswered = True
            return None
        target = rng.choice(answers)  # re-drawn each time the row is read, so each epoch may differ
        metadata = self.metadata(raw, where, ("input", "passages"))
        return Example(query, f"<extra_id_0> {target}", answers, self.file_passages(raw, where), metadata)

    def evaluate(self, prediction: str, answers: list[str]) -> dict[str, float]:
        return {
            "accuracy": float(prediction.strip() in answers),
            "exact_match": metrics.exact_match(prediction, answers),
            "f1": metrics.f1(prediction, answers),
        }
