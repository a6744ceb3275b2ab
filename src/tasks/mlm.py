"""Masked language modelling on the passage corpus (`text`): T5 span corruption, the task Atlas was pretrained on.

The text's reader tokens (truncated to --text_maxlength) are cut into alternating non-noise and noise spans, starting
with non-noise and ending with noise (T5's `random_spans_noise_mask`). The query is the text with noise span i
replaced by the sentinel `<extra_id_i>`; the target lists each sentinel followed by the span it hides:

    tokens  A B C D E F G H        (noise: C D and H)
    query   A B <extra_id_0> E F G <extra_id_1>
    target  <extra_id_0> C D <extra_id_1> H

With n tokens: n_noise = round(n * --mlm_noise_density), at least 1 and at most n - 1 (T5's bounds);
n_spans = round(n_noise / --mlm_mean_noise_span_length), at least 1 and at most min(n_noise, n - n_noise) so that
every span is non-empty and spans are separated, and at most the tokenizer's number of sentinels (100 for T5).
Texts of fewer than 2 tokens cannot be corrupted and are skipped. Span lengths are a uniformly random composition
of n_noise (and of n - n_noise) into n_spans positive parts, drawn with the `rng` the data loader passes (so each
(seed, epoch, index) gives the same corruption; the original used the unseeded global `random`).

Query and target are decoded strings with the sentinels in them, as the original. Scoring: the evaluation loop
decodes generations with special tokens removed, so the gold answer is the target as a perfect generation of it
decodes (sentinels removed, white space squeezed). The original compared those stripped generations with the
sentinel-bearing target, so its exact match and F1 were always about 0 (ATLAS_REFERENCE §9.11). The sentinel-bearing
target and the uncorrupted text (`clean_target`, as the original) are kept in `metadata`.

Decoded strings do not always re-tokenize to the same tokens (T5's tokenizer puts a word boundary after a sentinel:
`<extra_id_0>van` reads as `<extra_id_0> van`); the model learns the re-tokenized target, which is also what the gold
answer is computed from.
"""

import random

from src.errors import UserError
from src.tasks.base import Example
from src.tasks.lm import CorpusTask, gold

MAX_SENTINELS = 1000  # probing bound for `<extra_id_N>` names; T5 tokenizers have 100


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's sentinels in order: `<extra_id_0>`, `<extra_id_1>`, ... (T5 naming), else its
    additional special tokens (what the original used)."""
    unknown = {None, tokenizer.unk_token_id}
    ids = []
    for i in range(MAX_SENTINELS):
        token_id = tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>")
        if token_id in unknown:
            break
        ids.append(token_id)
    if not ids:  # transformers 4.x calls the list `additional_special_tokens`, 5.x `extra_special_tokens`
        names = getattr(tokenizer, "additional_special_tokens", None) or getattr(tokenizer, "extra_special_tokens", [])
        ids = [tokenizer.convert_tokens_to_ids(name) for name in names] if isinstance(names, list) else []
    return ids


def random_segmentation(n_items: int, n_segments: int, rng: random.Random) -> list[int]:
    """n_segments positive lengths summing to n_items, every composition equally likely."""
    cuts = sorted(rng.sample(range(1, n_items), n_segments - 1))
    return [end - start for start, end in zip([0, *cuts], [*cuts, n_items])]


def span_corruption(
    tokens: list[int], sentinels: list[int], noise_density: float, mean_span_length: float, rng: random.Random
) -> tuple[list[int], list[int]] | None:
    """(query, target) token ids of T5 span corruption of `tokens` (see the module docstring); None if under 2."""
    n = len(tokens)
    if n < 2:
        return None
    n_noise = min(max(round(n * noise_density), 1), n - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    n_spans = min(n_spans, n_noise, n - n_noise, len(sentinels))
    noise_lengths = random_segmentation(n_noise, n_spans, rng)
    keep_lengths = random_segmentation(n - n_noise, n_spans, rng)
    query, target, offset = [], [], 0
    for sentinel, keep, noise in zip(sentinels, keep_lengths, noise_lengths):
        query += [*tokens[offset : offset + keep], sentinel]
        target += [sentinel, *tokens[offset + keep : offset + keep + noise]]
        offset += keep + noise
    return query, target


class Task(CorpusTask):
    name = "mlm"

    def __init__(
        self,
        min_words_per_lm_instance: int | None = None,
        mlm_noise_density: float = 0.15,
        mlm_mean_noise_span_length: float = 3,
        text_maxlength: int = 200,
        tokenizer=None,
        **_options,
    ) -> None:
        super().__init__(min_words_per_lm_instance)
        if tokenizer is None:  # also with --retrieve_only, which loads the tokenizer but no reader
            raise UserError("task 'mlm' needs the reader's tokenizer: pass --reader_model_type")
        if not 0 < mlm_noise_density < 1:
            raise UserError(f"--mlm_noise_density must be between 0 and 1 (exclusive), got {mlm_noise_density}")
        if not mlm_mean_noise_span_length > 0:
            raise UserError(f"--mlm_mean_noise_span_length must be positive, got {mlm_mean_noise_span_length}")
        self.tokenizer, self.sentinels = tokenizer, sentinel_ids(tokenizer)
        if not self.sentinels:
            raise UserError("task 'mlm' needs a reader tokenizer with sentinel tokens (<extra_id_0>, ...)")
        self.noise_density, self.mean_span_length = mlm_noise_density, mlm_mean_noise_span_length
        self.text_maxlength = text_maxlength

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        text = self.usable_text(raw, where)
        passage_id = self.passage_id(raw, where)
        if text is None:
            return None
        tok = self.tokenizer
        tokens = tok(text, add_special_tokens=False, max_length=self.text_maxlength, truncation=True)["input_ids"]
        corrupted = span_corruption(tokens, self.sentinels, self.noise_density, self.mean_span_length, rng)
        if corrupted is None:
            return None
        query, target = (tok.decode(ids) for ids in corrupted)
        # What a generation of exactly the target's tokens reads once the loop has decoded it.
        retokenized = tok(target, add_special_tokens=False)["input_ids"]
        answer = gold(tok.decode(retokenized, skip_special_tokens=True))
        metadata = self.metadata(raw, where, ("passages",))
        metadata.update(id=passage_id, target=target, clean_target=text)
        return Example(query, target, [answer], self.file_passages(raw, where), metadata)
