"""Exact maximum-inner-product top-k over an in-memory (N, d) matrix, with a deterministic tie order.

Order everywhere: score descending, then global row ascending. That total order makes the merged result of several
shards (or chunks) equal the result over the whole matrix, whatever the world size.
"""

from __future__ import annotations

import torch

# Rows per matmul chunk: bounds the (chunk, B) score buffer while keeping the product large enough to be fast.
CHUNK_ROWS = 65536
# Row id used to pad a shard holding fewer than k rows; its score is -inf so it never beats a real row.
PAD_ROW = torch.iinfo(torch.int64).max


def sort_topk(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of each line of (B, M) candidates by (score desc, row asc); returns (B, k) scores and rows."""
    by_row = torch.sort(rows, dim=1, stable=True).indices  # (B, M)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return scores.gather(1, by_score), rows.gather(1, by_score)


def _fix_boundary_ties(scores: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the top ``k`` of each line of ``scores`` (n, C) when ties straddle the k-th place.

    torch.topk picks an arbitrary subset among equal scores; here every score above ``threshold`` (n, 1) (the k-th
    value) is kept, plus the lowest-column scores equal to it. Returns (n, k) column indices.
    """
    above = scores > threshold  # (n, C)
    equal = scores == threshold  # (n, C)
    room = k - above.sum(dim=1, keepdim=True)  # (n, 1) places left for tied scores
    keep = above | (equal & (equal.cumsum(dim=1) <= room))  # (n, C), exactly k per line
    if int(keep.sum()) != k * scores.shape[0]:
        raise ValueError("NaN in the index embeddings or queries: cannot rank passages")
    return keep.nonzero()[:, 1].view(scores.shape[0], k)  # (n, k); nonzero() is row-major, so lines stay grouped


def _chunk_topk(chunk_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of (B, C) scores under (score desc, column asc); returns (B, k') values and columns, k'=min(k,C).

    Asks topk for k+1 so that a tie at the k-th place is detected cheaply; only then are the tied lines rescanned.
    """
    n_cols = chunk_scores.shape[1]
    if k >= n_cols:
        columns = torch.arange(n_cols, device=chunk_scores.device).expand_as(chunk_scores)  # (B, C)
        return chunk_scores, columns
    values, columns = chunk_scores.topk(k + 1, dim=1)  # (B, k+1), sorted descending
    tied = (values[:, k - 1] == values[:, k]).nonzero()[:, 0]  # lines whose k-th and (k+1)-th scores are equal
    values, columns = values[:, :k], columns[:, :k]  # (B, k)
    if len(tied) > 0:
        fixed = _fix_boundary_ties(chunk_scores[tied], values[tied, k - 1 :], k)  # (n_tied, k)
        columns = columns.clone()
        columns[tied] = fixed
        values = chunk_scores.gather(1, columns)  # (B, k)
    return values, columns


def exact_topk(
    embeddings: torch.Tensor, queries: torch.Tensor, k: int, row_offset: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` rows of ``embeddings`` (N, d) for each query (B, d) by inner product.

    Returns float32 scores (B, k) and int64 global rows (B, k) (local row + ``row_offset``), sorted by (score desc,
    row asc). When N < k the tail is padded with score -inf and row PAD_ROW. The product is computed in chunks of
    ``chunk_rows`` rows (default CHUNK_ROWS) as ``E_chunk @ q.T`` (the fastest layout measured on CPU), in the
    embeddings' dtype.
    """
    chunk_rows = chunk_rows or CHUNK_ROWS
    n_queries, n_rows = queries.shape[0], embeddings.shape[0]
    device = embeddings.device
    queries = queries.to(device=device, dtype=embeddings.dtype)
    all_scores, all_rows = [], []
    for start in range(0, n_rows, chunk_rows):
        chunk = embeddings[start : start + chunk_rows]  # (C, d)
        chunk_scores = (chunk @ queries.T).T  # (C, d) @ (d, B) -> (C, B) -> (B, C)
        values, columns = _chunk_topk(chunk_scores, k)  # (B, k')
        all_scores.append(values.float())
        all_rows.append(columns + (start + row_offset))
    if n_rows < k:  # pad so every shard returns exactly k candidates
        all_scores.append(torch.full((n_queries, k - n_rows), float("-inf"), device=device))
        all_rows.append(torch.full((n_queries, k - n_rows), PAD_ROW, dtype=torch.int64, device=device))
    scores = torch.cat(all_scores, dim=1)  # (B, n_chunks * k')
    rows = torch.cat(all_rows, dim=1)  # (B, n_chunks * k')
    return sort_topk(scores, rows, k)
