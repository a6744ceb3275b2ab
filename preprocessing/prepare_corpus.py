"""Convert a public Wikipedia passage set into Atlas's passage jsonl (for ``--passages``).

    python preprocessing/prepare_corpus.py psgs_w100.tsv.gz --output_directory ${DATA_DIR}
    python preprocessing/prepare_corpus.py kilt_knowledgesource.json --output ${DATA_DIR}/kilt.jsonl

Two inputs are understood; the format comes from the file name (``.tsv`` -> dpr, ``.json`` / ``.jsonl`` -> kilt,
either optionally ``.gz``) unless ``--format`` says otherwise. gzip is recognised by content, not by name.

- ``dpr``: DPR's ``psgs_w100.tsv`` (21M passages of 100 words, Wikipedia Dec. 2018). One passage per line, three
  tab-separated fields ``id``, ``text``, ``title`` (the header line names them; their order is taken from it). A
  field wrapped in double quotes has them removed and its doubled quotes (``""``) undone, as DPR's file quotes its
  texts; any other field is kept verbatim. DPR's ids are kept (``{"id", "title", "text"}``), so DPR-style gold
  passage ids still match. (DPR's own reader also strips every leading and trailing ``"`` of a text, which cuts
  real quotation marks; we do not.)
- ``kilt``: the KILT knowledge source ``kilt_knowledgesource.json`` (5.9M articles, Wikipedia 2019-08-01), one JSON
  object per line with ``wikipedia_id``, ``wikipedia_title`` and ``text``: a list of paragraphs whose first is the
  title and where ``Section::::Name.`` paragraphs start a section (``Parent.:Child.`` for a subsection). As in
  Atlas's own ``text-list-100-sec`` corpora, passages are cut within a section, across its paragraphs but never
  across a section boundary: a section of W words becomes ceil(W / 100) passages of nearly equal length (at most
  ``--words_per_passage`` words each, lengths differing by at most one word, so no 3-word tail passages). Words are
  whitespace-separated tokens, joined by single spaces. ``section`` is the header without its marker and final
  period (``"Parent: Child"`` for a subsection; ``""`` before the first header); ``BULLET::::-`` list markers are
  dropped. Passage ids are ``{wikipedia_id}_{n}`` with n = 0, 1, ... over the article's passages in order: stable
  for a given knowledge source and ``--words_per_passage``. Articles without text give no passages.

The input is streamed (gzip too): memory stays small however large the file. The output is written to a temporary
file beside it and renamed at the end, so an interrupted or failed run never leaves a partial corpus; an existing
output is kept unless ``--overwrite``. A malformed line (not UTF-8, a TSV line without 3 fields, a KILT line that is
not a JSON object or lacks a field) ends the run with one line naming file:line and the field, and writes nothing.
With ``--skip_malformed`` such lines are skipped instead, reported (the first ones) and counted: one stray line
should not cost a 21M-line conversion, but skipping is something to choose, not a default. Passage id uniqueness is
checked when the passage store is built from the output (train.py / evaluate.py), not here.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

FORMATS = ("dpr", "kilt")
DPR_COLUMNS = ("id", "text", "title")
SECTION_MARK, BULLET_MARK = "Section::::", "BULLET::::"
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_OUTPUT = {"dpr": "corpora/wiki/dpr-psgs_w100/passages.jsonl", "kilt": "corpora/wiki/kilt/passages.jsonl"}
MAX_REPORTED_SKIPS = 10  # with --skip_malformed, lines reported one by one before only counting


class CorpusError(Exception):
    """A conversion failure; the message is the one line shown to the user."""


class MalformedLine(Exception):
    """A line that cannot be converted; the message names the field, the caller adds file:line."""


@dataclass
class Stats:
    lines: int = 0
    skipped: int = 0


def detect_format(path: str) -> str:
    """``dpr`` or ``kilt`` from the file name (a ``.gz`` suffix is ignored)."""
    name = path.lower().removesuffix(".gz")
    if name.endswith(".tsv"):
        return "dpr"
    if name.endswith((".json", ".jsonl")):
        return "kilt"
    raise CorpusError(f"cannot tell the format of {path} from its name: pass --format {'|'.join(FORMATS)}")


def unquote(field: str) -> str:
    """A TSV field as DPR wrote it: ``"a ""b"" c"`` -> ``a "b" c``; an unquoted field is returned as is."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def read_lines(path: str) -> Iterator[bytes]:
    """Stream the lines of ``path`` (gunzipped if it is gzip), with a progress bar over the bytes read from disk."""
    try:
        raw = open(path, "rb")  # noqa: SIM115  (closed by the with-block below, which also covers the gzip check)
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error.strerror}") from None
    line_no = 0
    live = sys.stderr.isatty()  # in a log file, a progress line a minute rather than a redraw every second
    with raw, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=os.path.basename(path),
                   mininterval=1 if live else 60, dynamic_ncols=True) as bar:  # fmt: skip
        stream = gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == GZIP_MAGIC else raw
        try:
            for line_no, line in enumerate(stream, start=1):
                if line_no % 4096 == 0:  # tell() per line would cost more than the parsing
                    bar.update(raw.tell() - bar.n)
                yield line
        except (OSError, EOFError, zlib.error) as error:  # a truncated or corrupt .gz
            raise CorpusError(f"{path}:{line_no + 1}: cannot read ({error})") from None
        bar.update(raw.tell() - bar.n)


