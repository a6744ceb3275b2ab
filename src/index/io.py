"""On-disk index format (``--save_index_path`` / ``--load_index_path``).

An index directory holds::

    index.json                   manifest, written last (its presence means the index is complete)
    passages/                    the passage store (see src/passages.py), hard-linked or copied from the live one
    embeddings.00000.npy ...     flat mode: shard i = rows [start_i, end_i) as a (n_i, d) float16/float32 .npy
    faiss.rank00000.index ...    faiss mode: one faiss index file per rank (faiss.write_index format)

``index.json``::

    {"format": "atlas-index", "version": 1, "mode": "flat" | "faiss", "dim": d, "n_passages": N,
     "passages": "passages",
     "embeddings": {"dtype": "float32", "shards": [{"file": ..., "start": 0, "end": n_0, "bytes": ..., "crc32": ...}]},
     "faiss": null | {"index_type": ..., "code_size": ..., "world_size": W,
                      "files": [{"file": ... | null, "start": ..., "end": ..., "bytes": ..., "crc32": ...}]},
     "retriever_layernorm": "uncentered" | "standard" | null}

``retriever_layernorm`` is the LayerNorm of the retriever that embedded the passages (null: not recorded, e.g. an
index saved before it was); a retriever of the other variant cannot search it.

Shards are contiguous blocks of rows ``[i*N//S, (i+1)*N//S)`` for S = min(n_shards, N), independent of the world
size; a loading rank reads only the shards that overlap its own rows, so any world size can load any flat index.
``crc32`` covers a shard's array data (``.npy``) or the whole file (faiss); ``bytes`` is the file size. Nothing needs
pickle to read: ``np.load(f, allow_pickle=False)`` and ``json.load`` suffice. A save writes everything into a
temporary sibling directory ``<path>.tmp-*`` and renames it to ``<path>`` after the manifest is written, so a killed
save never leaves a loadable-looking partial index (an older index at ``<path>`` is replaced only at that rename).
faiss files are per rank: loading them needs the world size that saved them.

`save_index` and `load_index` are the collective save/load of a `DistributedIndex`; the rest are file helpers
(also used by the legacy import).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid
import zlib
from typing import Any

import numpy as np
import torch

from src import distributed as dist
from src.config import IndexConfig
from src.distributed import World
from src.errors import UserError
from src.index import faiss_index
from src.index.distributed_index import DistributedIndex, block_ranges
from src.passages import PassageStore

logger = logging.getLogger(__name__)

FORMAT, VERSION = "atlas-index", 1
MANIFEST = "index.json"
STORE_DIR = "passages"
DTYPES = ("float16", "float32")


def new_temp_dir(path: str) -> str:
    """Create an empty temporary sibling of ``path`` (same filesystem, so the final rename is atomic)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))


def publish(tmp: str, path: str) -> None:
    """Move the finished ``tmp`` directory to ``path``, replacing an older index there."""
    path = os.path.abspath(path)
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy_store(store: PassageStore, directory: str) -> None:
    """Put the store's files in ``directory``: hard links when possible (the files are never modified), else copies."""
    os.makedirs(directory)
    for src in store.files():
        dst = os.path.join(directory, os.path.basename(src))
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def _data_crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # bytes of the data, any dtype


def write_npy(array: np.ndarray, path: str) -> dict[str, Any]:
    """Write ``array`` as .npy (fsynced); return its manifest entry without the row range."""
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "crc32": _data_crc(array)}


