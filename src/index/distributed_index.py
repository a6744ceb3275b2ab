"""DistributedIndex: passage embeddings sharded over ranks, searched with one collective per call.

Rank r of W holds the contiguous block of store rows ``[r*N//W, (r+1)*N//W)`` and their embeddings (N_local, d).
A search all-gathers the query vectors, runs a local exact (flat) or faiss top-k, and sends each rank back only
the (B_local, k) scores and global rows of its own queries (all_to_all, tensors only), where they are merged.
With one process (no process group) the same code runs and the collectives are identities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from src import distributed as dist
from src.config import IndexConfig
from src.distributed import World
from src.errors import UserError
from src.index import faiss_index
from src.index.flat import PAD_ROW, blocks_topk, sort_topk
from src.passages import PassageStore

logger = logging.getLogger(__name__)

MODES = ("flat", "faiss")


def block_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges [i*n//parts, (i+1)*n//parts) for i < parts; sizes differ by at most one."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


class LocalPassages(Sequence):
    """Lazy view of this rank's passages (local index i -> store row local_rows[i]); reads the store on access."""

    def __init__(self, store: PassageStore, rows: range):
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.store.get_many(self.rows[i])
        return self.store.get(self.rows[i])


def _joined(blocks: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Row blocks as one contiguous (sum n_i, d) tensor on ``device`` in ``dtype``, each block copied (and converted)
    straight into its rows: no second copy, and no host buffer for blocks that are memory-mapped files."""
    if len(blocks) == 1:
        return blocks[0].to(device=device, dtype=dtype).contiguous()
    out = torch.empty((sum(len(b) for b in blocks), blocks[0].shape[1]), dtype=dtype, device=device)
    first = 0
    for block in blocks:
        out[first : first + len(block)].copy_(block)
        first += len(block)
    return out


class DistributedIndex:
    """Exact MIPS (or faiss) index sharded over ranks: rank r holds a contiguous block of store rows and their
    embeddings (N_local, d). Flat mode keeps fp32 on CPU (fastest here) and fp16 on CUDA.

    The local embeddings are a list of row blocks in row order: one tensor after an embedding or a refresh; a
    loaded CPU index keeps one view per memory-mapped shard file (no copy), searched block by block with the same
    results."""

    def __init__(
        self,
        store: PassageStore,
        dim: int,
        world: World,
        cfg: IndexConfig = IndexConfig(),
        source_path: str | None = None,
    ):
        if cfg.mode not in MODES:
            raise UserError(f"--index_mode {cfg.mode!r} is not one of {', '.join(MODES)}")
        if cfg.mode == "faiss":
            faiss_index.import_faiss()
            faiss_index.validate_options(cfg.faiss_index_type, cfg.faiss_code_size, dim)
        self.store, self.dim, self.world, self.cfg = store, dim, world, cfg
        self.local_rows = range(*block_ranges(len(store), world.world_size)[world.rank])
        self.device = world.device
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.source_path = source_path  # where it was loaded from; named in dimension errors
        # LayerNorm variant of the retriever that embedded it ("uncentered" | "standard"; None: not recorded)
        self.retriever_layernorm: str | None = None
        self._blocks: list[torch.Tensor] = []  # flat mode: (n_i, d) row blocks in row order, sum n_i = N_local
        self._faiss = None  # faiss index over local rows (local id i = local_rows[i]), faiss mode only
        # CUDA device faiss builds and searches on (faiss with GPU support and a CUDA shard), else None: CPU faiss
        self._faiss_gpu = faiss_index.gpu_device_index(self.device) if cfg.mode == "faiss" else None
        self._ready = False

    @property
    def mode(self) -> str:
        return self.cfg.mode

    def __len__(self) -> int:
        return len(self.store)

    def local_passages(self) -> LocalPassages:
        """This rank's passages in local order (what `set_embeddings` expects embeddings for)."""
        return LocalPassages(self.store, self.local_rows)

    @property
    def is_ready(self) -> bool:
        """True once embeddings were set (or loaded); before that `search` raises."""
        return self._ready

    def check_dim(self, dim: int) -> None:
        """UserError when the retriever's embedding size ``dim`` differs from the index's."""
        if dim != self.dim:
            where = f"the index at {self.source_path}" if self.source_path else "the index"
            raise UserError(f"{where} holds {self.dim}-dimensional embeddings but the retriever produces {dim}")

    @property
    def local_embeddings(self) -> torch.Tensor | None:
        """This rank's (N_local, d) embeddings in flat mode (None in faiss mode); read-only by convention. A copy
        when the index holds several row blocks (a memory-mapped load): see `embedding_blocks`."""
        if self.mode != "flat" or not self._ready:
            return None
        return self.embedding_rows(0, len(self.local_rows))

    @property
    def embedding_blocks(self) -> list[torch.Tensor]:
        """This rank's flat embeddings as (n_i, d) row blocks in row order (empty in faiss mode)."""
        return list(self._blocks)

    def embedding_rows(self, start: int, end: int) -> torch.Tensor:
        """Local rows [start, end) of the flat embeddings as one (end - start, d) tensor (a view when one block
        holds them all)."""
        pieces, first = [], 0
        for block in self._blocks:
            lo, hi = max(start, first), min(end, first + len(block))
            if lo < hi:
                pieces.append(block[lo - first : hi - first])
            first += len(block)
        if not pieces:
            return self._blocks[0][:0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    @property
    def local_faiss(self) -> Any:
        """This rank's faiss index in faiss mode (None when the rank holds no rows or in flat mode); a CPU copy when
        it lives on a GPU (what a save writes)."""
        return None if self._faiss is None else faiss_index.to_cpu(self._faiss)

    def set_faiss(self, faiss_object: Any) -> None:
        """Use a ready faiss index (e.g. a loaded one) over this rank's rows, in local order."""
        if self.mode != "faiss":
            raise ValueError("set_faiss needs an index in faiss mode")
        if faiss_object is not None:
            if faiss_object.ntotal != len(self.local_rows) or faiss_object.d != self.dim:
                raise UserError(
                    f"a faiss index of {faiss_object.ntotal} x {faiss_object.d} does not match this rank's "
                    f"{len(self.local_rows)} x {self.dim} rows"
                )
            faiss_index.set_nprobe(faiss_object, self.cfg.faiss_nprobe)
            if self._faiss_gpu is not None and not faiss_index.is_gpu_index(faiss_object):
                faiss_object = faiss_index.to_gpu(faiss_object, self._faiss_gpu)
        self._faiss, self._blocks, self._ready = faiss_object, [], True

    def set_embeddings(self, embeddings: torch.Tensor | list[torch.Tensor]) -> None:
        """Replace the local embeddings: (N_local, dim), or row blocks in row order whose rows add up to that.
        Flat: kept on the device in fp32 (CPU) or fp16 (CUDA); blocks already there in that dtype are kept as they are
        (e.g. memory-mapped shards), others are joined into one tensor. faiss: a new faiss index is trained and
        filled, and the full-precision matrix is not kept."""
        blocks = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
        blocks = blocks or [torch.empty((0, self.dim), dtype=self.dtype, device=self.device)]  # a rank with no rows
        shape = (sum(len(b) for b in blocks), *sorted({tuple(b.shape[1:]) for b in blocks}))  # (N, (d,)) if d agree
        if shape != (len(self.local_rows), (self.dim,)):
            raise ValueError(f"embeddings {shape} != ({len(self.local_rows)}, ({self.dim},))")
        blocks = [b.detach() for b in blocks]
        if self.mode == "flat":
            if not all(b.device == self.device and b.dtype == self.dtype and b.is_contiguous() for b in blocks):
                blocks = [_joined(blocks, self.device, self.dtype)]
            self._blocks = blocks
        else:
            self._blocks, self._faiss = [], None
            vectors = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
            vectors = vectors.float()  # (N_local, d) float32; stays on the GPU for GPU faiss
            if len(vectors) > 0:
                self._faiss = faiss_index.build_index(
                    vectors if self._faiss_gpu is not None else vectors.cpu().numpy(),
                    self.cfg.faiss_index_type,
                    self.cfg.faiss_code_size,
                    self.cfg.faiss_nprobe,
                    gpu=self._faiss_gpu,
                )
        self._ready = True

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """COLLECTIVE top-k search: every rank must call it the same number of times (with 0 queries if it has none).

        ``queries`` (B_local, d) on any device -> float32 scores (B_local, k) and int64 global store rows
        (B_local, k) on the queries' device, sorted by score descending, ties broken by the smaller row. ``k`` is
        clamped to the number of passages. Flat results do not depend on the world size. faiss IVF searches can
        find fewer than k hits; missing slots have score -inf and row -1.
        """
        if not self._ready:
            raise RuntimeError("the index has no embeddings yet: embed the passages or load an index first")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self.store))
        n_local_queries = queries.shape[0]
        local = queries.detach().to(device=self.device, dtype=torch.float32)
        all_queries, sizes = dist.all_gather_varsize(local)  # (B_total, d), every rank's queries in rank order
        if all_queries.shape[0] == 0:  # every rank sees the same sizes, so all skip the exchange together
            empty = torch.empty((0, k), device=queries.device)
            return empty, empty.long()
        scores, rows = self._local_search(all_queries, k)  # (B_total, k) each
        # Send each asking rank its queries' rows; receive this rank's queries' rows from every rank.
        scores = dist.all_to_all_rows(scores, sizes, n_local_queries)  # (W * B_local, k)
        rows = dist.all_to_all_rows(rows, sizes, n_local_queries)  # (W * B_local, k)
        shape = (len(sizes), n_local_queries, k)  # (W, B_local, k): candidates from each rank
        scores = scores.view(shape).transpose(0, 1).reshape(n_local_queries, shape[0] * k)  # (B_local, W*k)
        rows = rows.view(shape).transpose(0, 1).reshape(n_local_queries, shape[0] * k)  # (B_local, W*k)
        scores, rows = sort_topk(scores, rows, k)  # (B_local, k)
        rows = torch.where(rows == PAD_ROW, -1, rows)
        return scores.to(queries.device), rows.to(queries.device)

    def _local_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_total, k) float32 scores and global rows over this rank's rows; padded with (-inf, PAD_ROW)."""
        start = self.local_rows.start
        if self.mode == "flat":
            return blocks_topk(self._blocks, queries, k, row_offset=start)
        n_queries = queries.shape[0]
        if self._faiss is None:  # this rank holds no rows
            scores = torch.full((n_queries, k), float("-inf"), device=self.device)
            return scores, torch.full((n_queries, k), PAD_ROW, dtype=torch.int64, device=self.device)
        found_k = min(k, len(self.local_rows))
        if faiss_index.is_gpu_index(self._faiss):  # queries and results stay on the device
            scores, ids = faiss_index.search_torch(self._faiss, queries, found_k)  # (B, k')
        else:
            scores_np, ids_np = faiss_index.search(self._faiss, queries.float().cpu().numpy(), found_k)  # (B, k')
            scores, ids = torch.from_numpy(scores_np), torch.from_numpy(ids_np)
        scores, ids = scores.to(self.device), ids.to(self.device)
        rows = torch.where(ids >= 0, ids + start, PAD_ROW)  # (B, k')
        if found_k < k:
            fill = (scores.shape[0], k - found_k)
            scores = torch.cat([scores, torch.full(fill, float("-inf"), device=scores.device)], dim=1)  # (B, k)
            rows = torch.cat([rows, torch.full(fill, PAD_ROW, dtype=torch.int64, device=rows.device)], dim=1)  # (B, k)
        return sort_topk(scores, rows, k)  # faiss's order among equal scores is unspecified

    @torch.no_grad()
    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """COLLECTIVE (flat mode): the embeddings of global store rows (B_local, k) -> (B_local, k, d) float32 on the
        rows' device, zeros where a row is -1. Every rank calls it equally often (with 0 rows if it has none): the
        rows are all-gathered, each rank fills in the vectors it holds, and one all-reduce sums the (exact) parts."""
        if self.mode != "flat" or not self._ready:
            raise ValueError("vectors needs a flat index with embeddings")
        all_rows, sizes = dist.all_gather_varsize(rows.to(self.device))  # (B_total, k)
        out = torch.zeros((*all_rows.shape, self.dim), dtype=torch.float32, device=self.device)  # (B_total, k, d)
        first = self.local_rows.start  # global row of the block's first row
        for block in self._blocks:  # one block, or one per memory-mapped shard
            held = (all_rows >= first) & (all_rows < first + len(block))  # (B_total, k)
            out[held] = block[all_rows[held] - first].float()
            first += len(block)
        dist.all_reduce_sum(out)  # each row is held by one rank: the others add exact zeros
        offset = sum(sizes[: self.world.rank])
        return out[offset : offset + rows.shape[0]].to(rows.device)

    def passages(self, rows: torch.Tensor) -> list[list[dict]]:
        """Passage dicts for (B, k) global rows, read from the store; rows of -1 (no hit) are skipped."""
        return [[self.store.get(r) for r in line if r >= 0] for line in rows.tolist()]