def dpr_header(fields: list[str]) -> tuple[str, ...] | None:
    """The column order if ``fields`` is DPR's header line (``id``, ``text``, ``title`` in any order), else None."""
    names = tuple(field.strip().lower() for field in fields)
    return names if sorted(names) == sorted(DPR_COLUMNS) else None


def dpr_passage(line: str, columns: tuple[str, ...]) -> dict[str, str]:
    """The passage ``{"id", "title", "text"}`` of one line of DPR's TSV, whose fields are in ``columns`` order."""
    fields = line.split("\t")
    if len(fields) != len(columns):
        raise MalformedLine(f"expected {len(columns)} tab-separated fields ({', '.join(columns)}), got {len(fields)}")
    row = {name: unquote(field) for name, field in zip(columns, fields)}
    if not row["id"].strip():
        raise MalformedLine("field 'id' is empty")
    return {"id": row["id"].strip(), "title": row["title"], "text": row["text"]}


def section_name(header: str) -> str:
    """``Section::::History.:Early years.`` -> ``History: Early years``."""
    parts = header.removeprefix(SECTION_MARK).strip().removesuffix(".").split(".:")
    return ": ".join(part.strip() for part in parts)


def paragraph_words(paragraph: str) -> list[str]:
    """The words of a KILT paragraph, without its ``BULLET::::-`` list marker."""
    if paragraph.startswith(BULLET_MARK):
        paragraph = paragraph.removeprefix(BULLET_MARK).lstrip().removeprefix("-")
    return paragraph.split()


