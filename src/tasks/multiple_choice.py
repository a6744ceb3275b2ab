"""Multiple-choice question answering (MMLU): `question`, `options` {"A": ..., "B": ..., ...} and the `answer` letter.

Rows: `{"question", "options": {"A".."D"}, "answer": "B", ...}` (`preprocessing/prepare_mmlu.py`); `options` must have
exactly the first `--multiple_choice_num_options` letters as keys, with string values. Other fields (`dataset`, ...)
are kept as metadata, and a row's `passages` are kept for `--use_file_passages` (the original replaced them with one
empty passage).

The query is `question: {question} options: (A) {a} (B) {b} ... answer: <extra_id_0>` and the target
`<extra_id_0> {letter}`; `Example.choices` are the targets of every letter, so the evaluation reads each letter's
logit at the answer position. (This is the original code's prompt; its README's "answers: ... Answer:" was not.) A
prompt of more than 356 reader tokens (counted with the end-of-sequence token, as the original) keeps only the tail of
the question that fits. Unlike the original, which re-decoded the kept tokens (and so lost characters the tokenizer
maps to <unk>), the kept tail is the question's own text from the first kept token's character offset. When the
options alone exceed the limit the question is left out (the original's slice then kept all but its first tokens, an
accident of negative indexing). Without a reader tokenizer (`--retrieve_only` runs, where the reader never reads the
prompt) the prompt is not truncated: the retriever cuts its own input at its maximum length.

`expand` turns each question into answer-order permutations (`--multiple_choice_train_permutations` in training,
`--multiple_choice_eval_permutations` in evaluation): `single` is the original order, `cyclic` the N rotations, `all`
the N! orderings, the original order first (as the original's). Each permutation's metadata has its `options` and
`answer` re-mapped, `is_original` (true for the original order only), `uid` (question + " ".join(option texts),
shared by the permutations of a question) and `permutation` (the original letter of the option at each letter).

Metrics, the original's list (`["debiased_accuracy", "accuracy", "eval_loss"]`, ATLAS_REFERENCE §7):
- `accuracy`: the generated text (stripped) equals the answer letter, averaged over every evaluated row, so each
  permutation of a question counts once (the original scored every permutation row too);
- `debiased_accuracy`: one value per question (`postprocess`): for each permutation, the softmax over its letters'
  logits gives a probability to each option; an option's probabilities are averaged over the permutations, and the
  option with the highest mean is the prediction. With `single` it is the argmax of the letter logits;
- `eval_loss`: the reader's loss, per batch.

`--write_results` writes one row per question: the row of its original order, with `generation` replaced by the
de-biased letter (as the original), `choice_probs` {original letter: mean probability}, `all_probs` {original
letter: [its probability in each permutation]}, and `permutations`, the result rows of every permutation (each with
its own `query`, `generation`, `choice_logits` aligned with the letters, and `metadata`; without `passages`, which the
original repeated in every permutation row). Only these original-order rows are written. Unlike the original,
options are mapped back by position rather than by text, so questions with two identical option texts are scored
right, and `is_original` marks the identity order only (the original compared texts, so such a question had several
"original" rows); two identical questions in one file stay two questions (the original merged them by uid).
"""

import itertools
import math
import random
import string

from src.errors import UserError
from src.tasks.base import Example
from src.tasks.base import Task as BaseTask

PROMPT = "question: {question} options: {options} answer: <extra_id_0>"
MAX_PROMPT_TOKENS = 356  # the original's limit, leaving room for a passage in a 512-token reader input
PERMUTATIONS = ("single", "cyclic", "all")


def orderings(n: int, kind: str) -> list[tuple[int, ...]]:
    """Answer orders as tuples of original option indices, the original order first (the original's order)."""
    identity = tuple(range(n))
    if kind == "single":
        return [identity]
    if kind == "cyclic":
        return [identity[n - i :] + identity[: n - i] for i in range(n)]
    if kind == "all":
        return list(itertools.permutations(identity))
    raise ValueError(f"unknown permutation kind {kind!r}; expected one of {PERMUTATIONS}")


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


