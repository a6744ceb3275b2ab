"""Downloads of preprocessing/: sizes from the source, resume, errors, progress, and --base_url / env vars end to end.

An HTTP server in a thread serves files from a directory; the first part of the path picks its behaviour (``plain``,
``forbidden``, ``short`` = the first GET of a file stops half way, ``alwaysshort``, ``norange`` = Range ignored).
The scripts themselves run as subprocesses against a ``file://`` mirror of tiny files in the release layout.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREPROCESSING = ROOT / "preprocessing"
for _path in (str(ROOT), str(PREPROCESSING)):  # the scripts import download_tools as a top-level module
    if _path not in sys.path:
        sys.path.insert(0, _path)

import download_model  # noqa: E402
import download_tools  # noqa: E402
import prepare_qa  # noqa: E402

BODY = os.urandom(300_000)
ENV_VARS = (download_tools.ATLAS.env_var, download_tools.FID.env_var)
MODEL_FILE = "models/atlas/base/model.pth.tar"


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No retry waits, no base URL from the shell, and the local server reached without a proxy."""
    monkeypatch.setattr(download_tools, "RETRY_WAIT_SECONDS", 0.0)
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of ``/{mode}/{path}``: the file ``server.root/path`` (404 if missing), served as ``mode`` says."""

    def do_HEAD(self) -> None:  # noqa: N802  (http.server's name)
        self._answer()

    def do_GET(self) -> None:  # noqa: N802
        self._answer()

    def _answer(self) -> None:
        server = self.server
        mode, _, rel = self.path.lstrip("/").partition("/")
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        server.requests.append((self.command, self.path, start))  # type: ignore[attr-defined]
        file = server.root / rel  # type: ignore[attr-defined]
        if mode == "forbidden":
            self.send_error(403, "Forbidden")
            return
        if not file.is_file():
            self.send_error(404, "Not Found")
            return
        body = file.read_bytes()
        start = 0 if mode == "norange" else start
        if start and start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = mode == "alwaysshort" or (mode == "short" and self.path not in server.cut)  # type: ignore[attr-defined]
        server.cut.add(self.path)  # type: ignore[attr-defined]
        self.wfile.write(body[start : (start + len(body)) // 2] if cut else body[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[http.server.HTTPServer]:
    """A server over ``tmp_path / 'served'`` holding ``f.bin`` (= BODY); ``.url`` is its root URL."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root = tmp_path / "served"  # type: ignore[attr-defined]
    httpd.root.mkdir()  # type: ignore[attr-defined]
    (httpd.root / "f.bin").write_bytes(BODY)  # type: ignore[attr-defined]
    httpd.requests, httpd.cut = [], set()  # type: ignore[attr-defined]
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def gets(server: http.server.HTTPServer) -> list[tuple[str, int]]:
    """(path, Range start) of the GET requests the server answered."""
    return [(path, start) for method, path, start in server.requests if method == "GET"]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------------- over HTTP


def test_download_then_skip_of_a_complete_file(tmp_path: Path, server, capsys: pytest.CaptureFixture) -> None:
    target = str(tmp_path / "out" / "f.bin")
    assert download_tools.maybe_download_file(f"{server.url}/plain/f.bin", target) == target
    assert Path(target).read_bytes() == BODY and not os.path.exists(target + ".part")
    download_tools.maybe_download_file(f"{server.url}/plain/f.bin", target)  # same size as the source: kept
    assert gets(server) == [("/plain/f.bin", 0)] and server.requests[-1][0] == "HEAD"
    assert "exists (300,000 bytes, as the source), not downloading it again" in capsys.readouterr().out


def test_stale_file_of_another_size_is_fetched_again(tmp_path: Path, server) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"an older, shorter file")
    download_tools.maybe_download_file(f"{server.url}/plain/f.bin", str(target))
    assert target.read_bytes() == BODY


