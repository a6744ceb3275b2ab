"""The on-disk passage store: global row -> passage dict, read lazily.

A store is a directory holding three files, written into a temporary sibling directory and renamed into place:

- ``passages.jsonl``: one JSON object per line, the passage dicts in row order (the input lines, copied verbatim).
- ``offsets.npy``: int64 ``(N + 1,)`` byte offsets of each line in ``passages.jsonl`` (plain .npy, no pickle).
- ``store.json``: ``{"format": "atlas-passage-store", "version": 1, "n_passages": N, "data_bytes": ...}``.

Opening a store memory-maps both data files, so it costs O(1) Python memory however many passages it holds, and
every rank can open the same store. Rows are assigned in input order: file by file, line by line, skipping blank
lines, stopping after ``max_passages`` passages when that is not -1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from src.errors import UserError

if TYPE_CHECKING:
    from src.distributed import World

logger = logging.getLogger(__name__)

FORMAT = "atlas-passage-store"
VERSION = 1
DATA_FILE, OFFSETS_FILE, META_FILE = "passages.jsonl", "offsets.npy", "store.json"

# A record to store: the passage serialised as one JSON line, its parsed dict, and where it came from (source file
# and line or item number, for error messages).
Record = tuple[bytes, dict, str, int]


def passage_title(passage: dict) -> str:
    """The title shown to the models: ``"title: section"`` when the passage has a non-empty section, else title."""
    title = passage.get("title") or ""
    section = passage.get("section") or ""
    return f"{title}: {section}" if section else title


EMPTY_PASSAGE = {"id": "", "title": "", "text": ""}  # pads an example that has fewer than K passages


def format_passage(template: str, passage: dict, query: str = "") -> str:
    """Render a passage with `--encoder_format` / `--retriever_format`; the title becomes "title: section"."""
    return template.format(query=query, title=passage_title(passage), text=passage.get("text", ""))


def _read_jsonl_records(paths: Sequence[str]) -> Iterator[Record]:
    """Stream (line bytes, parsed dict, file, line) from jsonl files; UserError on unreadable or malformed lines."""
    for path in paths:
        try:
            with open(path, "rb") as handle:
                yield from _parse_lines(handle, path)
        except OSError as error:
            raise UserError(f"cannot read passages file {path}: {error.strerror}") from None


def _parse_lines(handle: Iterable[bytes], path: str) -> Iterator[Record]:
    for line_no, line in enumerate(handle, start=1):
        line = line.strip()
        if line_no == 1:
            line = line.removeprefix(b"\xef\xbb\xbf").strip()  # a UTF-8 byte-order mark some editors write
        if not line:
            continue
        try:
            passage = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path}:{line_no}: not valid JSON ({error})") from None
        yield line, passage, path, line_no


def _check_record(passage: Any, place: str) -> str:
    if not isinstance(passage, dict):
        raise UserError(f"{place}: a passage must be a JSON object, got {type(passage).__name__}")
    if "id" not in passage:
        raise UserError(f'{place}: passage has no "id" field')
    if "text" not in passage:
        raise UserError(f'{place}: passage has no "text" field')
    return str(passage["id"])


def _id_hash(passage_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _find_duplicate(hashes: np.ndarray, place: Callable[[int], str], ids: Iterable[tuple[int, str]]) -> None:
    """Raise UserError naming both places of a duplicated id. ``hashes`` holds one 64-bit id hash per row.

    Sorting hashes finds candidate pairs in O(N log N) time and 8 bytes per passage, instead of a set of every id.
    """
    order = np.argsort(hashes, kind="stable")  # (N,)
    same = np.nonzero(hashes[order[1:]] == hashes[order[:-1]])[0]
    if len(same) == 0:
        return
    candidates = {int(r) for i in same for r in (order[i], order[i + 1])}
    seen: dict[str, int] = {}
    for row, passage_id in ids:  # second pass over the ids of candidate rows only: hashes may collide
        if row in candidates:
            if passage_id in seen:
                raise UserError(
                    f"duplicate passage id {passage_id!r}: {place(seen[passage_id])} and {place(row)}"
                    " (passage ids must be unique)"
                )
            seen[passage_id] = row


class PassageStore:
    """Read-only on-disk passage store; row i (0..N-1, the global passage row) -> passage dict.

    Opening it memory-maps an int64 offset array and a JSON-lines blob: no Python list of passages is built.
    """

    def __init__(self, directory: str, offsets: np.ndarray, data_path: str):
        self.directory = directory
        self._offsets = offsets  # (N + 1,) int64, memory-mapped
        self._data_path = data_path
        with open(data_path, "rb") as handle:
            self._data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    @staticmethod
    def build(jsonl_paths: Sequence[str], directory: str, max_passages: int = -1) -> PassageStore:
        """Build a store at ``directory`` from jsonl files (streamed; atomic: written to a temp dir, then renamed)."""
        if isinstance(jsonl_paths, str):
            jsonl_paths = [jsonl_paths]
        if not jsonl_paths:
            raise UserError("no passage files given (--passages)")
        return PassageStore.build_from_records(_read_jsonl_records(jsonl_paths), directory, max_passages)

    @staticmethod
    def build_from_records(records: Iterable[Record], directory: str, max_passages: int = -1) -> PassageStore:
        """Build a store from (json line bytes, parsed dict, source, line) records; see `build`."""
        directory = os.path.abspath(directory)
        if os.path.exists(directory):
            raise UserError(f"cannot build a passage store at {directory}: the path already exists")
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
        try:
            n, data_bytes, crc = _write_store_files(records, tmp, max_passages)
            meta = {"format": FORMAT, "version": VERSION, "n_passages": n, "data_bytes": data_bytes, "crc32": crc}
            with open(os.path.join(tmp, META_FILE), "w") as handle:
                json.dump(meta, handle)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.rename(tmp, directory)  # atomic: a killed build leaves only the temp dir, which `open` refuses
            except OSError as error:
                raise UserError(f"cannot build a passage store at {directory}: {error.strerror}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built passage store %s with %d passages", directory, n)
        return PassageStore.open(directory)

    @staticmethod
    def open(directory: str) -> PassageStore:
        """Open a store built by `build`; UserError if ``directory`` is not a store or its files do not match."""
        meta_path = os.path.join(directory, META_FILE)
        try:
            with open(meta_path) as handle:
                meta = json.load(handle)
        except FileNotFoundError:
            raise UserError(f"{directory} is not a passage store (no {META_FILE})") from None
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{meta_path} is unreadable or corrupted: {error}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise UserError(f"{meta_path} does not describe a version-{VERSION} passage store")
        data_path, offsets_path = os.path.join(directory, DATA_FILE), os.path.join(directory, OFFSETS_FILE)
        try:
            offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
            data_size = os.path.getsize(data_path)
        except (OSError, ValueError) as error:
            raise UserError(f"passage store {directory} is corrupted: {error}") from None
        n = meta["n_passages"]
        if offsets.shape != (n + 1,) or offsets.dtype != np.int64 or int(offsets[-1]) != data_size:
            raise UserError(f"passage store {directory} is corrupted: {OFFSETS_FILE} does not match {DATA_FILE}")
        if data_size != meta["data_bytes"]:
            raise UserError(f"passage store {directory} is corrupted: {DATA_FILE} has the wrong size")
        return PassageStore(directory, offsets, data_path)

    @staticmethod
    def build_or_open(jsonl_paths: Sequence[str], cache_root: str, max_passages: int, world: World) -> PassageStore:
        """Open the cached store for these files, building it on rank 0 first if needed (collective).

        The cache key covers the absolute paths, sizes and modification times of the files and ``max_passages``,
        so editing a passage file makes a new store.
        """
        from src.distributed import broadcast_object

        if isinstance(jsonl_paths, str):
            jsonl_paths = [jsonl_paths]
        key_parts = [str(max_passages)]
        for path in jsonl_paths:
            try:
                stat = os.stat(path)
            except OSError as error:
                raise UserError(f"cannot read passages file {path}: {error.strerror}") from None
            key_parts.append(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}")
        key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:20]
        directory = os.path.join(cache_root, f"passages-{key}")
        error = None
        if world.is_main:
            try:
                if not os.path.exists(os.path.join(directory, META_FILE)):
                    logger.info("building passage store cache %s from %d file(s)", directory, len(jsonl_paths))
                    _build_tolerating_race(jsonl_paths, directory, max_passages)
            except UserError as e:
                error = str(e)
        error = broadcast_object(error)  # also the barrier: other ranks open only once rank 0 is done
        if error:
            raise UserError(error)
        return PassageStore.open(directory)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, row: int) -> dict:
        """The passage dict at global row ``row`` (0 <= row < len(self))."""
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"passage row {row} out of range [0, {len(self)})")
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        try:
            return json.loads(self._data[start:end])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"passage store {self.directory} is corrupted at row {row}: {error}") from None

    def get_many(self, rows: Sequence[int]) -> list[dict]:
        """Passage dicts for the given rows, in the given order."""
        return [self.get(row) for row in rows]

    def files(self) -> list[str]:
        """The files making up this store (for copying it next to a saved index)."""
        return [os.path.join(self.directory, name) for name in (DATA_FILE, OFFSETS_FILE, META_FILE)]

    def __getstate__(self) -> dict:
        # mmap objects cannot be pickled (e.g. into DataLoader workers): pickle the directory and reopen.
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        other = PassageStore.open(state["directory"])
        self.__dict__.update(other.__dict__)


def _build_tolerating_race(jsonl_paths: Sequence[str], directory: str, max_passages: int) -> None:
    # Two jobs sharing a cache may build the same store at once; whichever renames second keeps the winner's.
    try:
        PassageStore.build(jsonl_paths, directory, max_passages)
    except UserError:
        if not os.path.exists(os.path.join(directory, META_FILE)):
            raise


class _RowLog:
    """Per-row int64 columns (offset, id hash, source, line) spilled to disk in blocks, so memory stays O(block)."""

    def __init__(self, directory: str, names: Sequence[str], block: int = 65536):
        self.paths = {name: os.path.join(directory, f"{name}.bin") for name in names}
        # Closed in close(); a with-block does not fit a buffer that outlives one statement.
        self.handles = {name: open(path, "wb") for name, path in self.paths.items()}  # noqa: SIM115
        self.buffers: dict[str, list[int]] = {name: [] for name in names}
        self.block = block

    def append(self, **values: int) -> None:
        for name, value in values.items():
            self.buffers[name].append(value)
        if len(self.buffers[name]) >= self.block:
            self.flush()

    def flush(self) -> None:
        for name, buffer in self.buffers.items():
            if buffer:
                self.handles[name].write(np.asarray(buffer, dtype=np.int64).tobytes())
                buffer.clear()

    def read(self, name: str) -> np.ndarray:
        """The whole column as a read-only memory map (flushes first)."""
        self.flush()
        self.handles[name].flush()
        if os.path.getsize(self.paths[name]) == 0:
            return np.zeros(0, np.int64)
        return np.memmap(self.paths[name], dtype=np.int64, mode="r")

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        for path in self.paths.values():
            os.remove(path)


def _write_store_files(records: Iterable[Record], tmp: str, max_passages: int) -> tuple[int, int, int]:
    """Write passages.jsonl and offsets.npy into ``tmp``; return (n_passages, data bytes, crc32 of the data)."""
    log = _RowLog(tmp, ["offset", "hash", "source", "line"])
    sources: dict[str, int] = {}  # source file -> index; per-row (source, line) lets errors name both duplicates
    n, position, crc = 0, 0, 0
    try:
        with open(os.path.join(tmp, DATA_FILE), "wb") as data:
            log.append(offset=0)
            for line, passage, source, line_no in records:
                if max_passages != -1 and n >= max_passages:
                    break
                passage_id = _check_record(passage, f"{source}:{line_no}")
                line = line.rstrip(b"\r\n") + b"\n"
                data.write(line)
                crc = zlib.crc32(line, crc)
                position += len(line)
                source_index = sources.setdefault(source, len(sources))
                log.append(offset=position, hash=_id_hash(passage_id), source=source_index, line=line_no)
                n += 1
            data.flush()
            os.fsync(data.fileno())
        if n == 0:
            raise UserError("the passage files hold no passages (or --max_passages is 0)")
        names = list(sources)
        row_source, row_line = log.read("source"), log.read("line")
        _find_duplicate(
            log.read("hash"),
            lambda row: f"{names[row_source[row]]}:{row_line[row]}",
            _iter_ids(os.path.join(tmp, DATA_FILE)),
        )
        np.save(os.path.join(tmp, OFFSETS_FILE), np.asarray(log.read("offset")), allow_pickle=False)
    finally:
        log.close()
    return n, position, crc


def _iter_ids(data_path: str) -> Iterator[tuple[int, str]]:
    with open(data_path, "rb") as handle:
        for row, line in enumerate(handle):
            yield row, str(json.loads(line)["id"])
