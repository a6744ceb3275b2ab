"""Answer metrics with SQuAD normalisation: exact match and token F1 (best over the reference answers)."""

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, squeeze white space (SQuAD v1.1 evaluation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(answer) for answer in answers))


def _token_f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: list[str]) -> float:
    """Best token-level F1 of the prediction against any answer."""
    return max((_token_f1(prediction, answer) for answer in answers), default=0.0)


def answer_in_text(answers: list[str], text: str) -> bool:
    """Whether any normalised answer occurs in the normalised text (the open-domain recall criterion)."""
    normalized = f" {normalize_answer(text)} "
    return any(f" {normalize_answer(answer)} " in normalized for answer in answers if normalize_answer(answer))