def test_short_body_is_resumed_in_the_same_run(tmp_path: Path, server) -> None:
    """The first response stops half way (fewer bytes than its Content-Length): the rest is asked for with Range."""
    target = tmp_path / "f.bin"
    download_tools.maybe_download_file(f"{server.url}/short/f.bin", str(target))
    assert target.read_bytes() == BODY
    assert gets(server) == [("/short/f.bin", 0), ("/short/f.bin", len(BODY) // 2)]


def test_short_bodies_keep_the_part_for_the_next_run(tmp_path: Path, server) -> None:
    target = tmp_path / "f.bin"
    with pytest.raises(SystemExit, match=r"got [\d,]+ of 300,000 bytes after 3 attempts \(rerun to resume\)"):
        download_tools.maybe_download_file(f"{server.url}/alwaysshort/f.bin", str(target))
    part = Path(f"{target}.part")
    assert not target.exists() and 0 < part.stat().st_size < len(BODY)  # never renamed into place
    assert part.read_bytes() == BODY[: part.stat().st_size]
    have = part.stat().st_size
    download_tools.maybe_download_file(f"{server.url}/plain/f.bin", str(target))
    assert gets(server)[-1] == ("/plain/f.bin", have) and target.read_bytes() == BODY and not part.exists()


def test_part_is_resumed_with_range(tmp_path: Path, server) -> None:
    target = tmp_path / "f.bin"
    Path(f"{target}.part").write_bytes(BODY[:1234])
    download_tools.maybe_download_file(f"{server.url}/plain/f.bin", str(target))
    assert gets(server) == [("/plain/f.bin", 1234)] and target.read_bytes() == BODY


def test_server_ignoring_range_sends_the_whole_file(tmp_path: Path, server) -> None:
    target = tmp_path / "f.bin"
    Path(f"{target}.part").write_bytes(b"x" * 1234)  # not even a prefix: the whole body replaces it
    download_tools.maybe_download_file(f"{server.url}/norange/f.bin", str(target))
    assert gets(server) == [("/norange/f.bin", 1234)] and target.read_bytes() == BODY


@pytest.mark.parametrize("extra, requests", [(0, 1), (10, 2)])
def test_part_of_full_or_bigger_size(tmp_path: Path, server, extra: int, requests: int) -> None:
    """416 to the Range: a whole .part is just renamed; a longer one is fetched again from the start."""
    target = tmp_path / "f.bin"
    Path(f"{target}.part").write_bytes(BODY + b"z" * extra)
    download_tools.maybe_download_file(f"{server.url}/plain/f.bin", str(target))
    assert target.read_bytes() == BODY and len(gets(server)) == requests


def test_403_from_the_original_location_says_the_bucket_is_closed(
    tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = download_tools.Source("the Atlas release", f"{server.url}/forbidden", "ATLAS_BASE_URL")
    monkeypatch.setattr(download_tools, "ATLAS", original)
    with pytest.raises(SystemExit) as exit_info:
        download_model.main(str(tmp_path), "models/atlas/base")
    message = str(exit_info.value.code)
    assert "\n" not in message and message.startswith(f"error: could not download {server.url}/forbidden/{MODEL_FILE}")
    assert "HTTP 403" in message and "closed since Aug 2024 (facebookresearch/atlas issue #25)" in message
    assert "--base_url or ATLAS_BASE_URL" in message and "file:///" in message
    assert not (tmp_path / MODEL_FILE).exists() and not (tmp_path / f"{MODEL_FILE}.part").exists()


def test_403_for_fids_index_names_its_env_var(tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_tools, "FID", download_tools.Source("FiD's index", f"{server.url}/forbidden", "FID_X"))
    with pytest.raises(SystemExit, match=r"issue #25\): point --base_url or FID_X at a mirror"):
        prepare_qa.main(str(tmp_path))


@pytest.mark.parametrize("code", [403, 404])
def test_the_real_original_urls_get_the_bucket_message(code: int) -> None:
    import urllib.error

    for source in (download_tools.ATLAS, download_tools.FID):
        url = f"{source.default}/some/file"
        message = str(download_tools._fail(url, urllib.error.HTTPError(url, code, "No", {}, None)).code)  # type: ignore[arg-type]
        assert "facebookresearch/atlas issue #25" in message and source.env_var in message


def test_404_from_a_mirror_names_the_url(tmp_path: Path, server) -> None:
    with pytest.raises(SystemExit) as exit_info:
        download_model.main(str(tmp_path), "models/atlas/base", base_url=f"{server.url}/plain/")
    assert str(exit_info.value.code) == f"error: could not download {server.url}/plain/{MODEL_FILE}: HTTP 404 Not Found"


def test_unreachable_source_keeps_an_existing_file_with_a_warning(tmp_path: Path, capsys) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = tmp_path / "f.bin"
    target.write_bytes(b"downloaded earlier")
    download_tools.maybe_download_file(f"http://127.0.0.1:{port}/f.bin", str(target))
    assert target.read_bytes() == b"downloaded earlier"
    assert "warning: could not check" in capsys.readouterr().err


def test_progress_is_log_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path, server, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    download_tools.maybe_download_file(f"{server.url}/plain/f.bin", str(tmp_path / "a.bin"))
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"^  a\.bin: 100% [\d.]+kB/[\d.]+kB \[[\d:]+, .*B/s\]$", err, re.M), err
    monkeypatch.setattr(download_tools, "LOG_INTERVAL_SECONDS", 0.0)  # a line per chunk
    monkeypatch.setattr(download_tools, "CHUNK_BYTES", 100_000)
    download_tools.maybe_download_file(f"{server.url}/plain/f.bin", str(tmp_path / "b.bin"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  b.bin: ")]
    assert len(lines) >= 3 and lines[-1].startswith("  b.bin: 100%")


# ------------------------------------------------------------------------------------------------------- file://


def test_file_url_download_resume_and_size_checks(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(BODY)
    target = tmp_path / "out" / "src.bin"
    target.parent.mkdir()
    Path(f"{target}.part").write_bytes(BODY[:1000])  # resumed by a seek
    download_tools.maybe_download_file(source.as_uri(), str(target))
    assert target.read_bytes() == BODY and not Path(f"{target}.part").exists()
    source.write_bytes(b"a new release")  # another size: fetched again
    download_tools.maybe_download_file(source.as_uri(), str(target))
    assert target.read_bytes() == b"a new release"
    source.write_bytes(b"same size new")  # same size: kept (only the size is compared)
    download_tools.maybe_download_file(source.as_uri(), str(target))
    assert target.read_bytes() == b"a new release"


def test_missing_file_url_is_one_line_naming_it(tmp_path: Path) -> None:
    url = (tmp_path / "missing.bin").as_uri()
    with pytest.raises(SystemExit, match=re.escape(f"error: could not download {url}: FileNotFoundError")):
        download_tools.maybe_download_file(url, str(tmp_path / "t.bin"))
    assert not (tmp_path / "t.bin").exists() and not (tmp_path / "t.bin.part").exists()


def test_base_url_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atlas = download_tools.ATLAS
    assert atlas.resolve() == "https://dl.fbaipublicfiles.com/atlas"
    monkeypatch.setenv("ATLAS_BASE_URL", "https://env.example/atlas/")
    assert atlas.resolve() == "https://env.example/atlas"
    assert atlas.resolve("https://flag.example/a") == "https://flag.example/a"
    assert atlas.resolve(str(tmp_path)) == tmp_path.resolve().as_uri()  # a plain directory: a local copy
    assert download_tools.get_s3_path("x/y.pt") == "https://env.example/atlas/x/y.pt"


# ------------------------------------------------------------------------------------------ scripts, end to end


def make_mirror(root: Path) -> None:
    """Tiny files in the release layout: a model, a corpus, a 128-shard original-format index, FiD's data index."""
    (root / MODEL_FILE).parent.mkdir(parents=True)
    (root / MODEL_FILE).write_bytes(b"not really a checkpoint")
    corpus = root / "corpora/wiki/enwiki-dec2018"
    corpus.mkdir(parents=True)
    (corpus / "text-list-100-sec.jsonl").write_text('{"id": "0", "title": "T", "text": "x"}\n')
    (corpus / "infobox.jsonl").write_text('{"id": "1", "title": "T", "text": "y"}\n')
    (root / "fid").mkdir()
    with tarfile.open(root / "fid" / "dataindex.tar.gz", "w:gz") as tar:
        for name in [f"{p}.{s}.idx.json" for p in ("NQ", "TQA") for s in ("train", "dev", "test")]:
            data = json.dumps({"train": [0, 1], "dev": [2], "test": [0]}[name.split(".")[1]]).encode()
            info = tarfile.TarInfo(f"dataindex/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_legacy_index(directory: Path) -> None:
    import torch

    directory.mkdir(parents=True)
    for shard in range(128):
        (directory / f"passages.{shard}.pt").write_bytes(pickle.dumps([{"id": str(shard), "title": "T", "text": "t"}]))
        torch.save(torch.randn(4, 1).half(), directory / f"embeddings.{shard}.pt")  # (d, n), as the original


def run_script(name: str, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    """Run preprocessing/{name}.py; the network beyond this machine is refused fast through a dead proxy."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in ENV_VARS}
    dead = "http://127.0.0.1:9"
    env.update(http_proxy=dead, https_proxy=dead, no_proxy="127.0.0.1,localhost", **env_vars)
    command = [sys.executable, str(PREPROCESSING / f"{name}.py"), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_download_model_base_url_flag_beats_env_var(tmp_path: Path) -> None:
    make_mirror(tmp_path / "mirror")
    out = tmp_path / "data"
    args = ("--model", "models/atlas/base", "--output_directory", str(out))
    run = run_script("download_model", *args, "--base_url", (tmp_path / "mirror").as_uri(), ATLAS_BASE_URL="file:///x")
    assert run.returncode == 0, run.stderr
    assert (out / MODEL_FILE).read_bytes() == b"not really a checkpoint"
    assert f"--model_path {out / 'models/atlas/base'}" in run.stdout
    run = run_script("download_model", *args, ATLAS_BASE_URL="file:///no/such/mirror")  # present: size unchecked
    assert run.returncode == 0 and "warning: could not check" in run.stderr
    (out / MODEL_FILE).unlink()
    run = run_script("download_model", *args, ATLAS_BASE_URL="file:///no/such/mirror")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: could not download file:///no/such/mirror/{MODEL_FILE}: FileNotFoundError: [Errno 2] "
        f"No such file or directory: '/no/such/mirror/{MODEL_FILE}'"
    ]


def test_download_model_from_an_http_mirror_in_env(tmp_path: Path, server) -> None:
    make_mirror(server.root)
    out = tmp_path / "data"
    base = f"{server.url}/plain"
    run = run_script(
        "download_model", "--model", "models/atlas/base", "--output_directory", str(out), ATLAS_BASE_URL=base
    )
    assert run.returncode == 0, run.stderr
    assert (out / MODEL_FILE).read_bytes() == b"not really a checkpoint"
    run = run_script(
        "download_model", "--model", "models/atlas/xl", "--output_directory", str(out), ATLAS_BASE_URL=base
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    url = f"{server.url}/plain/models/atlas/xl/model.pth.tar"
    assert run.stderr.strip().splitlines()[-1] == f"error: could not download {url}: HTTP 404 Not Found"


def test_download_corpus_with_env_var(tmp_path: Path) -> None:
    make_mirror(tmp_path / "mirror")
    out = tmp_path / "data"
    args = ("--corpus", "corpora/wiki/enwiki-dec2018", "--output_directory", str(out))
    run = run_script("download_corpus", *args, ATLAS_BASE_URL=str(tmp_path / "mirror"))  # a plain directory works too
    assert run.returncode == 0, run.stderr
    got = out / "corpora/wiki/enwiki-dec2018"
    assert (got / "infobox.jsonl").read_text() == '{"id": "1", "title": "T", "text": "y"}\n'
    assert f"--passages {got / 'text-list-100-sec.jsonl'} {got / 'infobox.jsonl'}" in run.stdout


def test_download_index_with_base_url_and_convert(tmp_path: Path) -> None:
    write_legacy_index(tmp_path / "mirror/indices/atlas/wiki/base")
    out = tmp_path / "data"
    args = ("--index", "indices/atlas/wiki/base", "--output_directory", str(out), "--convert")
    run = run_script("download_index", *args, ATLAS_BASE_URL=(tmp_path / "mirror").as_uri())
    assert run.returncode == 0, run.stderr
    from src.index import files as index_io

    manifest = index_io.read_manifest(str(out / "indices/atlas/wiki/base-converted"))
    assert manifest["n_passages"] == 128 and manifest["dim"] == 4


def test_prepare_qa_with_base_url_for_fids_index(tmp_path: Path) -> None:
    """dataindex.tar.gz from the mirror; NQ and TriviaQA placed beforehand (their hosts are unreachable: kept)."""
    make_mirror(tmp_path / "mirror")
    raw = tmp_path / "qa_raw_downloads"
    raw.mkdir()
    n = max(prepare_qa.NQ_64SHOT + prepare_qa.TRIVIAQA_64SHOT) + 1
    nq = "".join(json.dumps({"question": f"q{i}", "answer": ["a"]}) + "\n" for i in range(n))
    (raw / "NQ-open.train.jsonl").write_text(nq)
    (raw / "NQ-open.dev.jsonl").write_text(nq.splitlines(keepends=True)[0])
    records = [{"Question": f"q{i}", "Answer": {"Value": "V", "Aliases": ["v"]}} for i in range(n)]
    with tarfile.open(raw / "triviaqa-unfiltered.tar.gz", "w:gz") as tar:
        for split, data in (("train", records), ("dev", records[:1])):
            path = tmp_path / f"unfiltered-web-{split}.json"
            path.write_text(json.dumps({"Data": data}))
            tar.add(path, arcname=f"triviaqa-unfiltered/{path.name}")
    mirror = (tmp_path / "mirror/fid").as_uri()
    run = run_script("prepare_qa", "--output_directory", str(tmp_path), "--base_url", mirror, FID_BASE_URL="file:///x")
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("warning: could not check") == 3  # NQ train/dev and TriviaQA: their hosts are unreachable
    assert len(download_tools.read_jsonl(str(tmp_path / "nq_data/train.64-shot.jsonl"))) == 64
    assert download_tools.read_jsonl(str(tmp_path / "triviaqa_data/dev.jsonl")) == [
        {"question": "q2", "answers": ["v"], "target": "V"}
    ]
