"""The collate step: examples and their passages -> the token tensors the model reads (as FiD's Collator).

`collate` is the only place that tokenises for the model. The reader reads each query with its first n_context
passages as (B, K, L); the retriever loss reads the query (B, Lq) and all retriever_n_context passages (B*K', Lp),
and the reader scores those K' passages as (B, K', L). `Atlas` maps these tensors to losses and generations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedTokenizerBase

from src.config import AtlasConfig
from src.passages import EMPTY_PASSAGE, format_passage
from src.tasks import Example


@dataclass(frozen=True)
class Tokenizers:
    """The reader's and the retriever's tokenizers (either is None when that model is not built)."""

    reader: PreTrainedTokenizerBase | None
    retriever: PreTrainedTokenizerBase | None


@dataclass
class Batch:
    """Token tensors of one batch of B examples; fields a step does not need are None."""

    reader_ids: torch.Tensor  # (B, K, L) query + passage k, K = n_context
    reader_mask: torch.Tensor  # (B, K, L)
    labels: torch.Tensor | None = None  # (B, T) target ids, -100 at padding
    query_ids: torch.Tensor | None = None  # (B, Lq) retriever query tokens
    query_mask: torch.Tensor | None = None  # (B, Lq)
    passage_ids: torch.Tensor | None = None  # (B*K', Lp) retriever passage tokens, K' = retriever_n_context
    passage_mask: torch.Tensor | None = None  # (B*K', Lp)
    passage_vectors: torch.Tensor | None = None  # (B, K', D) the index's vectors, instead of passage_ids (query side)
    teacher_ids: torch.Tensor | None = None  # (B, K', L) reader inputs of the K' passages (reader_ids when K' == K)
    teacher_mask: torch.Tensor | None = None  # (B, K', L)
    choice_position: torch.Tensor | None = None  # (B,) multiple choice: the target position where options differ
    choice_ids: torch.Tensor | None = None  # (B, C) each option's token there (scored with teacher forcing)
    choice_labels: torch.Tensor | None = None  # (B, C, T) each option's labels, when no position tells them apart
    decoder_prompts: list[list[int]] | None = None  # --decoder_prompt_format: each example's forced prompt tokens

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; a tensor shared by two fields (teacher = reader inputs) is moved once."""
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is not None and id(t) not in moved:
                moved[id(t)] = t.to(device, non_blocking=True)
            return None if t is None else moved[id(t)]

        return Batch(**{f.name: move(v) if isinstance(v := getattr(self, f.name), torch.Tensor) or v is None else v
                        for f in fields(self)})  # fmt: skip


def pad_passages(passages: list[list[dict]], k: int) -> list[list[dict]]:
    """Exactly k passages per example: truncate, or pad with empty passages when fewer are available."""
    return [(list(ps) + [EMPTY_PASSAGE] * k)[:k] for ps in passages]


def retriever_maxlength(tokenizers: Tokenizers, cfg: AtlasConfig) -> int:
    return min(cfg.text_maxlength, tokenizers.retriever.model_max_length, 512)