def split_sections(paragraphs: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """(section name, its words) for each section that has words; ``""`` names the lead before the first header."""
    section, words = "", []
    for paragraph in paragraphs:
        paragraph = paragraph.strip()
        if paragraph.startswith(SECTION_MARK):
            if words:
                yield section, words
            section, words = section_name(paragraph), []
        else:
            words.extend(paragraph_words(paragraph))
    if words:
        yield section, words


def chunk_words(words: list[str], size: int) -> list[list[str]]:
    """Split ``words`` into ceil(len / size) consecutive chunks whose lengths differ by at most one (longest first)."""
    n_chunks = math.ceil(len(words) / size)
    base, extra = divmod(len(words), n_chunks)
    chunks, start = [], 0
    for k in range(n_chunks):
        end = start + base + (k < extra)
        chunks.append(words[start:end])
        start = end
    return chunks


def _field(article: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = article.get(name)
    if value is None:
        raise MalformedLine(f"field '{name}' is missing")
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise MalformedLine(f"field '{name}' must be {what}, got {type(value).__name__}")
    return value


def kilt_passages(line: str, words_per_passage: int) -> list[dict[str, str]]:
    """The passages ``{"id", "title", "section", "text"}`` of one KILT knowledge-source line (one article)."""
    try:
        article = json.loads(line)
    except json.JSONDecodeError as error:
        raise MalformedLine(f"not valid JSON ({error})") from None
    if not isinstance(article, dict):
        raise MalformedLine(f"expected a JSON object (an article), got {type(article).__name__}")
    article_id = str(_field(article, "wikipedia_id", (str, int), "a string or an integer")).strip()
    if not article_id:
        raise MalformedLine("field 'wikipedia_id' is empty")
    title = _field(article, "wikipedia_title", (str,), "a string")
    paragraphs = _field(article, "text", (list,), "a list of paragraph strings")
    if not all(isinstance(paragraph, str) for paragraph in paragraphs):
        raise MalformedLine("field 'text' must be a list of paragraph strings")
    passages: list[dict[str, str]] = []
    for section, words in split_sections(paragraphs[1:]):  # paragraphs[0] is the title
        for chunk in chunk_words(words, words_per_passage):
            passage_id = f"{article_id}_{len(passages)}"
            passages.append({"id": passage_id, "title": title, "section": section, "text": " ".join(chunk)})
    return passages


def decode(raw: bytes, first: bool) -> str:
    """One input line as text, without its line ending (and, on the first line, a byte-order mark)."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise MalformedLine(f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
    return line.removeprefix("\ufeff") if first else line


def read_passages(path: str, fmt: str, words_per_passage: int, skip_malformed: bool, stats: Stats) -> Iterator[dict]:
    """Stream the passages of ``path``; a malformed line is a CorpusError naming file:line (or skipped and counted)."""
    columns: tuple[str, ...] = DPR_COLUMNS  # DPR's header, when present, may reorder them

    def convert(line: str) -> list[dict]:
        return [dpr_passage(line, columns)] if fmt == "dpr" else kilt_passages(line, words_per_passage)

    for line_no, raw in enumerate(read_lines(path), start=1):
        stats.lines = line_no
        try:
            line = decode(raw, first=line_no == 1)
            if line_no == 1 and fmt == "dpr" and (header := dpr_header(line.split("\t"))):
                columns = header
                continue
            if not line.strip():
                continue
            passages = convert(line)  # a whole article at once: a bad line yields nothing, not half an article
        except MalformedLine as error:
            message = f"{path}:{line_no}: {error}"
            if not skip_malformed:
                raise CorpusError(message) from None
            stats.skipped += 1
            if stats.skipped <= MAX_REPORTED_SKIPS:
                tqdm.write(f"warning: skipping {message}", file=sys.stderr)
            continue
        yield from passages


def write_passages(passages: Iterable[dict], output: str, max_passages: int) -> int:
    """Write ``passages`` (at most ``max_passages``; -1: all) as jsonl to ``output`` atomically; return the count."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp, n = f"{output}.tmp-{os.getpid()}", 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for passage in passages:
                out.write(json.dumps(passage, ensure_ascii=False) + "\n")
                n += 1
                if n == max_passages:  # checked after writing so that no further input is read
                    break
            out.flush()
            os.fsync(out.fileno())
        if n == 0:
            raise CorpusError("the input holds no passages: nothing written")
        os.replace(tmp, output)
    except BaseException:  # also Ctrl-C: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return n


def convert(args: argparse.Namespace) -> None:
    """Run the conversion the parsed command line asks for (prints a summary line)."""
    fmt = args.format or detect_format(args.input)
    output = args.output or os.path.join(args.output_directory, DEFAULT_OUTPUT[fmt])
    if os.path.exists(output) and not args.overwrite:
        print(f"{output} exists, not converting again (pass --overwrite)")
        return
    stats = Stats()
    passages = read_passages(args.input, fmt, args.words_per_passage, args.skip_malformed, stats)
    try:
        n = write_passages(passages, output, args.max_passages)
    finally:
        passages.close()  # closes the input now, also when --max_passages stopped early
    skipped = f", skipped {stats.skipped} malformed line(s)" if stats.skipped else ""
    print(f"{n:>10} passages ({fmt}) from {stats.lines} lines of {args.input} in {output}{skipped}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert DPR's psgs_w100.tsv or KILT's knowledge source to passages.")
    parser.add_argument("input", help="psgs_w100.tsv[.gz] (DPR) or kilt_knowledgesource.json[.gz] (KILT)")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: from the file name)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", help="the passage jsonl to write")
    where.add_argument(
        "--output_directory", default="./data/",
        help=f"write {DEFAULT_OUTPUT['dpr']} or {DEFAULT_OUTPUT['kilt']} here (when --output is not given)",
    )  # fmt: skip
    parser.add_argument("--max_passages", type=int, default=-1, help="stop after this many passages; -1: all")
    parser.add_argument("--words_per_passage", type=int, default=100, help="kilt: the most words in a passage")
    parser.add_argument("--skip_malformed", action="store_true", help="skip and count malformed lines, not fail")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.max_passages != -1 and args.max_passages < 1:
        parser.error(f"--max_passages must be >= 1 or -1 (all), got {args.max_passages}")
    if args.words_per_passage < 1:
        parser.error(f"--words_per_passage must be >= 1, got {args.words_per_passage}")
    return args


if __name__ == "__main__":
    try:
        convert(parse_args())
    except CorpusError as error:
        raise SystemExit(f"error: {error}") from None
