"""Helpers shared by the preprocessing scripts: atomic, resumable downloads (urllib only) and jsonl/tar I/O.

A download goes to ``<target>.part`` and is renamed to ``<target>`` only once complete, so a final file on disk is
always whole; an existing final file is never fetched again. An interrupted download keeps its ``.part`` file and the
next run asks the server for the remaining bytes (HTTP Range); servers that ignore Range just send the whole file
again. Network and HTTP failures end the script with one line naming the URL (``SystemExit``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

BASE_URL = "https://dl.fbaipublicfiles.com/atlas"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60


def get_s3_path(path: str) -> str:
    """URL of a file of the Atlas release, e.g. ``models/atlas/base/model.pth.tar``."""
    return f"{BASE_URL}/{path}"


def get_download_path(output_dir: str, path: str) -> str:
    """Local path of a release file: the release layout is mirrored under ``output_dir``."""
    return os.path.join(output_dir, path)


class _Progress:
    """A one-line progress display on stderr (only when stderr is a terminal, so logs stay readable)."""

    def __init__(self, name: str, done: int, total: int | None) -> None:
        self.name, self.done, self.total = name, done, total
        self.start, self.last = time.monotonic(), 0.0
        self.start_bytes = done
        self.live = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and now - self.last >= 0.5:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = (self.done - self.start_bytes) / max(now - self.start, 1e-6) / 1e6
        size = f"{self.done / 1e6:,.1f}"
        if self.total:
            size += f"/{self.total / 1e6:,.1f} MB ({100 * self.done / self.total:5.1f}%)"
        else:
            size += " MB"
        sys.stderr.write(f"\r  {self.name}: {size} {rate:,.1f} MB/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
        else:  # logs get one summary line instead of the live display
            sys.stderr.write(f"  {self.name}: {self.done / 1e6:,.1f} MB\n")


def _fail(url: str, error: BaseException) -> SystemExit:
    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        reason = str(error.reason)
    else:
        reason = f"{type(error).__name__}: {error}"
    return SystemExit(f"error: could not download {url}: {reason} (rerun to retry; partial downloads resume)")


def _open(url: str, offset: int) -> tuple[Any, int]:
    """Open ``url`` asking for bytes from ``offset``; return the response and the offset the body starts at."""
    request = urllib.request.Request(url, headers={"User-Agent": "atlas-preprocessing"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # our .part is already complete (or bigger than the file): start over
            error.close()
            return _open(url, 0)
        raise
    # 206 means the server honoured the Range; anything else (200, or None for file:// URLs) is the whole body.
    return response, offset if getattr(response, "status", None) == 206 else 0


def _total_size(response: Any, start: int) -> int | None:
    length = response.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def download(url: str, target: str) -> str:
    """Download ``url`` to ``target`` via ``target + '.part'`` (resuming it if present); return ``target``."""
    part = target + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        response, start = _open(url, have)
        with response:
            total = _total_size(response, start)
            progress = _Progress(os.path.basename(target), start, total)
            with open(part, "r+b" if start else "wb") as out:
                out.seek(start)
                out.truncate()
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    progress.update(len(chunk))
            progress.close()
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise _fail(url, error) from None
    if total is not None and progress.done != total:
        raise SystemExit(f"error: could not download {url}: got {progress.done} of {total} bytes (rerun to resume)")
    os.replace(part, target)
    return target


def maybe_download_file(source: str, target: str) -> str:
    """Download ``source`` to ``target`` unless ``target`` already exists; return ``target``."""
    target = str(target)
    if os.path.exists(target):
        print(f"{target} exists, not downloading it again")
        return target
    print(f"Downloading {source} to {target}")
    return download(source, target)


def _safe_members(tar: tarfile.TarFile, dest: str) -> Iterator[tarfile.TarInfo]:
    """Plain files and directories of ``tar`` (links and devices skipped); an escape from ``dest`` is an error."""
    root = os.path.realpath(dest)
    for member in tar.getmembers():
        path = os.path.realpath(os.path.join(dest, member.name))
        if os.path.commonpath([root, path]) != root:
            raise SystemExit(f"error: refusing to extract {member.name!r} from {tar.name}: it points outside {dest}")
        if member.isfile() or member.isdir():
            yield member


def extract_tar(tar_path: str, dest: str) -> str:
    """Extract ``tar_path`` into the new directory ``dest`` (atomically: via ``dest + '.tmp'``); return ``dest``."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # Python >= 3.11.4 vets members itself with the "data" filter (and warns from 3.12 when none is given).
    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, members=list(_safe_members(tar, tmp)), **extra)
    except (tarfile.TarError, OSError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"error: could not extract {tar_path}: {error}") from None
    os.replace(tmp, dest)
    return dest


def read_tar_members(tar_path: str, names: Iterable[str]) -> dict[str, bytes]:
    """Contents of the members of ``tar_path`` whose base names are in ``names`` (one pass, nothing extracted)."""
    wanted, found = set(names), {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if member.isfile() and base in wanted and base not in found:
                found[base] = tar.extractfile(member).read()  # type: ignore[union-attr]  (isfile: never None)
    missing = sorted(wanted - set(found))
    if missing:
        raise SystemExit(f"error: {tar_path} has no member named {', '.join(missing)}")
    return found


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a jsonl file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as jsonl to ``path`` atomically (via ``path + '.tmp'``); return how many were written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, n = str(path) + ".tmp", 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