def write_bytes(data: bytes, path: str) -> dict[str, Any]:
    """Write raw bytes (a serialised faiss index); return its manifest entry without the row range."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return {"file": os.path.basename(path), "bytes": len(data), "crc32": zlib.crc32(data)}


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """Write index.json last (temp file + rename), after every file it lists is on disk."""
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, os.path.join(directory, MANIFEST))


def make_manifest(
    dim: int, n_passages: int, embeddings: dict | None, faiss: dict | None, retriever_layernorm: str | None = None
) -> dict[str, Any]:
    mode = "faiss" if faiss is not None else "flat"
    return {
        "format": FORMAT,
        "version": VERSION,
        "mode": mode,
        "dim": dim,
        "n_passages": n_passages,
        "passages": STORE_DIR,
        "embeddings": embeddings,
        "faiss": faiss,
        "retriever_layernorm": retriever_layernorm,
    }


def _check_tiling(entries: list[dict], n: int, where: str) -> None:
    position = 0
    for entry in entries:
        if entry["start"] != position or entry["end"] < entry["start"]:
            raise UserError(f"{where} is corrupted: shard row ranges do not cover 0..{n} in order")
        position = entry["end"]
    if position != n:
        raise UserError(f"{where} is corrupted: shard row ranges do not cover 0..{n} in order")


def read_manifest(path: str) -> dict[str, Any]:
    """Parse and check ``path/index.json``; UserError if ``path`` holds no (complete) index."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        if os.path.exists(os.path.join(path, "passages.0.pt")):
            raise UserError(
                f"{path} holds an original Atlas index (passages.*.pt): convert it first with "
                f"`python -m src.index.legacy {path} NEW_DIR` and load NEW_DIR"
            )
        raise UserError(f"no index at {path} (no {MANIFEST}; a save that was interrupted leaves none)")
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise UserError(f"{manifest_path} is not a version-{VERSION} {FORMAT} manifest")
        n = manifest["n_passages"]
        if manifest["embeddings"] is not None:
            if manifest["embeddings"]["dtype"] not in DTYPES:
                raise UserError(f"{manifest_path}: unsupported embedding dtype {manifest['embeddings']['dtype']}")
            _check_tiling(manifest["embeddings"]["shards"], n, manifest_path)
        if manifest["faiss"] is not None:
            _check_tiling(manifest["faiss"]["files"], n, manifest_path)
        if manifest["embeddings"] is None and manifest["faiss"] is None:
            raise UserError(f"{manifest_path} lists neither embeddings nor faiss files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{manifest_path} is unreadable or corrupted: {error!r}") from None
    return manifest


def _check_size(file_path: str, entry: dict) -> None:
    try:
        size = os.path.getsize(file_path)
    except OSError:
        raise UserError(f"index file {file_path} is missing") from None
    if size != entry["bytes"]:
        raise UserError(f"index file {file_path} is truncated or corrupted ({size} bytes, expected {entry['bytes']})")


def read_rows(
    path: str, manifest: dict[str, Any], start: int, end: int, dtype: np.dtype | str | None = None
) -> np.ndarray:
    """Embedding rows [start, end) as a (end - start, dim) array, reading only overlapping shards.

    `dtype` (default: the saved one) is the dtype of the result; shards are converted while they are copied in, so
    loading fp16 shards into an fp32 index makes one copy, not two. Each shard read is checked against its manifest
    size and CRC32; UserError names the bad file.
    """
    info = manifest["embeddings"]
    out = np.empty((end - start, manifest["dim"]), dtype=dtype or info["dtype"])  # (n_local, d)
    for entry in info["shards"]:
        lo, hi = max(start, entry["start"]), min(end, entry["end"])
        if lo >= hi:
            continue
        file_path = os.path.join(path, entry["file"])
        _check_size(file_path, entry)
        try:
            shard = np.load(file_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"index file {file_path} is corrupted: {error}") from None
        expected = (entry["end"] - entry["start"], manifest["dim"])
        if shard.shape != expected or shard.dtype != np.dtype(info["dtype"]):
            raise UserError(f"index file {file_path} holds {shard.dtype}{shard.shape}, expected {expected}")
        if _data_crc(shard) != entry["crc32"]:
            raise UserError(f"index file {file_path} is corrupted (checksum mismatch)")
        out[lo - start : hi - start] = shard[lo - entry["start"] : hi - entry["start"]]
    return out


def read_checked_bytes(path: str, entry: dict) -> bytes:
    """Whole file contents after checking its size and CRC32 against the manifest entry."""
    file_path = os.path.join(path, entry["file"])
    _check_size(file_path, entry)
    with open(file_path, "rb") as handle:
        data = handle.read()
    if zlib.crc32(data) != entry["crc32"]:
        raise UserError(f"index file {file_path} is corrupted (checksum mismatch)")
    return data


def open_store(path: str, manifest: dict[str, Any]) -> PassageStore:
    """Open the passage store saved with the index and check it has the manifest's passage count."""
    store = PassageStore.open(os.path.join(path, manifest["passages"]))
    if len(store) != manifest["n_passages"]:
        raise UserError(f"index at {path} is corrupted: {len(store)} passages, manifest says {manifest['n_passages']}")
    return store


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
    mine, local = index.local_rows, index.local_embeddings
    entries: list[dict] = []
    error = None
    for shard, (start, end) in enumerate(block_ranges(n, min(n_shards, n))):
        holders = [r for r, (lo, hi) in enumerate(rank_ranges) if max(start, lo) < min(end, hi)]
        if world.rank not in holders:
            continue
        piece = local[max(start, mine.start) - mine.start : min(end, mine.stop) - mine.start]
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
        dtype = np.float16 if index.dtype == torch.float16 else np.float32  # the index's in-memory dtype
        rows = read_rows(path, manifest, index.local_rows.start, index.local_rows.stop, dtype)  # (N_local, d)
        index.set_embeddings(torch.from_numpy(rows))
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
