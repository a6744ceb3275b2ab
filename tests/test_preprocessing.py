"""Offline tests of preprocessing/ (record conversion, splits, layouts, downloads) and of example_scripts/."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREPROCESSING = ROOT / "preprocessing"
for _path in (str(ROOT), str(PREPROCESSING)):  # the scripts import download_tools as a top-level module
    if _path not in sys.path:
        sys.path.insert(0, _path)

import download_corpus  # noqa: E402
import download_index  # noqa: E402
import download_model  # noqa: E402
import download_tools  # noqa: E402
import prepare_fever  # noqa: E402
import prepare_mmlu  # noqa: E402
import prepare_qa  # noqa: E402
import prepare_templama  # noqa: E402

from src.options import parse_options  # noqa: E402
from src.tasks import UNIMPLEMENTED_TASKS  # noqa: E402

# The launcher scripts (torchrun or srun) ported from the original; example_scripts/demo/ is a plain local script.
SCRIPT_NAMES = """nq/train_fewshot.sh nq/train.sh nq/evaluate.sh nq/retrieve_only.sh mmlu/mmlu-5-shot.sh
mmlu/mmlu-zeroshot.sh mmlu/mmlu-full.sh mmlu/mmlu-5-shot-multi.sh templama/train.sh templama/evaluate.sh lm/train.sh
mlm/train.sh""".split()
SCRIPTS = [ROOT / "example_scripts" / name for name in SCRIPT_NAMES]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempted by a prepare_* main() fails the test instead of reaching the network.

    Files placed beforehand are kept: their size check against the source finds it unreachable (a warning).
    """

    def refuse(url: str, target: str) -> str:
        raise AssertionError(f"unexpected download of {url} to {target}")

    def unreachable(url: str) -> None:
        raise OSError("no network in tests")

    monkeypatch.setattr(download_tools, "download", refuse)
    monkeypatch.setattr(download_tools, "source_size", unreachable)
    for source in (download_tools.ATLAS, download_tools.FID):  # the original locations, whatever the shell says
        monkeypatch.delenv(source.env_var, raising=False)


def write_json_tar(path: Path, members: dict[str, object]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------- NQ / TriviaQA


def tqa(question: str, value: str, aliases: list[str] | None = None) -> dict:
    return {"Question": question, "Answer": {"Value": value, "Aliases": aliases or [value], "Type": "WikipediaEntity"}}


def test_convert_nq() -> None:
    ex = {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]}
    assert prepare_qa.convert_nq(ex) == {"question": "who wrote hamlet", "answers": ex["answer"]}


@pytest.mark.parametrize(
    "value, target",
    [("PARIS", "Paris"), ("NEW YORK CITY", "New York City"), ("Paris", "Paris"), ("The BEATLES", "The BEATLES"),
     ("1984", "1984"), ("U2", "U2"), ("iPhone", "iPhone")],
)  # fmt: skip
def test_triviaqa_target_is_title_cased_only_when_all_upper(value: str, target: str) -> None:
    record = prepare_qa.convert_triviaqa(tqa("q?", value, [value, "alias"]))
    assert record == {"question": "q?", "answers": [value, "alias"], "target": target}


def test_nq_splits_use_fid_indices_and_the_original_64_shot_list() -> None:
    raw_train = [{"question": f"t{i}", "answer": [f"a{i}"]} for i in range(max(prepare_qa.NQ_64SHOT) + 1)]
    raw_dev = [{"question": f"d{i}", "answer": [f"b{i}"]} for i in range(10)]
    index = {"train": [5, 1, 3], "dev": [0, 2], "test": [9, 4]}
    splits = prepare_qa.build_nq_splits(raw_train, raw_dev, index)
    assert [r["question"] for r in splits["train"]] == ["t5", "t1", "t3"]
    assert [r["question"] for r in splits["dev"]] == ["t0", "t2"]  # dev comes from NQ-open *train*
    assert splits["test"] == [{"question": "d9", "answers": ["b9"]}, {"question": "d4", "answers": ["b4"]}]
    shots = splits["train.64-shot"]
    assert len(shots) == 64 and shots[0] == {"question": "t27144", "answers": ["a27144"]}
    assert [r["question"] for r in shots] == [f"t{i}" for i in prepare_qa.NQ_64SHOT]  # list order, not sorted


