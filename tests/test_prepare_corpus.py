"""preprocessing/prepare_corpus.py: DPR's TSV (plain and gzip) and KILT's knowledge source become passage jsonl files
that train.py trains on; malformed lines are one-line errors that leave nothing behind."""

from __future__ import annotations

import gzip
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import demo_args, run_script

SCRIPT = "preprocessing/prepare_corpus.py"

# (id, text, title) as DPR means them; the writer below quotes them as DPR's file does.
DPR_ROWS = [
    ("1", 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest, and the brother of Moses.', "Aaron"),
    ("2", "So-called \"double\" quotes, a tab-free line and 'single' ones.", '"Weird Al" Yankovic'),
    ("3", '"Quoted" at the start and at the "end"', "Quotes"),
    ("17", "Ünïcödé — ≠ ascii 文字", "Ünïcödé"),
    ("21015300", "", "Empty text"),
]


def dpr_quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


def dpr_title(title: str) -> str:
    return dpr_quote(title) if '"' in title else title


def write_dpr(path: Path, rows: list[tuple[str, str, str]], header: str = "id\ttext\ttitle") -> Path:
    """DPR's layout: a header line, then id, quoted text, title (quoted only when it holds a quote)."""
    lines = [header] + [f"{i}\t{dpr_quote(text)}\t{dpr_title(title)}" for i, text, title in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def convert(*args: str, ok: bool = True):
    result = run_script([SCRIPT, *map(str, args)])
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", ["psgs_w100.tsv", "psgs_w100.tsv.gz"])
def test_dpr_passages_keep_ids_titles_and_unquoted_texts(tmp_path, name):
    source = write_dpr(tmp_path / name, DPR_ROWS)
    out = tmp_path / "out" / "passages.jsonl"
    result = convert(source, "--output", out)
    assert read_jsonl(out) == [{"id": i, "title": title, "text": text} for i, text, title in DPR_ROWS]
    assert f"{len(DPR_ROWS)} passages (dpr)" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["passages.jsonl"]  # no temporary file left


def test_dpr_header_gives_the_column_order(tmp_path):
    rows = [(i, title, text) for i, text, title in DPR_ROWS[:2]]  # written as id, title, text
    source = write_dpr(tmp_path / "psgs.tsv", rows, header="id\ttitle\ttext")
    out = tmp_path / "passages.jsonl"
    convert(source, "--output", out)
    assert read_jsonl(out) == [{"id": i, "title": title, "text": text} for i, text, title in DPR_ROWS[:2]]


def make_kilt(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """KILT articles built from known sections, and the passages expected from them (computed from the sections)."""
    rng = random.Random(seed)
    # (header paragraph or None for the lead, expected section name, number of words)
    layouts = [
        [(None, "", 30), ("Section::::History.", "History", 230),
         ("Section::::History.:Early years.", "History: Early years", 100)],
        [(None, "", 101), ("Section::::Empty.", "Empty", 0), ("Section::::Works.", "Works", 7)],
        [(None, "", 0), ("Section::::Only section.", "Only section", 250)],
        [(None, "", 0)],  # an article with nothing but its title: no passages
    ]  # fmt: skip
    articles, expected = [], []
    for a, layout in enumerate(layouts):
        title = f"Article {a} (test)"
        paragraphs, n_passages = [title + "\n"], 0
        for s, (header, section, n_words) in enumerate(layout):
            if header:
                paragraphs.append(header + "\n")
            words = [f"w{a}.{s}.{k}" for k in range(n_words)]
            cuts = sorted(rng.sample(range(1, n_words), min(3, n_words - 1))) if n_words > 1 else []
            for k, (start, end) in enumerate(zip([0, *cuts], [*cuts, n_words])):
                text = "  ".join(words[start:end]) + " \n"
                paragraphs.append(f"BULLET::::- {text}" if k == 1 else text)  # list items lose their marker
            for chunk in np.array_split(np.array(words), math.ceil(n_words / 100)) if n_words else []:
                passage_id = f"{1000 + a}_{n_passages}"
                expected.append({"id": passage_id, "title": title, "section": section, "text": " ".join(chunk)})
                n_passages += 1
        article_id = 1000 + a if a == 1 else str(1000 + a)  # KILT's README shows ints, its file strings: take both
        articles.append({"_id": str(a), "wikipedia_id": article_id, "wikipedia_title": title, "text": paragraphs,
                         "anchors": [], "categories": "Test", "history": {}})  # fmt: skip
    return articles, expected


def write_kilt(path: Path, articles: list[dict]) -> Path:
    data = "".join(json.dumps(article) + "\n" for article in articles).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["kilt_knowledgesource.json", "kilt_knowledgesource.json.gz"])
def test_kilt_articles_become_100_word_passages_within_sections(tmp_path, name):
    articles, expected = make_kilt()
    out = tmp_path / "kilt.jsonl"
    convert(write_kilt(tmp_path / name, articles), "--output", out)
    passages = read_jsonl(out)
    assert passages == expected
    counts = [len(p["text"].split()) for p in passages]
    assert max(counts) == 100 and counts.count(100) == 1  # a section of exactly 100 words is one passage
    assert [c for p, c in zip(passages, counts) if p["section"] == "History"] == [77, 77, 76]  # 230 words
    assert [c for p, c in zip(passages, counts) if p["title"] == "Article 1 (test)"] == [51, 50, 7]  # no "Empty"


def test_kilt_words_per_passage(tmp_path):
    articles, _ = make_kilt()
    out = tmp_path / "kilt.jsonl"
    convert(write_kilt(tmp_path / "ks.json", articles), "--output", out, "--words_per_passage", "40")
    counts = [len(p["text"].split()) for p in read_jsonl(out) if p["section"] == "History"]
    assert counts == [39, 39, 38, 38, 38, 38]  # 230 words in ceil(230 / 40) = 6 passages


def test_max_passages_keeps_the_first_ones(tmp_path):
    articles, expected = make_kilt()
    out = tmp_path / "kilt.jsonl"
    convert(write_kilt(tmp_path / "ks.json", articles), "--output", out, "--max_passages", "4")
    assert read_jsonl(out) == expected[:4]
    source = write_dpr(tmp_path / "psgs_w100.tsv.gz", DPR_ROWS)
    convert(source, "--output", tmp_path / "dpr.jsonl", "--max_passages", "2")
    assert [p["id"] for p in read_jsonl(tmp_path / "dpr.jsonl")] == ["1", "2"]


MALFORMED = {
    "dpr-fields": ("psgs.tsv", "id\ttext\ttitle\n1\t\"a\"\tA\n2\t\"b\"\n", 3,
                   "expected 3 tab-separated fields (id, text, title), got 2"),
    "dpr-id": ("psgs.tsv", "1\t\"a\"\tA\n \t\"b\"\tB\n", 2, "field 'id' is empty"),
    "dpr-utf8": ("psgs.tsv", b"1\t\"a\"\tA\n2\t\"\xff\"\tB\n", 2, "not valid UTF-8 (invalid start byte at byte 3)"),
    "kilt-json": ("ks.json", '{"wikipedia_id": "1", "wikipedia_title": "A", "text": ["A"]}\n{"wikipedia_id": \n', 2,
                  "not valid JSON (Expecting value: line 1 column 18 (char 17))"),
    "kilt-missing": ("ks.json", '{"wikipedia_id": "1", "wikipedia_title": "A"}\n', 1, "field 'text' is missing"),
    "kilt-type": ("ks.json", '{"wikipedia_id": "1", "wikipedia_title": "A", "text": "A"}\n', 1,
                  "field 'text' must be a list of paragraph strings, got str"),
    "kilt-object": ("ks.json", '["not", "an", "article"]\n', 1, "expected a JSON object (an article), got list"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_line_is_one_line_error_and_nothing_is_written(tmp_path, case):
    name, content, line, message = MALFORMED[case]
    source = tmp_path / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out" / "passages.jsonl"
    out.parent.mkdir()
    out.write_text("previous corpus\n")
    result = convert(source, "--output", out, "--overwrite", ok=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {source}:{line}: {message}"
    assert "Traceback" not in result.stderr
    assert out.read_text() == "previous corpus\n" and len(list(out.parent.iterdir())) == 1  # untouched, no temp file


def test_skip_malformed_skips_counts_and_warns(tmp_path):
    source = tmp_path / "psgs.tsv"
    source.write_text('id\ttext\ttitle\n1\t"a"\tA\n2\t"b"\n3\t"c"\tC\nnot a row\n')
    out = tmp_path / "passages.jsonl"
    result = convert(source, "--output", out, "--skip_malformed")
    assert [p["id"] for p in read_jsonl(out)] == ["1", "3"]
    assert "skipped 2 malformed line(s)" in result.stdout
    assert f"warning: skipping {source}:3: expected 3 tab-separated fields" in result.stderr


def test_truncated_gzip_is_one_line_error(tmp_path):
    source = write_dpr(tmp_path / "psgs_w100.tsv.gz", DPR_ROWS * 50)
    source.write_bytes(source.read_bytes()[:-30])
    result = convert(source, "--output", tmp_path / "p.jsonl", ok=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and re.fullmatch(rf"error: {re.escape(str(source))}:\d+: cannot read \(.+\)", last)
    assert not (tmp_path / "p.jsonl").exists() and len(list(tmp_path.iterdir())) == 1


def test_format_from_name_or_flag_and_existing_output_kept(tmp_path):
    source = write_dpr(tmp_path / "passages.txt", DPR_ROWS[:1])
    result = convert(source, "--output", tmp_path / "p.jsonl", ok=False)
    error = f"error: cannot tell the format of {source} from its name: pass --format dpr|kilt"
    assert result.stderr.strip().splitlines()[-1] == error
    convert(source, "--output", tmp_path / "p.jsonl", "--format", "dpr")
    assert read_jsonl(tmp_path / "p.jsonl")[0]["id"] == "1"
    write_dpr(source, DPR_ROWS[1:2])
    result = convert(source, "--output", tmp_path / "p.jsonl", "--format", "dpr")
    assert "exists, not converting again" in result.stdout and read_jsonl(tmp_path / "p.jsonl")[0]["id"] == "1"
    convert(source, "--output", tmp_path / "p.jsonl", "--format", "dpr", "--overwrite")
    assert read_jsonl(tmp_path / "p.jsonl")[0]["id"] == "2"


def test_two_training_steps_on_converted_dpr_and_kilt(demo, tmp_path):
    """Both corpora load into one passage store, an index is built over them and training runs with a finite loss."""
    data = tmp_path / "data"
    convert(write_dpr(tmp_path / "psgs_w100.tsv.gz", DPR_ROWS), "--output_directory", data)
    articles, expected = make_kilt()
    convert(write_kilt(tmp_path / "kilt_knowledgesource.json", articles), "--output_directory", data)
    dpr, kilt = data / "corpora/wiki/dpr-psgs_w100/passages.jsonl", data / "corpora/wiki/kilt/passages.jsonl"
    ckpt = tmp_path / "runs"
    args = demo_args(demo, ckpt)
    args[args.index("--passages") + 1 : args.index("--passages") + 2] = [str(dpr), str(kilt)]  # instead of the demo's
    args += ["--name", "corpus", "--total_steps", "2", "--log_freq", "1", "--per_gpu_batch_size", "2"]
    args += ["--n_context", "2", "--retriever_n_context", "2", "--target_maxlength", "16", "--train_retriever"]
    result = run_script(["train.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    stores = list((ckpt / "passage_store").glob("passages-*/store.json"))
    assert [json.loads(s.read_text())["n_passages"] for s in stores] == [len(DPR_ROWS) + len(expected)]
    log = (ckpt / "corpus/run.log").read_text()
    step2 = re.search(r"step 2/2 \| (.*)", log)
    assert step2, log[-2000:]
    losses = {k: float(v) for k, v in (item.split() for item in step2.group(1).split(" | ")) if "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), step2.group(0)
