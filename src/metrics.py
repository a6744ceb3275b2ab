"""Answer metrics: exact match and token F1 with SQuAD normalisation, and ROUGE (each the best over the answers)."""

import functools
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


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer, tokenizers  # imported on first use: only the corpus tasks use ROUGE

    # The default tokenizer, given explicitly so that rouge-score does not log "Using default tokenizer."
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizers.DefaultTokenizer())


def rouge(prediction: str, answers: list[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures in [0, 1] (`rouge_1`, `rouge_2`, `rouge_L`), each the best over the
    non-empty answers; all 0 for an empty prediction or no non-empty answer (as the original).

    Computed with Google's `rouge-score` package (no stemming). The original used the `rouge` package, whose
    tokenisation differs: rouge-score lower-cases and keeps only runs of [a-z0-9] (text in other scripts scores 0),
    so values are close to the original's on English text but not identical.
    """
    answers = [answer for answer in answers if answer]
    if not prediction or not answers:
        return {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_L": 0.0}
    scores = [_rouge_scorer().score(answer, prediction) for answer in answers]
    return {
        "rouge_1": max(s["rouge1"].fmeasure for s in scores),
        "rouge_2": max(s["rouge2"].fmeasure for s in scores),
        "rouge_L": max(s["rougeL"].fmeasure for s in scores),
    }
