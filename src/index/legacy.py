"""Convert an index saved by the original Atlas code into our format (see io.py).

The original layout is ``passages.{i}.pt`` (a pickle of a list of passage dicts) plus ``embeddings.{i}.pt``
(``torch.save`` of an fp16 (d, n_i) tensor) for i = 0..S-1. Shard i becomes rows
``[n_0 + ... + n_{i-1}, ... + n_i)`` of the new store and the embedding file ``embeddings.{i:05d}.npy`` (n_i, d),
kept in its saved precision. The passage pickles are read by an unpickler that refuses every global (no code can
run); embeddings are read with ``torch.load(weights_only=True)``. The original saved passages after rewriting
``title`` to ``"title: section"``; that suffix is removed again, since our store keeps raw passages and
`src.passages.passage_title` adds the section when formatting.

CLI: ``python -m src.index.legacy SRC_DIR DST_DIR`` (also ``preprocessing/convert_atlas_index.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from src.errors import UserError
from src.index import files
from src.passages import PassageStore, Record

logger = logging.getLogger(__name__)


class PlainUnpickler(pickle.Unpickler):
    """Unpickles only lists, dicts, tuples, strings, numbers, booleans and None: every global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it references {module}.{name}; only plain lists/dicts/strings/numbers load")


def load_plain_pickle(path: str) -> Any:
    """Load a pickle (or a torch zip file) holding only plain data; UserError naming ``path`` otherwise."""
    try:
        with open(path, "rb") as handle:
            if handle.read(2) == b"PK":  # torch.save zip container: its own restricted loader
                return torch.load(path, weights_only=True, map_location="cpu")
            handle.seek(0)
            return PlainUnpickler(handle).load()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    except pickle.UnpicklingError as error:
        raise UserError(f"refusing to load {path}: {error}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, RuntimeError) as error:
        raise UserError(f"{path} is truncated or not a passage pickle: {error!r}") from None


def legacy_shard_ids(src_dir: str) -> list[int]:
    """Shard numbers 0..S-1 of an original index; UserError if a passages/embeddings file is missing."""
    try:
        names = os.listdir(src_dir)
    except OSError as error:
        raise UserError(f"cannot read the original index directory {src_dir}: {error.strerror}") from None
    ids = sorted(int(m.group(1)) for name in names if (m := re.fullmatch(r"passages\.(\d+)\.pt", name)))
    if not ids:
        raise UserError(f"{src_dir} holds no passages.{{i}}.pt files: it is not an original Atlas index")
    for i in range(ids[-1] + 1):
        for kind in ("passages", "embeddings"):
            if not os.path.exists(os.path.join(src_dir, f"{kind}.{i}.pt")):
                raise UserError(f"original index {src_dir} is incomplete: {kind}.{i}.pt is missing")
    return list(range(ids[-1] + 1))


def _raw_title(passage: Any) -> Any:
    """Undo the original loader's in-place ``title = f"{title}: {section}"`` (it saved passages after it)."""
    if isinstance(passage, dict) and isinstance(passage.get("title"), str) and passage.get("section"):
        suffix = f": {passage['section']}"
        if passage["title"].endswith(suffix):
            passage = {**passage, "title": passage["title"][: -len(suffix)]}
    return passage


def _passage_records(src_dir: str, shard_ids: list[int], counts: list[int]) -> Iterator[Record]:
    """Stream passages shard by shard (one shard in memory at a time), appending each shard's size to ``counts``."""
    for i in shard_ids:
        path = os.path.join(src_dir, f"passages.{i}.pt")
        passages = load_plain_pickle(path)
        if not isinstance(passages, list):
            raise UserError(f"{path} holds a {type(passages).__name__}, expected a list of passage dicts")
        counts.append(len(passages))
        for item, passage in enumerate(passages):
            passage = _raw_title(passage)
            try:
                line = json.dumps(passage, ensure_ascii=False).encode("utf-8")
            except (TypeError, ValueError) as error:
                raise UserError(f"{path}: passage {item} is not JSON-serialisable ({error})") from None
            yield line, passage, path, item


def _load_embeddings(path: str, count: int) -> np.ndarray:
    try:
        tensor = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises many types for bad files; all mean "not a plain tensor file"
        raise UserError(f"cannot load {path} as a tensor file: {error!r}") from None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[1] != count:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise UserError(f"{path} holds {shape}, expected a (dim, {count}) tensor matching its passages file")
    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.float()
    return tensor.t().contiguous().numpy()  # (d, n) -> (n, d); contiguous() also drops a pre-PR-#23 oversized storage


def import_legacy_index(src_dir: str, dst_dir: str) -> None:
    """Convert the original Atlas index in ``src_dir`` into a new index directory ``dst_dir`` (atomic)."""
    shard_ids = legacy_shard_ids(src_dir)
    if os.path.exists(dst_dir):
        raise UserError(f"{dst_dir} already exists: choose a new directory for the converted index")
    tmp = files.new_temp_dir(dst_dir)
    try:
        counts: list[int] = []
        store = PassageStore.build_from_records(
            _passage_records(src_dir, shard_ids, counts), os.path.join(tmp, files.STORE_DIR)
        )
        entries, start, dim, dtypes = [], 0, None, set()
        for i, count in zip(shard_ids, counts):
            array = _load_embeddings(os.path.join(src_dir, f"embeddings.{i}.pt"), count)  # (n_i, d)
            if dim is not None and array.shape[1] != dim:
                raise UserError(f"embeddings.{i}.pt has dimension {array.shape[1]}, earlier shards {dim}")
            dim = array.shape[1]
            dtypes.add(str(array.dtype))
            entry = files.write_npy(array, os.path.join(tmp, f"embeddings.{i:05d}.npy"))
            entries.append({**entry, "start": start, "end": start + count})
            start += count
            logger.info("converted shard %d/%d (%d passages)", i + 1, len(shard_ids), count)
        if len(dtypes) > 1:
            raise UserError(f"the embedding files of {src_dir} mix dtypes {sorted(dtypes)}")
        embeddings = {"dtype": dtypes.pop(), "shards": entries}
        # the original's retriever computed every released index with its uncentered LayerNorm (ATLAS_REFERENCE 2.4)
        files.write_manifest(tmp, files.make_manifest(dim, len(store), embeddings, None, "uncentered"))
        files.publish(tmp, dst_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s -> %s: %d passages, dim %d, %d shards", src_dir, dst_dir, start, dim, len(entries))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints a UserError as one line and returns 2."""
    parser = argparse.ArgumentParser(description="Convert an original Atlas index (passages.*.pt, embeddings.*.pt).")
    parser.add_argument("src_dir", help="directory of the original index (e.g. indices/atlas/wiki/base)")
    parser.add_argument("dst_dir", help="new directory to write; pass it to --load_index_path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        import_legacy_index(args.src_dir, args.dst_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