def test_split_index_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="out of range for NQ-open dev"):
        prepare_qa.build_nq_splits([{"question": "q", "answer": []}] * 80000, [], {"train": [], "dev": [], "test": [3]})


def test_prepare_qa_main_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_qa, "NQ_64SHOT", [2, 0])
    monkeypatch.setattr(prepare_qa, "TRIVIAQA_64SHOT", [1])
    raw = tmp_path / "qa_raw_downloads"
    raw.mkdir()
    index = {
        f"{p}.{s}.idx.json": {"train": [0, 1], "dev": [2], "test": [0]}[s]
        for p in ("NQ", "TQA")
        for s in "train dev test".split()
    }
    write_json_tar(raw / "dataindex.tar.gz", {f"dataindex/{k}": v for k, v in index.items()})
    for split, n in (("train", 3), ("dev", 1)):
        lines = [json.dumps({"question": f"{split}{i}", "answer": [f"x{i}"]}) for i in range(n)]
        (raw / f"NQ-open.{split}.jsonl").write_text("\n".join(lines) + "\n")
    train = {"Data": [tqa("q0", "ROME"), tqa("q1", "Oslo"), tqa("q2", "Bern")]}
    write_json_tar(
        raw / "triviaqa-unfiltered.tar.gz",
        {
            "triviaqa-unfiltered/unfiltered-web-train.json": train,
            "triviaqa-unfiltered/unfiltered-web-dev.json": {"Data": [tqa("dq", "LIMA")]},
        },
    )
    prepare_qa.main(str(tmp_path))
    for name in ("nq_data", "triviaqa_data"):
        assert sorted(os.listdir(tmp_path / name)) == ["dev.jsonl", "test.jsonl", "train.64-shot.jsonl", "train.jsonl"]
    assert download_tools.read_jsonl(tmp_path / "nq_data" / "train.64-shot.jsonl") == [
        {"question": "train2", "answers": ["x2"]},
        {"question": "train0", "answers": ["x0"]},
    ]
    assert download_tools.read_jsonl(tmp_path / "triviaqa_data" / "train.jsonl")[0]["target"] == "Rome"
    assert download_tools.read_jsonl(tmp_path / "triviaqa_data" / "test.jsonl")[0]["target"] == "Lima"
    assert not raw.exists()  # raw downloads are cleaned up
    prepare_qa.main(str(tmp_path))  # existing outputs: nothing downloaded, nothing rebuilt


# ---------------------------------------------------------------------------------------------------------- TempLAMA


def lama(query: str, date: str, *names: str) -> dict:
    return {"query": query, "date": date, "answer": [{"wikidata_id": "Q" + n, "name": n} for n in names], "id": "x"}


def test_templama_keeps_queries_whose_answer_changed() -> None:
    records = [
        lama("_X_ leads Club A.", "2017", "Ann", "Ann"),
        lama("_X_ leads Club A.", "2018", "Zed"),  # not a chosen year: ignored
        lama("_X_ leads Club A.", "2020", "Bob"),  # changed -> both years kept
        lama("Club B is in _X_.", "2017", "Paris"),
        lama("Club B is in _X_.", "2020", "Paris"),  # unchanged -> dropped
        lama("_X_ coaches C.", "2020", "Cy", "Di"),
        lama("_X_ coaches C.", "2017", "Di", "Ed"),  # shares "Di" with the first record -> dropped
        lama("_X_ owns D.", "2017", "Eve"),  # one year only -> dropped
    ]
    out = prepare_templama.changed_answers(records)
    assert list(out) == ["2017", "2020"]
    assert out["2017"] == [
        {"question": "<extra_id_0> leads Club A.", "answers": ["Ann"], "metadata": {"original_instance": records[0]}}
    ]
    assert [r["answers"] for r in out["2020"]] == [["Bob"]]
    assert out["2020"][0]["metadata"]["original_instance"] is records[2]


def test_templama_first_record_may_be_the_later_year() -> None:
    out = prepare_templama.changed_answers([lama("Q _X_", "2020", "New"), lama("Q _X_", "2017", "Old")])
    assert [r["answers"] for r in out["2017"]] == [["Old"]] and [r["answers"] for r in out["2020"]] == [["New"]]