def retriever_tokens(tokenizers: Tokenizers, texts: list[str], cfg: AtlasConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Retriever token ids and mask (n, L) of queries or formatted passages, padded to the longest."""
    enc = tokenizers.retriever(
        texts, max_length=retriever_maxlength(tokenizers, cfg), truncation=True, padding="longest", return_tensors="pt"
    )
    return enc.input_ids, enc.attention_mask


def retriever_passage_tokens(
    tokenizers: Tokenizers, passages: list[list[dict]], cfg: AtlasConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retriever tokens of every passage of every example, flattened: (B*K, L)."""
    texts = [format_passage(cfg.retriever_format, p) for ps in passages for p in ps]
    return retriever_tokens(tokenizers, texts, cfg)


def reader_tokens(
    tokenizers: Tokenizers, examples: list[Example], passages: list[list[dict]], k: int, cfg: AtlasConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reader input ids and mask (B, k, L): each query with its first k passages (padded with empty ones).

    L is the longest tokenised pair of the batch, capped at text_maxlength (dynamic padding).
    """
    texts = [
        format_passage(cfg.encoder_format, p, ex.query)
        for ex, ps in zip(examples, pad_passages(passages, k))
        for p in ps
    ]
    enc = tokenizers.reader(
        texts, max_length=cfg.text_maxlength, truncation=True, padding="longest", return_tensors="pt"
    )
    return enc.input_ids.view(len(examples), k, -1), enc.attention_mask.view(len(examples), k, -1)


def target_tokens(tokenizers: Tokenizers, targets: list[str], max_length: int | None) -> torch.Tensor:
    """Target strings -> labels (B, T) ending in </s>, padding set to -100 (ignored by the loss)."""
    enc = tokenizers.reader(targets, max_length=max_length, truncation=max_length is not None, padding="longest",
                            return_tensors="pt")  # fmt: skip
    return enc.input_ids.masked_fill(enc.attention_mask == 0, -100)


def decoder_text(target: str, query: str, cfg: AtlasConfig) -> tuple[str, str]:
    """(prompt, target) as the decoder reads them: --decoder_format applied to the target, --decoder_prompt_format
    (formatted with the query) before it; the prompt is "" without that flag."""
    if cfg.decoder_format is not None:
        target = cfg.decoder_format.format(target=target)
    prompt = "" if cfg.decoder_prompt_format is None else cfg.decoder_prompt_format.format(query=query)
    return prompt, target


def prompt_tokens(tokenizers: Tokenizers, prompts: list[str]) -> list[list[int]]:
    """Token ids of decoder prompts, without special tokens (empty lists for empty prompts)."""
    return [ids for ids in tokenizers.reader(prompts, add_special_tokens=False).input_ids]


def labels_for(tokenizers: Tokenizers, examples: list[Example], cfg: AtlasConfig) -> torch.Tensor:
    """Labels (B, T) of the examples' targets; decoder prompt tokens are set to -100 (the model is not trained to
    write the prompt, as the original)."""
    texts = [decoder_text(ex.target, ex.query, cfg) for ex in examples]
    labels = target_tokens(tokenizers, [prompt + target for prompt, target in texts], cfg.target_maxlength)
    if cfg.decoder_prompt_format is not None:
        for b, ids in enumerate(prompt_tokens(tokenizers, [prompt for prompt, _ in texts])):
            labels[b, : len(ids)] = -100
    return labels


def choice_tokens(tokenizers: Tokenizers, examples: list[Example], cfg: AtlasConfig) -> dict[str, torch.Tensor]:
    """How the options of multiple-choice examples are scored.

    As the original: the logit of each option's token at the first target position where the options' tokens differ
    (they share the target's prefix, so one teacher-forced pass reads them all): `choice_position` (B,) and
    `choice_ids` (B, C). A tokenizer that splits the options so that some share their token there (the demo's
    reads "▁A" but "▁", "B") cannot be scored that way: then each option's whole target log-likelihood is used,
    from its labels `choice_labels` (B, C, T).
    """
    positions, ids, options = [], [], []
    for ex in examples:
        texts = [prompt + target for prompt, target in (decoder_text(c, ex.query, cfg) for c in ex.choices)]
        tokens = tokenizers.reader(texts).input_ids
        position = next((t for t in range(min(map(len, tokens))) if len({x[t] for x in tokens}) > 1), 0)
        positions.append(position)
        ids.append([x[position] for x in tokens])
        options += texts
    if all(len(set(row)) == len(row) for row in ids):
        return {"choice_position": torch.tensor(positions), "choice_ids": torch.tensor(ids)}
    labels = target_tokens(tokenizers, options, cfg.target_maxlength)  # (B*C, T)
    return {"choice_labels": labels.view(len(examples), -1, labels.shape[-1])}


def collate(
    examples: list[Example],
    passages: list[list[dict]],
    tokenizers: Tokenizers,
    cfg: AtlasConfig,
    *,
    targets: bool = True,
    retriever: bool = False,
    passage_vectors: torch.Tensor | None = None,
) -> Batch:
    """The batch the model reads: reader inputs, and the targets and retriever inputs when asked for. Given the
    retrieved passages' index vectors (B, K', D) (query-side training), the passages are not tokenised for the
    retriever."""
    ids, mask = reader_tokens(tokenizers, examples, passages, cfg.n_context, cfg)
    batch = Batch(ids, mask)
    if targets:
        batch.labels = labels_for(tokenizers, examples, cfg)
        if examples and all(ex.choices for ex in examples):
            for name, value in choice_tokens(tokenizers, examples, cfg).items():
                setattr(batch, name, value)
    if cfg.decoder_prompt_format is not None:
        batch.decoder_prompts = prompt_tokens(tokenizers, [decoder_text("", ex.query, cfg)[0] for ex in examples])
    if retriever:
        k = cfg.retriever_n_context
        passage_lists = pad_passages(passages, k)
        batch.query_ids, batch.query_mask = retriever_tokens(tokenizers, [ex.query for ex in examples], cfg)
        if passage_vectors is None:
            batch.passage_ids, batch.passage_mask = retriever_passage_tokens(tokenizers, passage_lists, cfg)
        batch.passage_vectors = passage_vectors
        if k == cfg.n_context:  # the reader's inputs already hold these passages: tokenise them once
            batch.teacher_ids, batch.teacher_mask = ids, mask
        else:
            batch.teacher_ids, batch.teacher_mask = reader_tokens(tokenizers, examples, passages, k, cfg)
    return batch


def decode(tokenizers: Tokenizers, tokens: torch.Tensor, prompts: list[list[int]] | None = None) -> list[str]:
    """Generated token ids (B, T) -> strings, special tokens such as <extra_id_0> stripped; a forced decoder prompt
    (after the start token) is removed first."""
    rows = tokens.tolist()
    if prompts is not None:
        rows = [row[1 + len(prompt) :] for row, prompt in zip(rows, prompts)]
    return [text.strip() for text in tokenizers.reader.batch_decode(rows, skip_special_tokens=True)]
