"""Collective save and load of a `DistributedIndex` (``--save_index_path`` / ``--load_index_path``).

The on-disk format (``index.json`` manifest, passage store, ``embeddings.*.npy`` shards or per-rank faiss files) and
its checked reads are `src.index.files`; here every rank writes or reads its part and errors reach every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import numpy as np
import torch

from src import distributed as dist
from src.config import IndexConfig
from src.distributed import World
from src.errors import UserError
from src.index import faiss_index
from src.index.distributed_index import DistributedIndex, block_ranges
from src.index.files import (
    DTYPES,
    STORE_DIR,
    link_or_copy_store,
    make_manifest,
    map_rows,
    new_temp_dir,
    open_store,
    publish,
    read_checked_bytes,
    read_manifest,
    read_rows,
    write_bytes,
    write_manifest,
    write_npy,
)

logger = logging.getLogger(__name__)


def save_index(index: DistributedIndex, path: str, n_shards: int = 128, dtype: str | None = None) -> None:
    """COLLECTIVE: save the index (and a link or copy of the passage store) to ``path`` in the format above.

    Flat: ``n_shards`` contiguous shards (any number, independent of the world size) in ``dtype`` ("float16" or
    "float32"; default the in-memory dtype). faiss: one file per rank; ``n_shards`` is unused.
    """
    if not index.is_ready:
        raise RuntimeError("cannot save an index without embeddings")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"index dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if n_shards < 1:
        raise UserError(f"--save_index_n_shards must be at least 1, got {n_shards}")
    world = index.world
    tmp, error = None, None
    if world.is_main:
        try:
            tmp = new_temp_dir(path)
        except OSError as e:
            error = f"cannot create a directory next to {path}: {e}"
    tmp, error = dist.broadcast_object((tmp, error))
    if error:
        raise UserError(f"saving the index to {path} failed: {error}")
    if world.is_main:
        try:
            link_or_copy_store(index.store, os.path.join(tmp, STORE_DIR))
        except OSError as e:
            error = f"copying the passage store into {tmp}: {e}"
    if index.mode == "flat":
        entries, local_error = _save_flat_shards(index, tmp, n_shards, dtype)
    else:
        entries, local_error = _save_faiss_file(index, tmp)
    gathered = dist.all_gather_object((error or local_error, entries))
    errors = [e for e, _ in gathered if e]
    if not errors and world.is_main:
        try:
            _write_index_manifest(index, tmp, [entry for _, part in gathered for entry in part], dtype)
            publish(tmp, path)
        except OSError as e:
            errors.append(f"{e}")
    if world.is_main and errors:
        shutil.rmtree(tmp, ignore_errors=True)
    errors = dist.broadcast_object(errors)  # every rank returns only once the index is in place (or failed)
    if errors:
        raise UserError(f"saving the index to {path} failed: {errors[0]}")
    logger.info("saved index with %d passages to %s", len(index.store), path)


def _write_index_manifest(index: DistributedIndex, directory: str, entries: list[dict], dtype: str | None) -> None:
    entries = sorted(entries, key=lambda entry: entry["start"])
    if index.mode == "flat":
        dtype = dtype or ("float16" if index.dtype == torch.float16 else "float32")
        embeddings, faiss = {"dtype": dtype, "shards": entries}, None
    else:
        embeddings = None
        faiss = {
            "index_type": index.cfg.faiss_index_type,
            "code_size": index.cfg.faiss_code_size,
            "world_size": index.world.world_size,
            "files": entries,
        }
    manifest = make_manifest(index.dim, len(index.store), embeddings, faiss, index.retriever_layernorm)
    write_manifest(directory, manifest)


def _save_flat_shards(
    index: DistributedIndex, tmp: str, n_shards: int, dtype: str | None
) -> tuple[list[dict], str | None]:
    """Write the shards whose first row this rank holds; pieces held by other ranks arrive point-to-point.

    Every rank walks the shards in the same order, so each send meets its receive without deadlock. I/O errors are
    returned, not raised, so that the exchange still completes on every rank.
    """
    torch_dtype = getattr(torch, dtype) if dtype else index.dtype
    world, n = index.world, len(index.store)
    rank_ranges = block_ranges(n, world.world_size)
    mine = index.local_rows
    entries: list[dict] = []
    error = None
    for shard, (start, end) in enumerate(block_ranges(n, min(n_shards, n))):
        holders = [r for r, (lo, hi) in enumerate(rank_ranges) if max(start, lo) < min(end, hi)]
        if world.rank not in holders:
            continue
        piece = index.embedding_rows(max(start, mine.start) - mine.start, min(end, mine.stop) - mine.start)
        piece = piece.to(torch_dtype)  # (rows of this shard held here, d)
        if world.rank != holders[0]:
            dist.send_tensor(piece, dst=holders[0])
            continue
        parts = [piece]
        for r in holders[1:]:
            n_rows = min(end, rank_ranges[r][1]) - max(start, rank_ranges[r][0])
            parts.append(dist.recv_tensor(piece.new_empty((n_rows, index.dim)), src=r))
        if error is None:
            try:
                array = torch.cat(parts).cpu().numpy()  # (end - start, d)
                entry = write_npy(array, os.path.join(tmp, f"embeddings.{shard:05d}.npy"))
                entries.append({**entry, "start": start, "end": end})
            except OSError as e:
                error = f"writing shard {shard} to {tmp}: {e}"
    return entries, error


def _save_faiss_file(index: DistributedIndex, tmp: str) -> tuple[list[dict], str | None]:
    rows = {"start": index.local_rows.start, "end": index.local_rows.stop}
    if index.local_faiss is None:
        return [{"file": None, "bytes": 0, "crc32": 0, **rows}], None
    file_path = os.path.join(tmp, f"faiss.rank{index.world.rank:05d}.index")
    try:
        data = faiss_index.import_faiss().serialize_index(index.local_faiss).tobytes()
        return [{**write_bytes(data, file_path), **rows}], None
    except OSError as e:
        return [], f"writing {file_path}: {e}"


def load_index(path: str, world: World, cfg: IndexConfig = IndexConfig()) -> DistributedIndex:
    """COLLECTIVE: load an index saved by `save_index` (flat: under any world size; faiss: under the saving one).

    A flat-saved index can be loaded in faiss mode (the faiss index is then trained on the saved embeddings).
    UserError when ``path`` holds no complete index or a file is missing or corrupted (on every rank).
    """
    index, error = None, None
    try:
        index = _load_local(path, world, cfg)
    except UserError as e:
        error = str(e)
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise UserError(errors[0])
    assert index is not None
    logger.info("loaded index from %s: %d passages, %d on this rank", path, len(index), len(index.local_rows))
    return index


def _load_local(path: str, world: World, cfg: IndexConfig) -> DistributedIndex:
    manifest = read_manifest(path)
    store = open_store(path, manifest)
    saved = manifest["faiss"]
    if saved is None:
        index = DistributedIndex(store, manifest["dim"], world, cfg, source_path=path)
        start, end = index.local_rows.start, index.local_rows.stop
        if index.device.type != "cpu" or index.dtype == getattr(torch, manifest["embeddings"]["dtype"]):
            # CPU: searched in place (views of the files); CUDA: each mapped shard is copied into the device matrix
            index.set_embeddings(map_rows(path, manifest, start, end))
        else:  # fp16 shards for a CPU index: converted to fp32 as they are read (one copy, CRC in the same pass)
            index.set_embeddings(read_rows(path, manifest, start, end, index.dtype))  # (N_local, d)
        index.retriever_layernorm = manifest.get("retriever_layernorm")
        return index
    if cfg.mode != "faiss":
        raise UserError(
            f"the index at {path} was saved in faiss mode ({saved['index_type']}) and holds no full embeddings: "
            "load it with --index_mode faiss, or rebuild a flat index"
        )
    if saved["world_size"] != world.world_size:
        raise UserError(
            f"the faiss index at {path} was saved by {saved['world_size']} processes and must be loaded by as many "
            f"(running {world.world_size}); flat indexes load under any world size"
        )
    if (cfg.faiss_index_type, cfg.faiss_code_size) != (saved["index_type"], saved["code_size"]):
        logger.warning("using the saved faiss type %s (code size %s)", saved["index_type"], saved["code_size"])
    saved_cfg = dataclasses.replace(cfg, faiss_index_type=saved["index_type"], faiss_code_size=saved["code_size"])
    index = DistributedIndex(store, manifest["dim"], world, saved_cfg, source_path=path)
    entry = saved["files"][world.rank]
    faiss_object = None
    if entry["file"] is not None:
        data = read_checked_bytes(path, entry)
        faiss_object = faiss_index.import_faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if faiss_object.ntotal != len(index.local_rows) or faiss_object.d != index.dim:
            raise UserError(f"faiss file {os.path.join(path, entry['file'])} does not match the manifest")
    index.set_faiss(faiss_object)
    index.retriever_layernorm = manifest.get("retriever_layernorm")
    return index