def test_templama_main_writes_the_original_layout(tmp_path: Path) -> None:
    for split in prepare_templama.URLS:  # pre-placed raw files: nothing is downloaded
        lines = [lama(f"{split} _X_", "2017", "A"), lama(f"{split} _X_", "2020", "B")]
        (tmp_path / f"{split}.original.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    prepare_templama.main(str(tmp_path))
    for split in ("train", "valid", "test"):
        for year, answer in (("2017", "A"), ("2020", "B")):
            records = download_tools.read_jsonl(tmp_path / f"temp_lama.{split}.{year}.jsonl")
            assert [(r["question"], r["answers"]) for r in records] == [(f"{split} <extra_id_0>", [answer])]


# -------------------------------------------------------------------------------------------------------------- MMLU


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def row(i: int, tag: str) -> list[str]:
    return [f"{tag} question {i}, with a comma?\nand a newline", "w", "x", "y", "z", "ABCD"[i % 4]]


@pytest.fixture
def mmlu_tree(tmp_path: Path) -> Path:
    """A tiny MMLU data/ tree: 2 domains, auxiliary files of 4 and 3 rows."""
    data = tmp_path / "data"
    for domain in ("anatomy", "abstract_algebra"):
        write_csv(data / "dev" / f"{domain}_dev.csv", [row(i, f"{domain}-dev") for i in range(5)])
        write_csv(data / "val" / f"{domain}_val.csv", [row(i, f"{domain}-val") for i in range(2)])
        write_csv(data / "test" / f"{domain}_test.csv", [row(i, f"{domain}-test") for i in range(3)])
    write_csv(data / "auxiliary_train" / "race.csv", [row(i, "race") for i in range(4)])
    write_csv(data / "auxiliary_train" / "arc_easy.csv", [row(i, "arc") for i in range(3)])
    (data / "test" / ".DS_Store").write_text("not a csv")
    return data


def test_mmlu_row_to_record() -> None:
    record = prepare_mmlu.build_mmlu_instance("anatomy_test", ["Q?", "a", "b", "c", "d", "C"])
    assert record == {
        "question": "Q?",
        "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
        "answer": "C",
        "dataset": "anatomy_test",
    }
    assert prepare_mmlu.domain_name("high_school_us_history_test") == "high_school_us_history"
    assert prepare_mmlu.dataset_name("/x/data/dev/anatomy_dev.csv") == "anatomy_dev"


def test_mmlu_csv_parsing_and_bad_rows(mmlu_tree: Path) -> None:
    records = prepare_mmlu.parse_mmlu_csv(str(mmlu_tree / "dev" / "anatomy_dev.csv"))
    assert len(records) == 5 and records[0]["question"] == "anatomy-dev question 0, with a comma?\nand a newline"
    write_csv(mmlu_tree / "bad.csv", [["only", "three", "fields"]])
    with pytest.raises(SystemExit, match="bad.csv row 1 has 3 fields"):
        prepare_mmlu.parse_mmlu_csv(str(mmlu_tree / "bad.csv"))


def read_tree(root: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(root)): download_tools.read_jsonl(p) for p in sorted(root.rglob("*.jsonl"))}