class Task(BaseTask):
    name = "multiple_choice"
    metrics = ("debiased_accuracy", "accuracy", "eval_loss")

    def __init__(
        self,
        multiple_choice_num_options: int = 4,
        multiple_choice_train_permutations: str = "single",
        multiple_choice_eval_permutations: str = "single",
        tokenizer=None,
        **_options,
    ) -> None:
        if not 1 <= multiple_choice_num_options <= len(string.ascii_uppercase):
            n = multiple_choice_num_options
            raise UserError(f"--multiple_choice_num_options must be between 1 and 26, got {n}")
        for flag, kind in (("train", multiple_choice_train_permutations), ("eval", multiple_choice_eval_permutations)):
            if kind not in PERMUTATIONS:
                raise UserError(f"--multiple_choice_{flag}_permutations must be one of {', '.join(PERMUTATIONS)}")
        self.letters = tuple(string.ascii_uppercase[:multiple_choice_num_options])
        self.choices = tuple(f"<extra_id_0> {letter}" for letter in self.letters)
        self.train_permutations = multiple_choice_train_permutations
        self.eval_permutations = multiple_choice_eval_permutations
        self.tokenizer = tokenizer

    # --- prompts -----------------------------------------------------------------------------------------------

    def _n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def prompt(self, question: str, texts: list[str]) -> str:
        """The query for one answer order: the question's tail is kept when the prompt exceeds MAX_PROMPT_TOKENS."""
        options = " ".join(f"({letter}) {text}" for letter, text in zip(self.letters, texts)).strip()
        question = question.strip()
        prompt = PROMPT.format(question=question, options=options)
        if self.tokenizer is None or self._n_tokens(prompt) <= MAX_PROMPT_TOKENS:
            return prompt
        budget = MAX_PROMPT_TOKENS - self._n_tokens(PROMPT.format(question="", options=options))
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(question, add_special_tokens=False, return_offsets_mapping=fast)
        budget = min(budget, len(enc.input_ids))
        # Re-tokenising the joined prompt can differ from the parts' token counts: shrink until it fits.
        while budget > 0:
            if fast:  # the question's own text from the first kept token on
                kept = question[enc.offset_mapping[-budget][0] :].strip()
            else:  # no offsets: decode the kept tokens, as the original
                kept = self.tokenizer.decode(enc.input_ids[-budget:], skip_special_tokens=True).strip()
            prompt = PROMPT.format(question=kept, options=options)
            if self._n_tokens(prompt) <= MAX_PROMPT_TOKENS:
                return prompt
            budget -= 1
        return PROMPT.format(question="", options=options)  # the options alone exceed the limit

    # --- data ----------------------------------------------------------------------------------------------------

    def _options(self, raw: dict, where: str) -> list[str]:
        options = self.require(raw, "options", where, dict)
        if sorted(options) != list(self.letters):
            raise UserError(
                f"{where}: field 'options' of task 'multiple_choice' must have the keys {', '.join(self.letters)} "
                f"(--multiple_choice_num_options {len(self.letters)}); got {', '.join(map(str, options)) or 'none'}"
            )
        for letter in self.letters:
            if not isinstance(options[letter], str):
                raise UserError(f"{where}: field 'options' of task 'multiple_choice': option {letter} must be a string")
        return [options[letter] for letter in self.letters]

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        question = self.require(raw, "question", where)
        texts = self._options(raw, where)
        answer = self.require(raw, "answer", where)
        if answer not in self.letters:
            raise UserError(
                f"{where}: field 'answer' of task 'multiple_choice' must be one of {', '.join(self.letters)}; "
                f"got {answer!r}"
            )
        metadata = self.metadata(raw, where, ("passages",))
        metadata.update(
            options=dict(zip(self.letters, texts)),
            is_original=True,
            uid=question + " ".join(texts),
            permutation=list(self.letters),
        )
        passages = self.file_passages(raw, where)
        return Example(
            self.prompt(question, texts), f"<extra_id_0> {answer}", [answer], passages, metadata, self.choices
        )

    def expand(self, example: Example, train: bool, rng: random.Random) -> list[Example]:
        """The question in every answer order the flags ask for, the original order first."""
        kind = self.train_permutations if train else self.eval_permutations
        original = example.metadata
        texts = [original["options"][letter] for letter in self.letters]
        answer_index = self.letters.index(original["answer"])
        examples = []
        for order in orderings(len(self.letters), kind):
            is_original = order == tuple(range(len(order)))
            letter = self.letters[order.index(answer_index)]
            permuted = [texts[i] for i in order]
            metadata = {
                **original,
                "options": dict(zip(self.letters, permuted)),
                "answer": letter,
                "is_original": is_original,
                "permutation": [self.letters[i] for i in order],
            }
            query = example.query if is_original else self.prompt(original["question"], permuted)
            target = f"<extra_id_0> {letter}"
            examples.append(Example(query, target, [letter], example.passages, metadata, self.choices))
        return examples

    # --- scoring -------------------------------------------------------------------------------------------------

    def evaluate(self, prediction: str, answers: list[str]) -> dict[str, float]:
        return {"accuracy": float(prediction.strip() in answers)}

    def postprocess(self, rows: list[dict]) -> tuple[list[dict], dict[str, list[float]]]:
        """De-biasing over answer orders: one row per question (its original order's) and its `debiased_accuracy`."""
        written, debiased = [], []
        for group in self._questions(rows):
            row = self._debias(group)
            written.append(row)
            debiased.append(float(row["generation"] == row["metadata"]["answer"]))
        return written, {"debiased_accuracy": debiased}

    def _questions(self, rows: list[dict]) -> list[list[dict]]:
        """The rows of each question: a question starts at its original-order row (`expand` puts it first) and
        takes the rows of the same uid that follow (two identical questions in a file stay two questions)."""
        groups: list[list[dict]] = []
        latest: dict[str, list[dict]] = {}
        for row in rows:
            meta = row["metadata"]
            if meta["is_original"] or meta["uid"] not in latest:
                latest[meta["uid"]] = []
                groups.append(latest[meta["uid"]])
            latest[meta["uid"]].append(row)
        return groups

    def _debias(self, group: list[dict]) -> dict:
        """The original order's row with the de-biased prediction and the probabilities it comes from."""
        all_probs: dict[str, list[float]] = {letter: [] for letter in self.letters}
        for row in group:
            if "choice_logits" not in row:
                raise RuntimeError("multiple_choice rows need 'choice_logits' (the letters' logits) to be de-biased")
            probs = softmax(row["choice_logits"])
            for p, original_letter in zip(probs, row["metadata"]["permutation"]):
                all_probs[original_letter].append(p)
        choice_probs = {letter: sum(ps) / len(ps) for letter, ps in all_probs.items()}
        original = next((row for row in group if row["metadata"]["is_original"]), group[0])
        out = {k: v for k, v in original.items() if k != "choice_logits"}
        out["generation"] = max(self.letters, key=lambda letter: choice_probs[letter])  # ties: the first letter
        out["choice_probs"] = choice_probs
        out["all_probs"] = all_probs
        out["permutations"] = [{k: v for k, v in row.items() if k != "passages"} for row in group]
        return out
