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

This module is the format: the manifest, shard files and checked reads (also used by the legacy import);
`src.index.io` holds the collective `save_index` / `load_index` of a `DistributedIndex`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from src.errors import UserError
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


LOAD_THREADS: int | None = None  # threads reading shards; None: the usable cores, at most 8 (memory bandwidth)
CHUNK_BYTES = 1 << 20  # copied then checksummed at a time: the CRC reads the bytes while the copy left them in cache
# torch runs an elementwise copy on one thread below this many elements (at::internal::GRAIN_SIZE); larger ones start
# an OpenMP team per call, measured up to 10x slower per chunk on a busy 2-core machine.
_SERIAL_ELEMENTS = 32768
# np.load parses the .npy header with ast.literal_eval, which raises SystemError ("AST constructor recursion depth
# mismatch") when two threads parse at once on some CPython versions (3.11.7 here); opening a shard is microseconds.
_HEADER_LOCK = threading.Lock()


def read_rows(
    path: str, manifest: dict[str, Any], start: int, end: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Embedding rows [start, end) as a (end - start, dim) CPU tensor, reading only overlapping shards.

    `dtype` (default: the saved one) is the dtype of the result. Each shard is memory-mapped and streamed in
    `CHUNK_BYTES` pieces straight into the result, converted on the way (one copy), and every piece is CRC32'd right
    after it is copied, so the check adds no second pass over the data. Shards are read by a small thread pool
    (`LOAD_THREADS`; copies and CRCs release the GIL). Each shard is checked against its manifest size, header and
    CRC32; UserError names the bad file (the first in row order when several are bad).
    """
    dtype = dtype or getattr(torch, manifest["embeddings"]["dtype"])
    out = torch.empty((end - start, manifest["dim"]), dtype=dtype)  # (n_local, d)
    _for_each_shard(path, manifest, start, end, lambda *shard_rows: _copy_shard(*shard_rows, out, start))
    return out


def map_rows(path: str, manifest: dict[str, Any], start: int, end: int) -> list[torch.Tensor]:
    """Embedding rows [start, end) as row blocks, one per overlapping shard, in row order: (n_i, dim) CPU tensors in
    the saved dtype that are views of the memory-mapped shard files (nothing copied into process memory).

    The files are mapped copy-on-write (a write to a block stays private; the files are never modified), so the
    pages are the page cache's, shared by every process of the node. Each whole shard is CRC32-checked (on the
    same thread pool as `read_rows`) before the blocks are returned; UserError names the bad file.
    """
    blocks: dict[int, torch.Tensor] = {}

    def keep(entry: dict, shard: np.ndarray, lo: int, hi: int) -> int:
        blocks[entry["start"]] = torch.from_numpy(shard[lo:hi])
        return zlib.crc32(shard)  # one call over the mapping: it releases the GIL

    _for_each_shard(path, manifest, start, end, keep)
    return [blocks[first] for first in sorted(blocks)]


def _for_each_shard(path: str, manifest: dict[str, Any], start: int, end: int, visit) -> None:
    """Open every shard overlapping rows [start, end) and call ``visit(entry, shard, lo, hi)`` with the mapped (n_i,
    d) array and the shard rows [lo, hi) that fall in the range; it returns the whole shard's CRC32, checked here.
    Shards are visited by a small thread pool (`LOAD_THREADS`); the error raised is the first bad shard's in row
    order."""
    shards = manifest["embeddings"]["shards"]
    entries = [entry for entry in shards if max(start, entry["start"]) < min(end, entry["end"])]

    def one(entry: dict) -> None:
        shard = _open_shard(path, manifest, entry)
        lo, hi = max(start, entry["start"]) - entry["start"], min(end, entry["end"]) - entry["start"]
        if visit(entry, shard, lo, hi) != entry["crc32"]:
            raise UserError(f"index file {os.path.join(path, entry['file'])} is corrupted (checksum mismatch)")

    threads = min(len(entries), LOAD_THREADS or min(8, _usable_cores()))
    if threads <= 1:
        for entry in entries:
            one(entry)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="index-load") as pool:
        futures = [pool.submit(one, entry) for entry in entries]
        try:
            for future in futures:  # in row order, so the error named is the one a serial read would give
                future.result()
        except BaseException:
            for future in futures:  # do not read the remaining gigabytes of an index that failed to load
                future.cancel()
            raise


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on (taskset, cgroups, srun)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _open_shard(path: str, manifest: dict[str, Any], entry: dict) -> np.ndarray:
    """The shard's (n_i, d) array, memory-mapped copy-on-write, after checking its size, header, shape and dtype."""
    file_path = os.path.join(path, entry["file"])
    _check_size(file_path, entry)
    try:
        # "c" (copy-on-write, never written) gives a writable view, which torch.from_numpy accepts without a warning.
        with _HEADER_LOCK:
            shard = np.asarray(np.load(file_path, mmap_mode="c", allow_pickle=False))  # (n_i, d), read on demand
    except (OSError, ValueError) as error:
        raise UserError(f"index file {file_path} is corrupted: {error}") from None
    expected = (entry["end"] - entry["start"], manifest["dim"])
    if shard.shape != expected or shard.dtype != np.dtype(manifest["embeddings"]["dtype"]):
        raise UserError(f"index file {file_path} holds {shard.dtype}{shard.shape}, expected {expected}")
    return shard


def _copy_shard(entry: dict, shard: np.ndarray, lo: int, hi: int, out: torch.Tensor, start: int) -> int:
    """Copy shard rows [lo, hi) into ``out`` (global rows [start, start + len(out))) and return the whole shard's
    CRC32, computed chunk by chunk in the same pass."""
    step = max(1, CHUNK_BYTES // max(1, shard.strides[0]))  # rows per chunk
    offset = entry["start"] - start  # shard row -> row of `out`
    crc = 0
    for first in range(0, len(shard), step):
        last = min(first + step, len(shard))
        if max(first, lo) < min(last, hi):
            rows = slice(max(first, lo), min(last, hi))  # shard rows of this chunk that this rank keeps
            _copy_rows(out[rows.start + offset : rows.stop + offset], shard[rows])
        crc = zlib.crc32(shard[first:last], crc)  # the chunk is still in cache from the copy
    return crc


def _copy_rows(dst: torch.Tensor, src: np.ndarray) -> None:
    """dst[:] = src for a CPU tensor and a (rows, d) array, converting the dtype (round to nearest even)."""
    if src.dtype == dst.numpy().dtype:
        np.copyto(dst.numpy(), src)  # a memcpy that releases the GIL
        return
    source = torch.from_numpy(src)
    rows = max(1, _SERIAL_ELEMENTS // max(1, src.shape[1]))  # numpy converts float16 ~3x slower than torch
    for first in range(0, len(src), rows):
        dst[first : first + rows].copy_(source[first : first + rows])


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
