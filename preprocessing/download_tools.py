"""Helpers shared by the preprocessing scripts: checked, resumable downloads (urllib + tqdm) and jsonl/tar I/O.

Downloads come from a base URL that the user can move (the original bucket ``dl.fbaipublicfiles.com`` has answered
403 since August 2024, facebookresearch/atlas issue #25): ``--base_url`` > the script's environment variable
(``ATLAS_BASE_URL``, ``FID_BASE_URL``) > the original location. A base is an http(s) mirror, a ``file://`` URL or a
plain local directory holding the release layout (``BASE/models/atlas/base/model.pth.tar``).

A download goes to ``<target>.part`` and is renamed to ``<target>`` only once it has the source's size
(Content-Length, or the file's size for ``file://``), so a final file on disk is always whole. An interrupted or short
download keeps its ``.part``; the next attempt (up to ``ATTEMPTS`` per run, then on the next run) asks only for the
remaining bytes (HTTP Range; a seek for ``file://``); a server that ignores Range sends the whole file again. A file
already on disk is kept only if it has the source's size, else fetched again; when the source cannot be reached to
check, the file is kept with a warning (so prepared data stays usable offline). Failures end the script with one line
naming the URL (``SystemExit``), never a traceback.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60
ATTEMPTS = 3  # tries per file and run when the body comes short or the connection drops
RETRY_WAIT_SECONDS = 2.0
LOG_INTERVAL_SECONDS = 30.0  # progress line period when stderr is not a terminal
CLOSED_HOST = "dl.fbaipublicfiles.com"
_HEADERS = {"User-Agent": "atlas-preprocessing"}
# Errors of a source that could not be read: network, HTTP, local file, malformed URL.
_SOURCE_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


@dataclass(frozen=True)
class Source:
    """A set of released files under one base URL that ``--base_url`` or an environment variable can move."""

    what: str  # e.g. "the Atlas release"
    default: str  # the original base URL
    env_var: str

    def resolve(self, base_url: str | None = None) -> str:
        """Base URL to use: ``base_url`` > ``$env_var`` > ``default``; a local directory becomes a file:// URL."""
        base = base_url or os.environ.get(self.env_var) or self.default
        if "://" not in base:  # a plain path: a local copy of the release
            base = Path(base).expanduser().resolve().as_uri()
        return base.rstrip("/")

    def mirror_hint(self) -> str:
        """How to point the scripts at another copy (for error messages)."""
        return (
            f"point --base_url or {self.env_var} at a mirror (https://...) or a local copy (file:///...) of {self.what}"
        )


ATLAS = Source("the Atlas release", "https://dl.fbaipublicfiles.com/atlas", "ATLAS_BASE_URL")
FID = Source("FiD's data index (dataindex.tar.gz)", "https://dl.fbaipublicfiles.com/FiD/data", "FID_BASE_URL")
BASE_URL = ATLAS.default


def add_base_url_argument(parser: Any, source: Source, example: str) -> None:
    """Add ``--base_url`` for ``source`` to an argparse parser (help: precedence and an example file location)."""
    parser.add_argument(
        "--base_url",
        type=str,
        default=None,
        metavar="URL",
        help=f"where to download {source.what} from: an http(s) mirror,\n"
        f"a file:// URL or a local directory, laid out as the original\n(e.g. BASE/{example}).\n"
        f"Precedence: --base_url > ${source.env_var} > {source.default}\n"
        "(the original bucket has answered 403 since Aug 2024:\nfacebookresearch/atlas issue #25)",
    )


def get_s3_path(path: str, base_url: str | None = None) -> str:
    """URL of a file of the Atlas release, e.g. ``models/atlas/base/model.pth.tar``, under ``base_url`` (resolved)."""
    return f"{ATLAS.resolve(base_url)}/{path}"


def get_download_path(output_dir: str, path: str) -> str:
    """Local path of a release file: the release layout is mirrored under ``output_dir``."""
    return os.path.join(output_dir, path)