def test_mmlu_layouts(mmlu_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_mmlu, "AUX_VALID_SIZE", 2)
    data = prepare_mmlu.parse_all_mmlu_data(str(mmlu_tree))
    assert list(data["test"]) == ["abstract_algebra_test", "anatomy_test"]  # sorted; .DS_Store skipped
    prepare_mmlu.make_all(data, str(tmp_path / "out"))
    tree = {k: v for k, v in read_tree(tmp_path / "out").items()}
    evals = {"combined_test.jsonl", "combined_valid.jsonl"} | {
        f"individual_{split}/{d}.{s}.jsonl"
        for split, s in (("valid", "val"), ("test", "test"))
        for d in ("abstract_algebra", "anatomy")
    }
    five = {f"individual_train/{d}.5-shot-train.jsonl" for d in ("abstract_algebra", "anatomy")}
    assert {k.split("/", 1)[1] for k in tree if k.startswith("5-shot/")} == evals | five
    assert {k.split("/", 1)[1] for k in tree if k.startswith("5-shot-multitask/")} == evals | {"train.jsonl"}
    assert {k.split("/", 1)[1] for k in tree if k.startswith("full/")} == evals | {
        "train.jsonl",
        "auxillary_valid.jsonl",
    }
    assert [r["dataset"] for r in tree["5-shot/individual_train/anatomy.5-shot-train.jsonl"]] == ["anatomy_dev"] * 5
    assert len(tree["5-shot/combined_test.jsonl"]) == 6 and len(tree["full/combined_valid.jsonl"]) == 4
    assert tree["5-shot-multitask/train.jsonl"] == data["dev"]["abstract_algebra_dev"] + data["dev"]["anatomy_dev"]
    # full/train.jsonl: auxiliary shuffled exactly like the original's random.seed(10); random.shuffle(...)
    auxiliary = data["auxiliary_train"]["arc_easy"] + data["auxiliary_train"]["race"]
    random.seed(10)
    random.shuffle(auxiliary)
    assert tree["full/auxillary_valid.jsonl"] == auxiliary[-2:]
    assert tree["full/train.jsonl"] == auxiliary[:-2] + tree["5-shot-multitask/train.jsonl"]


def test_prepare_mmlu_main_extracts_data_tar(mmlu_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_mmlu, "AUX_VALID_SIZE", 1)
    out = tmp_path / "mmlu_data"
    out.mkdir()
    with tarfile.open(out / "data.tar", "w") as tar:  # pre-placed download
        tar.add(mmlu_tree, arcname="data")
    prepare_mmlu.main(str(out))
    assert (out / "data" / "dev" / "anatomy_dev.csv").exists() and not (out / "data.extracted").exists()
    assert len(download_tools.read_jsonl(out / "full" / "train.jsonl")) == 6 + 10


# ------------------------------------------------------------------------------------------------------------- FEVER


def test_fever_64_shot_selection_keeps_file_order_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = prepare_fever.LABELS
    lines = [json.dumps({"id": i, "claim": f"claim {i}", "label": labels[i % 3], "evidence": []}) for i in range(10)]
    picked = prepare_fever.select_lines(lines, [7, 2, 5])
    assert [(r["claim"], r["label"]) for r in picked] == [
        ("claim 2", "NOT ENOUGH INFO"),
        ("claim 5", "NOT ENOUGH INFO"),
        ("claim 7", "REFUTES"),
    ]
    fever = tmp_path / "fever_data"
    fever.mkdir()
    (fever / "train.jsonl").write_text("\n".join(lines) + "\n")
    (fever / "dev.jsonl").write_text(lines[0] + "\n")
    (fever / "test.jsonl").write_text(json.dumps({"id": 1, "claim": "unlabelled"}) + "\n")
    monkeypatch.setattr(prepare_fever, "FEVER_64SHOT", [9, 0])
    prepare_fever.main(str(tmp_path))
    assert [r["id"] for r in download_tools.read_jsonl(fever / "train-64.jsonl")] == [0, 9]
    monkeypatch.setattr(prepare_fever, "FEVER_64SHOT", [3, 10])
    with pytest.raises(SystemExit, match="too short"):
        prepare_fever.main(str(tmp_path))


def test_fever_record_check() -> None:
    prepare_fever.check_records([{"claim": "c", "label": "SUPPORTS"}], "f")
    prepare_fever.check_records([{"claim": "c"}], "f", labelled=False)
    with pytest.raises(SystemExit, match="f record 2 has label 'TRUE'"):
        prepare_fever.check_records([{"claim": "c", "label": "REFUTES"}, {"claim": "d", "label": "TRUE"}], "f")


def test_64_shot_lists_are_64_distinct_indices() -> None:
    for shots in (prepare_qa.NQ_64SHOT, prepare_qa.TRIVIAQA_64SHOT, prepare_fever.FEVER_64SHOT):
        assert len(shots) == len(set(shots)) == 64


# ------------------------------------------------------------------------------------------------- download scripts


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record (url, target) of every maybe_download_file call instead of downloading."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(
        download_tools, "maybe_download_file", lambda url, target: calls.append((url, target)) or target
    )
    return calls


BASE = "https://dl.fbaipublicfiles.com/atlas/"


