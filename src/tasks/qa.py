"""Open-domain question answering (NaturalQuestions, TriviaQA, TempLAMA): `question` + `answers`."""

import random

from src import metrics
from src.errors import UserError
from src.tasks.base import Example
from src.tasks.base import Task as BaseTask


class Task(BaseTask):
    name = "qa"
    metrics = ("exact_match", "f1", "eval_loss")

    def __init__(self, qa_prompt_format: str = "question: {question} answer: <extra_id_0>", **_options) -> None:
        self.prompt_format = qa_prompt_format

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        question = self.require(raw, "question", where)
        answers = raw.get("answers")
        if answers is None and "target" not in raw:
            raise UserError(f"{where}: task 'qa' needs the field 'answers' (or 'target')")
        if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            raise UserError(f"{where}: field 'answers' of task 'qa' must be a list of strings")
        if "target" in raw:
            target = self.require(raw, "target", where)
        elif answers:
            target = rng.choice(answers)  # re-drawn each time the example is read, so each epoch may differ
        else:
            raise UserError(f"{where}: field 'answers' of task 'qa' is empty and there is no 'target'")
        answers = answers or [target]
        metadata = self.metadata(raw, where, ("question", "passages"))
        query = self.prompt_format.format(question=question)
        return Example(query, f"<extra_id_0> {target}", answers, self.file_passages(raw, where), metadata)

    def evaluate(self, prediction: str, answers: list[str]) -> dict[str, float]:
        return {"exact_match": metrics.exact_match(prediction, answers), "f1": metrics.f1(prediction, answers)}
