"""DistributedIndex: passage embeddings sharded over ranks, searched with one collective per call.

Rank r of W holds the contiguous block of store rows ``[r*N//W, (r+1)*N//W)`` and their embeddings (N_local, d).
A search all-gathers the query vectors, runs a local exact (flat) or faiss top-k, and sends each rank back only
the (B_local, k) scores and global rows of its own queries (all_to_all, tensors only), where they are merged.
With one process (no process group) the same code runs and the collectives are identities.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence

import numpy as np
import torch

from src import distributed as dist
from src.distributed import World
from src.errors import UserError
from src.index import faiss_index, io
from src.index.flat import PAD_ROW, exact_topk, sort_topk
from src.passages import PassageStore

logger = logging.getLogger(__name__)

MODES = ("flat", "faiss")


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


class DistributedIndex:
    """Exact MIPS (or faiss) index sharded over ranks: rank r holds a contiguous block of store rows and their
    embeddings (N_local, d). Flat mode keeps fp32 on CPU (fastest here) and fp16 on CUDA."""

    def __init__(
        self,
        store: PassageStore,
        dim: int,
        world: World,
        mode: str = "flat",
        faiss_index_type: str = "flat",
        faiss_code_size: int | None = None,
        faiss_nprobe: int | None = None,
    ):
        if mode not in MODES:
            raise UserError(f"--index_mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "faiss":
            faiss_index.import_faiss()
            faiss_index.validate_options(faiss_index_type, faiss_code_size, dim)
        self.store, self.dim, self.world, self.mode = store, dim, world, mode
        self.faiss_index_type, self.faiss_code_size, self.faiss_nprobe = faiss_index_type, faiss_code_size, faiss_nprobe
        self.local_rows = range(*io.block_ranges(len(store), world.world_size)[world.rank])
        self.device = world.device
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.source_path: str | None = None  # set by load(); named in dimension errors
        self._embeddings: torch.Tensor | None = None  # (N_local, d), flat mode only
        self._faiss = None  # faiss index over local rows (local id i = local_rows[i]), faiss mode only
        self._ready = False

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

    def set_embeddings(self, embeddings: torch.Tensor) -> None:
        """Replace the local embeddings (N_local, dim). Flat: kept on the device in fp32 (CPU) or fp16 (CUDA).
        faiss: a new faiss index is trained and filled, and the full-precision matrix is not kept."""
        if tuple(embeddings.shape) != (len(self.local_rows), self.dim):
            raise ValueError(f"embeddings {tuple(embeddings.shape)} != ({len(self.local_rows)}, {self.dim})")
        if self.mode == "flat":
            self._embeddings = embeddings.detach().to(device=self.device, dtype=self.dtype).contiguous()
        else:
            self._embeddings = None
            vectors = embeddings.detach().float().cpu().numpy()  # (N_local, d) float32 for faiss
            self._faiss = None
            if len(vectors) > 0:
                self._faiss = faiss_index.build_index(
                    vectors, self.faiss_index_type, self.faiss_code_size, self.faiss_nprobe
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
            return exact_topk(self._embeddings, queries, k, row_offset=start)
        n_queries = queries.shape[0]
        if self._faiss is None:  # this rank holds no rows
            scores = torch.full((n_queries, k), float("-inf"), device=self.device)
            return scores, torch.full((n_queries, k), PAD_ROW, dtype=torch.int64, device=self.device)
        found_k = min(k, len(self.local_rows))
        scores_np, ids_np = faiss_index.search(self._faiss, queries.float().cpu().numpy(), found_k)  # (B, k')
        rows_np = np.where(ids_np >= 0, ids_np + start, PAD_ROW)
        if found_k < k:
            scores_np = np.pad(scores_np, ((0, 0), (0, k - found_k)), constant_values=-np.inf)
            rows_np = np.pad(rows_np, ((0, 0), (0, k - found_k)), constant_values=PAD_ROW)
        scores = torch.from_numpy(scores_np).to(self.device)  # (B, k)
        rows = torch.from_numpy(rows_np).to(self.device)  # (B, k)
        return sort_topk(scores, rows, k)  # faiss's order among equal scores is unspecified

    def passages(self, rows: torch.Tensor) -> list[list[dict]]:
        """Passage dicts for (B, k) global rows, read from the store; rows of -1 (no hit) are skipped."""
        return [[self.store.get(r) for r in line if r >= 0] for line in rows.tolist()]

    def save(self, path: str, n_shards: int = 128, dtype: str | None = None) -> None:
        """COLLECTIVE: save the index (and a link or copy of the passage store) to ``path``; see io.py's format.

        Flat: ``n_shards`` contiguous shards (any number, independent of the world size) in ``dtype`` ("float16"
        or "float32"; default the in-memory dtype). faiss: one file per rank; ``n_shards`` is unused.
        """
        if not self._ready:
            raise RuntimeError("cannot save an index without embeddings")
        if dtype is not None and dtype not in io.DTYPES:
            raise UserError(f"index dtype {dtype!r} is not one of {', '.join(io.DTYPES)}")
        if n_shards < 1:
            raise UserError(f"--save_index_n_shards must be at least 1, got {n_shards}")
        tmp, error = None, None
        if self.world.is_main:
            try:
                tmp = io.new_temp_dir(path)
            except OSError as e:
                error = f"cannot create a directory next to {path}: {e}"
        tmp, error = dist.broadcast_object((tmp, error))
        if error:
            raise UserError(f"saving the index to {path} failed: {error}")
        if self.world.is_main:
            try:
                io.link_or_copy_store(self.store, os.path.join(tmp, io.STORE_DIR))
            except OSError as e:
                error = f"copying the passage store into {tmp}: {e}"
        if self.mode == "flat":
            entries, local_error = self._save_flat_shards(tmp, n_shards, dtype)
        else:
            entries, local_error = self._save_faiss_file(tmp)
        gathered = dist.all_gather_object((error or local_error, entries))
        errors = [e for e, _ in gathered if e]
        if not errors and self.world.is_main:
            try:
                self._write_manifest(tmp, [entry for _, part in gathered for entry in part], dtype)
                io.publish(tmp, path)
            except OSError as e:
                errors.append(f"{e}")
        if self.world.is_main and errors:
            shutil.rmtree(tmp, ignore_errors=True)
        errors = dist.broadcast_object(errors)  # every rank returns only once the index is in place (or failed)
        if errors:
            raise UserError(f"saving the index to {path} failed: {errors[0]}")
        logger.info("saved index with %d passages to %s", len(self.store), path)

    def _write_manifest(self, directory: str, entries: list[dict], dtype: str | None) -> None:
        entries = sorted(entries, key=lambda entry: entry["start"])
        if self.mode == "flat":
            dtype = dtype or ("float16" if self.dtype == torch.float16 else "float32")
            embeddings, faiss = {"dtype": dtype, "shards": entries}, None
        else:
            embeddings = None
            faiss = {
                "index_type": self.faiss_index_type,
                "code_size": self.faiss_code_size,
                "world_size": self.world.world_size,
                "files": entries,
            }
        io.write_manifest(directory, io.make_manifest(self.dim, len(self.store), embeddings, faiss))

    def _save_flat_shards(self, tmp: str, n_shards: int, dtype: str | None) -> tuple[list[dict], str | None]:
        """Write the shards whose first row this rank holds; pieces held by other ranks arrive point-to-point.

        Every rank walks the shards in the same order, so each send meets its receive without deadlock. I/O errors
        are returned, not raised, so that the exchange still completes on every rank.
        """
        torch_dtype = getattr(torch, dtype) if dtype else self.dtype
        rank_ranges = io.block_ranges(len(self.store), self.world.world_size)
        mine = self.local_rows
        entries: list[dict] = []
        error = None
        for shard, (start, end) in enumerate(io.block_ranges(len(self.store), min(n_shards, len(self.store)))):
            holders = [r for r, (lo, hi) in enumerate(rank_ranges) if max(start, lo) < min(end, hi)]
            if self.world.rank not in holders:
                continue
            piece = self._embeddings[max(start, mine.start) - mine.start : min(end, mine.stop) - mine.start]
            piece = piece.to(torch_dtype)  # (rows of this shard held here, d)
            if self.world.rank != holders[0]:
                dist.send_tensor(piece, dst=holders[0])
                continue
            parts = [piece]
            for r in holders[1:]:
                n_rows = min(end, rank_ranges[r][1]) - max(start, rank_ranges[r][0])
                parts.append(dist.recv_tensor(piece.new_empty((n_rows, self.dim)), src=r))
            if error is None:
                try:
                    array = torch.cat(parts).cpu().numpy()  # (end - start, d)
                    entry = io.write_npy(array, os.path.join(tmp, f"embeddings.{shard:05d}.npy"))
                    entries.append({**entry, "start": start, "end": end})
                except OSError as e:
                    error = f"writing shard {shard} to {tmp}: {e}"
        return entries, error

    def _save_faiss_file(self, tmp: str) -> tuple[list[dict], str | None]:
        rows = {"start": self.local_rows.start, "end": self.local_rows.stop}
        if self._faiss is None:
            return [{"file": None, "bytes": 0, "crc32": 0, **rows}], None
        file_path = os.path.join(tmp, f"faiss.rank{self.world.rank:05d}.index")
        try:
            data = faiss_index.import_faiss().serialize_index(self._faiss).tobytes()
            return [{**io.write_bytes(data, file_path), **rows}], None
        except OSError as e:
            return [], f"writing {file_path}: {e}"

    @staticmethod
    def load(
        path: str,
        world: World,
        mode: str = "flat",
        faiss_index_type: str = "flat",
        faiss_code_size: int | None = None,
        faiss_nprobe: int | None = None,
    ) -> DistributedIndex:
        """COLLECTIVE: load an index saved by `save` (flat: under any world size; faiss: under the saving one).

        A flat-saved index can be loaded in faiss mode (the faiss index is then trained on the saved embeddings).
        UserError when ``path`` holds no complete index or a file is missing or corrupted (on every rank).
        """
        index, error = None, None
        try:
            index = _load_local(path, world, mode, faiss_index_type, faiss_code_size, faiss_nprobe)
        except UserError as e:
            error = str(e)
        errors = [e for e in dist.all_gather_object(error) if e]
        if errors:
            raise UserError(errors[0])
        assert index is not None
        logger.info("loaded index from %s: %d passages, %d on this rank", path, len(index), len(index.local_rows))
        return index


def _load_local(
    path: str, world: World, mode: str, index_type: str, code_size: int | None, nprobe: int | None
) -> DistributedIndex:
    manifest = io.read_manifest(path)
    store = io.open_store(path, manifest)
    saved = manifest["faiss"]
    if saved is None:
        index = DistributedIndex(store, manifest["dim"], world, mode, index_type, code_size, nprobe)
        dtype = np.float16 if index.dtype == torch.float16 else np.float32  # the index's in-memory dtype
        rows = io.read_rows(path, manifest, index.local_rows.start, index.local_rows.stop, dtype)  # (N_local, d)
        index.set_embeddings(torch.from_numpy(rows))
    else:
        if mode != "faiss":
            raise UserError(
                f"the index at {path} was saved in faiss mode ({saved['index_type']}) and holds no full embeddings: "
                "load it with --index_mode faiss, or rebuild a flat index"
            )
        if saved["world_size"] != world.world_size:
            raise UserError(
                f"the faiss index at {path} was saved by {saved['world_size']} processes and must be loaded by as many "
                f"(running {world.world_size}); flat indexes load under any world size"
            )
        if (index_type, code_size) != (saved["index_type"], saved["code_size"]):
            logger.warning("using the saved faiss type %s (code size %s)", saved["index_type"], saved["code_size"])
        index = DistributedIndex(
            store, manifest["dim"], world, "faiss", saved["index_type"], saved["code_size"], nprobe
        )
        entry = saved["files"][world.rank]
        if entry["file"] is not None:
            data = io.read_checked_bytes(path, entry)
            faiss = faiss_index.import_faiss()
            index._faiss = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))  # already the concrete type
            if index._faiss.ntotal != len(index.local_rows) or index._faiss.d != index.dim:
                raise UserError(f"faiss file {os.path.join(path, entry['file'])} does not match the manifest")
            faiss_index.set_nprobe(index._faiss, nprobe)
        index._ready = True
    index.source_path = path
    return index
