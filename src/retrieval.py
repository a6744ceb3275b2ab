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
        scores, rows = scores.gather(1, order), rows.gather(1, order.to(rows.device))
        passages = [[ps[j] for j in row] for ps, row in zip(passages, order.tolist())]
    if filter_by_id and examples:
        orders = own_passage_last(examples, passages, k)
        orders = [order + list(range(len(order), scores.shape[1])) for order in orders]  # the missing hits stay last
        scores = torch.stack([line[order] for line, order in zip(scores, orders)]).reshape(scores.shape)
        rows = torch.stack([line[order] for line, order in zip(rows, orders)]).reshape(rows.shape)
        passages = [[ps[i] for i in order if i < len(ps)] for ps, order in zip(passages, orders)]
    return [ps[:k] for ps in passages], scores[:, :k], rows[:, :k]


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
