"""Retrieval for a batch of examples: embed the queries, search the index, rerank and filter (collective)."""

from __future__ import annotations

import logging

import torch

from src.atlas import Atlas
from src.batching import Tokenizers, retriever_passage_tokens, retriever_tokens
from src.index import DistributedIndex
from src.precision import inference_autocast
from src.tasks import Example

logger = logging.getLogger(__name__)


def own_passage_last(examples: list[Example], passages: list[list[dict]], k: int) -> list[list[int]]:
    """Per example, the order that moves passages whose `id` equals the instance's `metadata["id"]` behind the others
    (so they are dropped when k others exist).

    When fewer than k others remain, the filtered ones refill the list at the end, with a warning, as the original.
    """
    orders = []
    for ex, ps in zip(examples, passages):
        own = str(ex.metadata.get("id", "\0no id"))
        order = [i for i, p in enumerate(ps) if str(p.get("id")) != own]
        if len(order) < min(k, len(ps)):
            logger.warning("filtering: fewer than %d other passages for instance %s; refilling", k, own)
        orders.append(order + [i for i, p in enumerate(ps) if str(p.get("id")) == own])
    return orders


def embed_queries(model: Atlas, tokenizers: Tokenizers, queries: list[str]) -> torch.Tensor:
    """Query embeddings (B, D) for search; B may be 0 (a rank with no query left still searches)."""
    if not queries:
        return torch.zeros(0, model.retriever.dim, device=model.device)
    return model.embed_queries(*retriever_tokens(tokenizers, queries, model.config))


def retrieve(
    model: Atlas,
    tokenizers: Tokenizers,
    index: DistributedIndex,
    examples: list[Example],
    k: int,
    filter_by_id: bool = False,
) -> tuple[list[list[dict]], torch.Tensor]:
    """Top-k passages and their scores (B, k) for each example's query.

    COLLECTIVE: every rank calls it equally often, with an empty list when it has no example left. With
    `filter_by_id` (tasks whose data is the corpus itself), over-retrieve and drop the instance's own passage.
    With --retrieve_with_rerank, retrieve n_to_rerank and keep the k best under the current passage encoder.
    Queries and reranked passages are embedded under --precision (autocast on CUDA; fp32 on CPU).
    """
    passages, scores, _ = retrieve_with_rows(model, tokenizers, index, examples, k, filter_by_id)
    return passages, scores


def retrieve_with_rows(
    model: Atlas,
    tokenizers: Tokenizers,
    index: DistributedIndex,
    examples: list[Example],
    k: int,
    filter_by_id: bool = False,
) -> tuple[list[list[dict]], torch.Tensor, torch.Tensor]:
    """`retrieve`, with each passage's store row as well: passages, scores (B, k) and rows (B, k), -1 where an
    example has fewer than k passages."""
    cfg = model.config
    with inference_autocast(index.cfg.precision, model.device):  # --precision, as the index build
        query_emb = embed_queries(model, tokenizers, [ex.query for ex in examples])  # (B, D)
    n = k * cfg.filtering_overretrieve_ratio if filter_by_id else k
    if cfg.retrieve_with_rerank:
        n = max(n, cfg.n_to_rerank_with_retrieve_with_rerank)
    scores, rows = index.search(query_emb, n)  # (B, n), (B, n); rows of -1 (no hit) are last
    passages = index.passages(rows)
    if cfg.retrieve_with_rerank and examples:
        with inference_autocast(index.cfg.precision, model.device):
            scores = model.rescore(query_emb, *retriever_passage_tokens(tokenizers, passages, cfg))  # (B, n), fresh
        order = scores.argsort(dim=1, descending=True, stable=True)  # (B, n)
        passages, scores, rows = _reordered(passages, scores, rows, order.tolist())
    if filter_by_id and examples:
        passages, scores, rows = _reordered(passages, scores, rows, own_passage_last(examples, passages, k))
    return [ps[:k] for ps in passages], scores[:, :k], rows[:, :k]


def _reordered(
    passages: list[list[dict]], scores: torch.Tensor, rows: torch.Tensor, orders: list[list[int]]
) -> tuple[list[list[dict]], torch.Tensor, torch.Tensor]:
    """Passages, scores (B, n) and rows (B, n) put in each example's new order of its passages; the slots of missing
    hits (beyond an example's passages) stay last."""
    full = [order + list(range(len(order), scores.shape[1])) for order in orders]  # (B, n)
    index = torch.tensor(full, dtype=torch.long).reshape(scores.shape)
    passages = [[ps[i] for i in order if i < len(ps)] for ps, order in zip(passages, orders)]
    return passages, scores.gather(1, index.to(scores.device)), rows.gather(1, index.to(rows.device))


def passages_for(
    model: Atlas,
    tokenizers: Tokenizers,
    index: DistributedIndex | None,
    examples: list[Example],
    k: int,
    filter_by_id: bool = False,
) -> tuple[list[list[dict]], torch.Tensor | None]:
    """The instances' own passages when there is no index (closed book, --use_file_passages), else retrieve."""
    if index is None:
        return [ex.passages or [] for ex in examples], None
    return retrieve(model, tokenizers, index, examples, k, filter_by_id)