class _LogLines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (stderr is a log, not a terminal)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(f"  {line}\n")

    def flush(self) -> None:
        self.stream.flush()


def _progress(name: str, done: int, total: int | None) -> tqdm:
    """A byte progress bar on stderr; when stderr is no terminal, a line every ``LOG_INTERVAL_SECONDS`` instead."""
    common = {"total": total, "initial": done, "unit": "B", "unit_scale": True, "unit_divisor": 1024, "desc": name}
    stream = sys.stderr
    if stream.isatty():
        return tqdm(file=stream, mininterval=0.5, **common)
    counts = "{percentage:3.0f}% {n_fmt}B/{total_fmt}B" if total else "{n_fmt}B"
    fmt = "{desc}: " + counts + " [{elapsed}, {rate_fmt}]"
    # delay: a file done within the interval gets only the final line (the caller's refresh()), not a 0% one too
    every = {"mininterval": LOG_INTERVAL_SECONDS, "maxinterval": LOG_INTERVAL_SECONDS, "delay": LOG_INTERVAL_SECONDS}
    return tqdm(file=_LogLines(stream), bar_format=fmt, leave=False, **every, **common)


def _closed_bucket_source(url: str) -> Source | None:
    """The source whose original location ``url`` is in, if it is on the closed bucket; else None."""
    for source in (ATLAS, FID):  # read at call time, so tests can move a default
        if url.startswith(source.default + "/"):
            return source
    return ATLAS if urllib.parse.urlparse(url).hostname == CLOSED_HOST else None


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"


def _fail(url: str, error: BaseException) -> SystemExit:
    """The one-line error for a failed download of ``url``."""
    message = f"error: could not download {url}: {_reason(error)}"
    if isinstance(error, urllib.error.HTTPError) and error.code in (403, 404):
        source = _closed_bucket_source(url)
        if source is not None:
            return SystemExit(
                f"{message}. The original bucket {CLOSED_HOST} has been closed since Aug 2024 "
                f"(facebookresearch/atlas issue #25): {source.mirror_hint()}"
            )
        return SystemExit(message)
    if isinstance(error, (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)):
        return SystemExit(f"{message} (rerun to retry; partial downloads resume)")
    return SystemExit(message)  # a local file (file://) or a malformed URL: retrying will not help


def _local_path(url: str) -> str | None:
    """The local path of a ``file://`` URL, else None."""
    parsed = urllib.parse.urlparse(url)
    return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else None


