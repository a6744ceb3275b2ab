"""Exact maximum-inner-product top-k over an in-memory (N, d) matrix, with a deterministic tie order.

Order everywhere: score descending, then global row ascending. That total order makes the merged result of several
shards (or chunks) equal the result over the whole matrix, whatever the world size.

Two scans compute it. On CPU, `_exact_topk_cpu` walks 65,536-row chunks and re-scans only the lines whose k-th place
is tied (a host check per chunk: cheap there, and the fastest layout measured on 2 cores). On CUDA, `exact_topk_device`
never reads a tensor value on the host: each (large) chunk's scores are reduced to group maxima, the best k groups are
chosen with a composite (score, row) integer key, and the exact top k is taken among their members, all on the device.
`exact_topk` picks the scan by the embeddings' device.
"""

from __future__ import annotations

import torch

# Rows per matmul chunk: bounds the (chunk, B) score buffer while keeping the product large enough to be fast.
CHUNK_ROWS = 65536
# Rows per group on the device path: the top k of a chunk lie in its k best groups by (group max desc, group asc).
GROUP_ROWS = 64
# Fraction of the free device memory the device path may use for one chunk's (B, C) scores and their temporaries.
DEVICE_MEMORY_FRACTION = 0.5
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
    row asc). When N < k the tail is padded with score -inf and row PAD_ROW. Scores are computed in the embeddings'
    dtype. CUDA embeddings take `exact_topk_device` (no host synchronisation in the scan; one NaN check on the (B, k)
    result after it), others the chunked CPU scan.
    """
    if embeddings.device.type != "cuda":
        return _exact_topk_cpu(embeddings, queries, k, row_offset, chunk_rows)
    scores, rows = exact_topk_device(embeddings, queries, k, row_offset, chunk_rows)
    if bool(torch.isnan(scores).any()):  # the one host read, after the scan (NaN keys sort above every score)
        raise ValueError("NaN in the index embeddings or queries: cannot rank passages")
    return scores, rows


# Candidate lists merged at once by `blocks_topk`: bounds the (B, MERGE_EVERY * k) sort when there are many blocks.
MERGE_EVERY = 16


def blocks_topk(
    blocks: list[torch.Tensor], queries: torch.Tensor, k: int, row_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`exact_topk` over row blocks (n_i, d) that follow each other (block i starts at row_offset + sum of the
    earlier n_i): the same (B, k) scores and rows as over their concatenation (the order is total)."""
    if len(blocks) == 1:
        return exact_topk(blocks[0], queries, k, row_offset)

    def merged(candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return sort_topk(torch.cat([s for s, _ in candidates], dim=1), torch.cat([r for _, r in candidates], dim=1), k)

    best: list[tuple[torch.Tensor, torch.Tensor]] = []
    for block in blocks:
        best.append(exact_topk(block, queries, k, row_offset))
        row_offset += len(block)
        if len(best) == MERGE_EVERY:
            best = [merged(best)]
    return merged(best)


def _padded_candidates(
    all_scores: list[torch.Tensor], all_rows: list[torch.Tensor], n_queries: int, n_rows: int, k: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks' candidates side by side, padded with -inf / PAD_ROW so that a shard smaller than k still returns
    exactly k: (B, n_chunks * k') each."""
    if n_rows < k:
        all_scores = [*all_scores, torch.full((n_queries, k - n_rows), float("-inf"), device=device)]
        all_rows = [*all_rows, torch.full((n_queries, k - n_rows), PAD_ROW, dtype=torch.int64, device=device)]
    return torch.cat(all_scores, dim=1), torch.cat(all_rows, dim=1)


# The CPU product is padded with zero rows to at least these sizes, so that a row's score has the same bits whatever
# the chunk or block holding it: MKL's sgemv (one query) and its sgemm edge kernels (< 64 rows) sum in another order
# than the bulk sgemm (measured: a one-query score depended on the chunk's size and offset). sgemm on two queries is
# also ~3x faster than sgemv on one (memory-bound either way, 65,536 x 768 fp32).
MIN_GEMM_QUERIES, MIN_GEMM_ROWS = 2, 64


def _at_least(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """``matrix`` (n, d), with zero rows appended up to ``rows`` rows when it has fewer."""
    if len(matrix) >= rows:
        return matrix
    return torch.cat([matrix, matrix.new_zeros((rows - len(matrix), matrix.shape[1]))])


def _exact_topk_cpu(
    embeddings: torch.Tensor, queries: torch.Tensor, k: int, row_offset: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`exact_topk` on CPU: chunks of ``chunk_rows`` rows (default CHUNK_ROWS) as ``E_chunk @ q.T`` (the fastest
    layout measured on CPU), with a host-side tie check per chunk."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    n_queries, n_rows = queries.shape[0], embeddings.shape[0]
    device = embeddings.device
    queries = _at_least(queries.to(device=device, dtype=embeddings.dtype), MIN_GEMM_QUERIES)  # (max(B, 2), d)
    all_scores, all_rows = [], []
    for start in range(0, n_rows, chunk_rows):
        chunk = embeddings[start : start + chunk_rows]  # (C, d)
        scores = _at_least(chunk, MIN_GEMM_ROWS) @ queries.T  # (max(C, 64), d) @ (d, B') -> (C', B')
        chunk_scores = scores[: len(chunk), :n_queries].T  # (B, C)
        values, columns = _chunk_topk(chunk_scores, k)  # (B, k')
        all_scores.append(values.float())
        all_rows.append(columns + (start + row_offset))
    scores, rows = _padded_candidates(all_scores, all_rows, n_queries, n_rows, k, device)  # (B, n_chunks * k')
    return sort_topk(scores, rows, k)


def order_key(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (value desc, column asc), for float ``values`` and ``columns`` < 2**32.

    The float32 bits are mapped to an int32 that orders as the floats do (negative floats have their magnitude bits
    flipped), shifted into the high half; the low half holds ``2**32 - 1 - column``. -0.0 is folded into +0.0 first
    so that equal scores get equal high halves. A NaN maps above +inf (or below -inf, by its sign bit).
    """
    bits = (values.float() + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0
    monotone = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # same order as the floats
    return monotone * 2**32 + (0xFFFFFFFF - columns)  # |monotone| <= 2**31: no overflow


def _key_topk(values: torch.Tensor, columns: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of (B, M) candidates by (value desc, column asc), columns < 2**32: (B, k) values and columns."""
    picked = order_key(values, columns).topk(k, dim=1).indices  # (B, k), in key order
    return values.gather(1, picked), columns.gather(1, picked)


def _device_chunk_topk(scores: torch.Tensor, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top ``k`` of a chunk's (B, C) scores by (score desc, column asc): (B, k') values and columns, k'=min(k,C).

    Two reductions replace one top-k over C: the max of each run of ``group`` columns, the best k groups by (max
    desc, group asc), then the best k among those groups' k*group members and the < group tail columns. Exact: a
    member of the top k outside the k best groups would be preceded by each of those groups' max (a better score, or
    an equal one at a smaller column), k+1 elements in a top k. Only shapes steer the Python control flow.
    """
    n_queries, n_cols = scores.shape
    k_out = min(k, n_cols)
    n_groups = n_cols // group
    if n_groups <= 2 * k:  # too few groups to pay off: rank every column
        columns = torch.arange(n_cols, device=scores.device).expand(n_queries, n_cols)  # (B, C)
        return _key_topk(scores, columns, k_out)
    grouped = n_groups * group
    maxima = scores[:, :grouped].unflatten(1, (n_groups, group)).amax(dim=2)  # (B, C//g)
    group_ids = torch.arange(n_groups, device=scores.device).expand(n_queries, n_groups)  # (B, C//g)
    best_groups = _key_topk(maxima, group_ids, k)[1]  # (B, k)
    members = (best_groups.unsqueeze(2) * group + torch.arange(group, device=scores.device)).flatten(1)  # (B, k*g)
    tail = torch.arange(grouped, n_cols, device=scores.device).expand(n_queries, n_cols - grouped)  # (B, C%g)
    columns = torch.cat([members, tail], dim=1)  # (B, k*g + C%g)
    return _key_topk(scores.gather(1, columns), columns, k_out)


def device_chunk_rows(n_queries: int, n_rows: int, device: torch.device, chunk_rows: int | None) -> int:
    """Rows per chunk of the device scan: ``chunk_rows`` if given, else as many as DEVICE_MEMORY_FRACTION of the free
    CUDA memory holds (about 4 bytes per score: the fp16 scores, the group keys, slack), a multiple of
    GROUP_ROWS; CHUNK_ROWS off CUDA. Read once per search, before the scan."""
    if chunk_rows:
        return chunk_rows
    if device.type != "cuda":
        return CHUNK_ROWS
    free_bytes = torch.cuda.mem_get_info(device)[0]
    rows = int(free_bytes * DEVICE_MEMORY_FRACTION) // (4 * max(n_queries, 1))
    rows = max(GROUP_ROWS * 1024, rows // GROUP_ROWS * GROUP_ROWS)
    return min(rows, 2**31 - 1)  # columns must fit the low half of `order_key`


def exact_topk_device(
    embeddings: torch.Tensor, queries: torch.Tensor, k: int, row_offset: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`exact_topk` without a host synchronisation: the same contract and results, on any device.

    Chunks of `device_chunk_rows` rows (on CUDA sized by the free memory, usually one chunk per shard), each
    `q @ E_chunk.T` in the embeddings' dtype, reduced on the device by `_device_chunk_topk`; the chunks' candidates are
    merged by `sort_topk` (stable sorts). NaN scores are not detected here (they rank first): `exact_topk` checks.
    """
    n_queries, n_rows = queries.shape[0], embeddings.shape[0]
    device = embeddings.device
    queries = queries.to(device=device, dtype=embeddings.dtype)
    step = device_chunk_rows(n_queries, n_rows, device, chunk_rows)
    all_scores, all_rows = [], []
    for start in range(0, n_rows, step):
        chunk_scores = queries @ embeddings[start : start + step].T  # (B, d) @ (d, C) -> (B, C)
        values, columns = _device_chunk_topk(chunk_scores, k, GROUP_ROWS)  # (B, k')
        all_scores.append(values.float())
        all_rows.append(columns + (start + row_offset))
    scores, rows = _padded_candidates(all_scores, all_rows, n_queries, n_rows, k, device)  # (B, n_chunks * k')
    if len(all_scores) == 1:  # one chunk, already in order
        return scores, rows
    return sort_topk(scores, rows, k)