def test_download_corpus_urls(fetched: list, tmp_path: Path) -> None:
    download_corpus.main(str(tmp_path), "corpora/wiki/enwiki-dec2018")
    key = "corpora/wiki/enwiki-dec2018"
    assert fetched == [
        (f"{BASE}{key}/{f}", str(tmp_path / key / f)) for f in ("text-list-100-sec.jsonl", "infobox.jsonl")
    ]
    assert set(download_corpus.AVAILABLE_CORPORA) == {
        f"corpora/wiki/enwiki-{d}" for d in ("dec2017", "dec2018", "aug2019", "dec2020", "dec2021")
    }


def test_download_model_urls(fetched: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert len(download_model.AVAILABLE_MODELS) == 8
    download_model.main(str(tmp_path), "models/atlas_nq/xxl")
    assert fetched == [
        (f"{BASE}models/atlas_nq/xxl/model.pth.tar", str(tmp_path / "models/atlas_nq/xxl/model.pth.tar"))
    ]
    assert "--reader_model_type google/t5-xxl-lm-adapt" in capsys.readouterr().out


def test_download_index_urls_and_conversion_hint(fetched: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert len(download_index.AVAILABLE_INDICES) == 8
    download_index.main(str(tmp_path), "indices/atlas/wiki/base")
    assert len(fetched) == 256
    assert fetched[0] == (
        f"{BASE}indices/atlas/wiki/base/passages.0.pt",
        str(tmp_path / "indices/atlas/wiki/base/passages.0.pt"),
    )
    assert fetched[-1][0] == f"{BASE}indices/atlas/wiki/base/embeddings.127.pt"
    out = capsys.readouterr().out
    src = tmp_path / "indices/atlas/wiki/base"
    assert f"python preprocessing/convert_atlas_index.py {src} {src}-converted" in out
    assert f"--load_index_path {src}-converted" in out


@pytest.mark.parametrize(
    "module, flag", [(download_corpus, "--corpus"), (download_model, "--model"), (download_index, "--index")]
)
def test_unknown_key_lists_valid_keys(module, flag: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.build_parser().parse_args([flag, "models/atlas/huge"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'models/atlas/huge'" in err and ("base'" in err or "dec2018'" in err)


def test_unknown_key_in_lookup_functions() -> None:
    for lookup in (download_corpus.corpus_files, download_model.model_path, download_index.index_files):
        with pytest.raises(KeyError, match="choose from"):
            lookup("nope")


def test_download_index_convert_flag_runs_the_converter(fetched: list, tmp_path: Path) -> None:
    """--convert turns the downloaded (here: hand-made, 2-shard) original index into a loadable new index."""
    import torch

    from src.index import files as index_io

    src = tmp_path / "indices/atlas/wiki/base"
    src.mkdir(parents=True)
    for shard in range(2):
        passages = [{"id": f"{shard}-{i}", "title": "T", "text": f"text {shard} {i}"} for i in range(3)]
        (src / f"passages.{shard}.pt").write_bytes(pickle.dumps(passages))
        torch.save(torch.randn(8, 3).half(), src / f"embeddings.{shard}.pt")
    args = download_index.build_parser().parse_args(["--index", "indices/atlas/wiki/base", "--convert"])
    assert args.convert == ""
    dst = download_index.main(str(tmp_path), args.index, args.convert)
    assert dst == f"{src}-converted"
    manifest = index_io.read_manifest(dst)
    assert manifest["n_passages"] == 6 and manifest["dim"] == 8
    download_index.main(str(tmp_path), args.index, args.convert)  # already converted: left alone


# --------------------------------------------------------------------------------------------------- download_tools


# The download itself (sizes, resume, errors, --base_url end to end) is tested in test_downloads.py.


def test_extract_tar_refuses_escaping_members(tmp_path: Path) -> None:
    write_json_tar(tmp_path / "bad.tar.gz", {"../evil.json": {}})
    with pytest.raises(SystemExit, match="outside"):
        download_tools.extract_tar(str(tmp_path / "bad.tar.gz"), str(tmp_path / "dest"))
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "dest").exists()


def test_write_jsonl_is_atomic_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.jsonl"
    assert download_tools.write_jsonl(str(path), [{"q": "Zürich"}, {"q": "東京"}]) == 2
    assert "Zürich" in path.read_text(encoding="utf-8") and not Path(str(path) + ".tmp").exists()
    assert download_tools.read_jsonl(str(path)) == [{"q": "Zürich"}, {"q": "東京"}]


# -------------------------------------------------------------------------------------------------- example scripts


def entry_commands(text: str) -> list[tuple[str, str]]:
    """(entry point, argument text) of each train.py / evaluate.py command, following backslash continuations."""
    lines, commands, i = text.splitlines(), [], 0
    while i < len(lines):
        match = re.search(r'"\$\{LAUNCH\[@\]\}" (train|evaluate)\.py\b', lines[i])
        if match:
            parts = [lines[i][match.end() :]]
            while parts[-1].rstrip().endswith("\\"):
                i += 1
                parts.append(lines[i])
            commands.append((match.group(1), " ".join(p.rstrip().removesuffix("\\") for p in parts)))
        i += 1
    return commands


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", text))


class HelpFlags(dict):
    """name -> flags listed by ``python {name}.py -h`` (train/evaluate at the root, else preprocessing/), cached."""

    def __missing__(self, name: str) -> set[str]:
        path = ROOT / f"{name}.py" if name in ("train", "evaluate") else PREPROCESSING / f"{name}.py"
        run = subprocess.run([sys.executable, str(path), "-h"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        self[name] = flags_in(run.stdout)
        return self[name]


@pytest.fixture(scope="module")
def help_flags() -> HelpFlags:
    return HelpFlags()


def test_the_example_scripts_exist() -> None:
    assert len(SCRIPTS) == 12 and all(script.is_file() for script in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_syntax_header_and_flags(script: Path, help_flags: HelpFlags) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n#SBATCH ") and "example_scripts/launcher.sh" in text
    commands = entry_commands(text)
    assert len(commands) == 1
    entry, args = commands[0]
    unknown = flags_in(args) - help_flags["train"] - help_flags[entry]
    assert not unknown, f"{script.name} uses flags that `python train.py -h` does not list: {sorted(unknown)}"
    assert len(re.findall(r"--target_maxlength\b", args)) <= 1 and "copora" not in text


def test_preprocessing_commands_in_docs_use_real_flags(help_flags: HelpFlags) -> None:
    docs = SCRIPTS + [ROOT / "example_scripts" / "mmlu" / "README_MMLU.md"]
    seen = 0
    for path in docs:
        for name, args in re.findall(r"python preprocessing/(\w+)\.py([^\n]*)", path.read_text()):
            unknown = flags_in(args) - help_flags[name]
            assert not unknown, f"{path.name}: preprocessing/{name}.py has no {sorted(unknown)}"
            seen += 1
    assert seen > 20


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    """Environment with fake torchrun/srun that record their argv, a scratch DATA_DIR, and no SLURM variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for launcher in ("torchrun", "srun"):
        stub = bin_dir / launcher
        stub.write_text(f'#!/bin/bash\nprintf \'%s\\n\' {launcher} "$@" > "$STUB_OUT"\n')
        stub.chmod(0o755)
    data = tmp_path / "data"
    for name in ("text-list-100-sec.jsonl", "infobox.jsonl"):  # lm/mlm: corpus already split, nothing downloaded
        path = data / "corpora/wiki/enwiki-dec2018" / f"{name}.shuf.train"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "RDZV", "JOB_ID", "LAUNCHER"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_OUT=str(tmp_path / "argv"), DATA_DIR=str(data), NGPU="3")
    return env


SCRIPT_ARGS = {"evaluate.sh": ["2020", "/ckpt/step-100"]}


def run_script(script: Path, env: dict[str, str], cwd: Path) -> list[str]:
    args = SCRIPT_ARGS.get(script.name, []) if script.parent.name == "templama" else []
    run = subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return Path(env["STUB_OUT"]).read_text().splitlines()


def parsed(argv: list[str]) -> tuple[str, object]:
    """The entry point and the options it would parse, from a launcher's argv.

    A task of the original that is not implemented yet must be refused by the parser with that reason; the
    script's other flags are then checked with --task qa in its place.
    """
    at = next(i for i, a in enumerate(argv) if a in ("train.py", "evaluate.py"))
    mode, args = argv[at].removesuffix(".py"), argv[at + 1 :]
    task = args[args.index("--task") + 1] if "--task" in args else None
    if task in UNIMPLEMENTED_TASKS:
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            parse_options(args, mode)
        assert f"task '{task}' of the original Atlas is not implemented yet" in err.getvalue()
        args[args.index("--task") + 1] = "qa"
    opt = parse_options(args, mode)
    opt.task = task  # what the script asks for
    return mode, opt


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_launch_with_torchrun_and_srun(script: Path, stub_env: dict[str, str], tmp_path: Path) -> None:
    data = stub_env["DATA_DIR"]
    argv = run_script(script, stub_env, tmp_path)  # run from elsewhere: the script finds the repository itself
    assert argv[:3] == ["torchrun", "--standalone", "--nproc_per_node=3"]
    mode, opt = parsed(argv)
    assert mode == ("evaluate" if script.name in ("evaluate.sh", "retrieve_only.sh", "mmlu-zeroshot.sh") else "train")
    for path in list(opt.train_data) + list(opt.eval_data) + list(opt.passages or []) + [opt.load_index_path or data]:
        assert path.startswith(data), path
    slurm = dict(
        stub_env, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="56"
    )
    argv = run_script(script, slurm, tmp_path)
    assert argv[:2] == ["srun", "python"]
    _, slurm_opt = parsed(argv)
    assert 15000 <= slurm_opt.main_port <= 16000
    assert "4240" in slurm_opt.name + slurm_opt.checkpoint_dir
    if script.name == "mmlu-5-shot.sh":
        assert slurm_opt.name == "world_religions"
        assert slurm_opt.eval_data[1].endswith("5-shot/individual_test/world_religions.test.jsonl")


def test_script_specifics(stub_env: dict[str, str], tmp_path: Path) -> None:
    scripts = ROOT / "example_scripts"
    _, opt = parsed(run_script(scripts / "nq/train_fewshot.sh", stub_env, tmp_path))
    assert opt.load_index_path.endswith("indices/atlas/wiki/large-converted") and opt.query_side_retriever_training
    assert (opt.per_gpu_batch_size, opt.n_context, opt.total_steps, opt.gold_score_mode) == (2, 40, 30, "ppmean")
    _, opt = parsed(run_script(scripts / "nq/evaluate.sh", stub_env, tmp_path))
    assert opt.target_maxlength == 16 and opt.model_path.endswith("models/atlas_nq/xl")
    _, opt = parsed(run_script(scripts / "templama/evaluate.sh", stub_env, tmp_path))
    assert opt.model_path == "/ckpt/step-100" and opt.qa_prompt_format == "{question}" and opt.write_results
    assert opt.passages[0].endswith("corpora/wiki/enwiki-dec2020/text-list-100-sec.jsonl")
    _, opt = parsed(run_script(scripts / "mmlu/mmlu-5-shot.sh", stub_env, tmp_path))
    assert opt.train_data[0].endswith("individual_train/abstract_algebra.5-shot-train.jsonl")
    _, opt = parsed(run_script(scripts / "mlm/train.sh", stub_env, tmp_path))
    assert (opt.task, opt.model_path, opt.precision) == ("mlm", "none", "fp32") and opt.shard_optim and opt.shard_grads


def test_multi_node_torchrun(stub_env: dict[str, str], tmp_path: Path) -> None:
    script = ROOT / "example_scripts" / "nq" / "train.sh"
    env = dict(stub_env, NNODES="4", RDZV_ENDPOINT="node001:29400", JOB_ID="run7")
    argv = run_script(script, env, tmp_path)
    assert argv[:6] == [
        "torchrun",
        "--nnodes=4",
        "--nproc_per_node=3",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node001:29400",
        "--rdzv_id=run7",
    ]
    assert parsed(argv)[1].name == "run7-xl-nq"
    del env["RDZV_ENDPOINT"]
    run = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "RDZV_ENDPOINT" in run.stderr


def test_templama_evaluate_needs_a_model(stub_env: dict[str, str], tmp_path: Path) -> None:
    script = ROOT / "example_scripts" / "templama" / "evaluate.sh"
    run = subprocess.run(["bash", str(script), "2017"], env=stub_env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and "MODEL_TO_EVAL" in run.stderr