def _content_range(response: Any) -> tuple[int, int | None] | None:
    """(first byte, total size or None) of a ``Content-Range: bytes a-b/N`` (or ``bytes */N``) header."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (response.headers.get("Content-Range") or "").strip())
    if not match:
        return None
    first, total = match.groups()
    return int(first or 0), None if total == "*" else int(total)


def _content_length(response: Any) -> int | None:
    length = (response.headers.get("Content-Length") or "").strip()
    return int(length) if length.isdigit() else None


def _open(url: str, offset: int) -> tuple[Any, int, int | None]:
    """Open ``url`` from byte ``offset``: (readable body, offset it starts at, the source's size or None)."""
    path = _local_path(url)
    if path is not None:
        size = os.path.getsize(path)
        body = open(path, "rb")  # noqa: SIM115  (closed by the caller's with-block)
        start = offset if offset <= size else 0  # a .part longer than the source is not a prefix of it
        body.seek(start)
        return body, start, size
    request = urllib.request.Request(url, headers=_HEADERS)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:
            raise
        span = _content_range(error)  # 416: the .part is already whole (Content-Range: bytes */size), or too long
        error.close()
        if span is not None and span[1] == offset:
            return io.BytesIO(), offset, offset
        return _open(url, 0)
    if getattr(response, "status", None) != 206:  # 200: the server ignored Range and sends the whole file
        return response, 0, _content_length(response)
    span = _content_range(response)
    if span is None or span[0] != offset:  # a range we did not ask for: start over without Range
        response.close()
        return _open(url, 0)
    length = _content_length(response)
    return response, offset, span[1] if span[1] is not None else (offset + length if length is not None else None)


def source_size(url: str) -> int | None:
    """Size in bytes of the file at ``url`` (Content-Length of a HEAD, or the file's size); None if not told."""
    path = _local_path(url)
    if path is not None:
        return os.path.getsize(path)
    try:
        request = urllib.request.Request(url, headers=_HEADERS, method="HEAD")
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return _content_length(response)
    except urllib.error.HTTPError as error:
        if error.code not in (405, 501):  # a server without HEAD: ask with GET and read only the headers
            raise
        error.close()
    response, _, total = _open(url, 0)
    response.close()
    return total


def _fetch(url: str, part: str, name: str) -> tuple[int, int | None, BaseException | None]:
    """One attempt: append what the source has beyond ``part`` to it.

    Returns (bytes now in ``part``, the source's size or None, the error that cut the transfer short or None); an
    error opening the source is raised.
    """
    have = os.path.getsize(part) if os.path.exists(part) else 0
    body, start, total = _open(url, have)
    cut = None
    with body, open(part, "r+b" if start else "wb") as out:
        out.seek(start)
        out.truncate()
        bar = _progress(name, start, total)
        try:
            while True:
                try:
                    chunk = body.read(CHUNK_BYTES)
                except _SOURCE_ERRORS as error:  # a dropped connection or a timeout: what arrived stays in the .part
                    cut = error
                    break
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
            bar.refresh()  # the final state, also as a log line
        finally:
            bar.close()
    return os.path.getsize(part), total, cut


def download(url: str, target: str) -> str:
    """Download ``url`` to ``target`` via ``target + '.part'`` (resumed if present, size-checked); return ``target``."""
    part = target + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            done, total, cut = _fetch(url, part, os.path.basename(target))
        except _SOURCE_ERRORS as error:
            raise _fail(url, error) from None
        if cut is None and total is None:
            print(f"warning: {url} did not give its size; keeping the {done:,} bytes received", file=sys.stderr)
            break
        if cut is None and done == total:
            break
        if total is not None and done > total:  # longer than the source, so not a prefix of it: start over
            os.remove(part)
        if attempt == ATTEMPTS:
            if cut is not None:
                raise _fail(url, cut)
            raise SystemExit(
                f"error: could not download {url}: got {done:,} of {total:,} bytes after {ATTEMPTS} attempts "
                "(rerun to resume)"
            )
        why = _reason(cut) if cut is not None else f"{done:,} of {total:,} bytes"
        print(f"Download of {url} incomplete ({why}); retrying ({attempt}/{ATTEMPTS})", file=sys.stderr)
        time.sleep(RETRY_WAIT_SECONDS * attempt)
    os.replace(part, target)
    return target


def _is_complete(source: str, target: str) -> bool:
    """Whether the existing ``target`` has the size of ``source`` (kept, with a warning, if that cannot be told)."""
    have = os.path.getsize(target)
    try:
        expected = source_size(source)
    except _SOURCE_ERRORS as error:
        print(
            f"warning: could not check {target} against {source} ({_reason(error)}); keeping the file on disk",
            file=sys.stderr,
        )
        return True
    if expected is None:
        print(f"warning: {source} did not give its size; keeping {target} unchecked", file=sys.stderr)
        return True
    if expected != have:
        print(f"{target} has {have:,} bytes but {source} has {expected:,}: downloading it again")
        return False
    print(f"{target} exists ({have:,} bytes, as the source), not downloading it again")
    return True


def maybe_download_file(source: str, target: str) -> str:
    """Download ``source`` to ``target`` unless ``target`` already exists with the source's size; return ``target``."""
    target = str(target)
    if os.path.exists(target) and _is_complete(source, target):
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
