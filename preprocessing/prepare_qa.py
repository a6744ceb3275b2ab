"""Download NaturalQuestions-open and TriviaQA and write them as Atlas QA jsonl files.

    python preprocessing/prepare_qa.py --output_directory ${DATA_DIR}/data

Writes ``{out}/nq_data/`` and ``{out}/triviaqa_data/``, each with ``train.jsonl``, ``train.64-shot.jsonl``,
``dev.jsonl`` and ``test.jsonl``:

* NQ records are ``{"question", "answers"}``. train/dev are the FiD split (Izacard & Grave) of NQ-open train;
  test is NQ-open dev.
* TriviaQA records are ``{"question", "answers": Answer.Aliases, "target": Answer.Value}``, the target title-cased
  when it is all upper case. train/dev are the FiD split of unfiltered-web-train; test is drawn from
  unfiltered-web-dev.
* The split indices come from FiD's ``dataindex.tar.gz``. The 64-shot sets are the exact examples the Atlas paper
  used: the index lists below are copied from the original ``prepare_qa.py`` (positions in NQ-open train and in
  TriviaQA unfiltered-web-train), so the files are identical to the original's.

Raw downloads are removed once the files are written. Existing output directories are kept unless --overwrite.

FiD's ``dataindex.tar.gz`` was on the bucket that has been closed since Aug 2024 (facebookresearch/atlas issue #25):
``--base_url URL`` or ``FID_BASE_URL=URL`` (the flag wins) names the directory holding a copy of it, e.g.
``--base_url file:///mnt/fid`` for ``/mnt/fid/dataindex.tar.gz``. NQ-open (GitHub) and TriviaQA (UW) come from their
own hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import download_tools

INDEX_FILE = "dataindex.tar.gz"  # under download_tools.FID: the flag --base_url, $FID_BASE_URL, or FiD's bucket
NQ_URL = "https://raw.githubusercontent.com/google-research-datasets/natural-questions/master/nq_open/NQ-open.{}.jsonl"
TRIVIAQA_URL = "http://nlp.cs.washington.edu/triviaqa/data/triviaqa-unfiltered.tar.gz"
TRIVIAQA_FILES = {"train": "unfiltered-web-train.json", "dev": "unfiltered-web-dev.json"}
SPLITS = ("train", "dev", "test")

# The 64 NQ-open train examples of the Atlas few-shot experiments (from the original prepare_qa.py).
NQ_64SHOT = [
    27144, 14489, 49702, 38094, 6988, 60660, 65643, 48249, 48085, 52629, 48431, 7262, 34659, 24332, 44839, 17721,
    50819, 62279, 37021, 77405, 52556, 23802, 40974, 64678, 69673, 77277, 18419, 25635, 1513, 11930, 5542, 13453,
    52754, 65663, 67400, 42409, 74541, 33159, 65445, 28572, 74069, 7162, 19204, 63509, 12244, 48532, 72778, 37507,
    70300, 29927, 18186, 27579, 58411, 63559, 4347, 59383, 57392, 42014, 77920, 45592, 32321, 3422, 61041, 34051,
]  # fmt: skip

# The 64 TriviaQA unfiltered-web-train examples of the Atlas few-shot experiments (from the original prepare_qa.py).
TRIVIAQA_64SHOT = [
    75927, 38807, 452, 68095, 44621, 34592, 36091, 65286, 56484, 48197, 34692, 28011, 16670, 62641, 37865, 6658,
    45724, 37527, 17740, 31133, 8010, 48573, 53670, 15514, 25996, 54404, 10739, 55105, 66122, 73324, 41202, 71253,
    41258, 51344, 60092, 50455, 65078, 36169, 33408, 55106, 40526, 65582, 66337, 39766, 77174, 17289, 7367, 50930,
    21151, 21809, 52804, 26110, 54414, 73358, 11459, 66019, 41084, 13349, 39059, 6626, 25540, 15110, 53320, 61313,
]  # fmt: skip


def convert_nq(ex: dict[str, Any]) -> dict[str, Any]:
    """NQ-open record ``{"question", "answer": [...]}`` -> ``{"question", "answers"}``."""
    return {"question": ex["question"], "answers": ex["answer"]}


def convert_triviaqa(ex: dict[str, Any]) -> dict[str, Any]:
    """TriviaQA record -> ``{"question", "answers", "target"}``; an all-caps Value is title-cased for the target."""
    target = ex["Answer"]["Value"]
    if target.isupper():  # some Values are shouted ("PARIS"); the model should learn the usual casing
        target = target.title()
    return {"question": ex["Question"], "answers": ex["Answer"]["Aliases"], "target": target}


def _pick(records: list[dict[str, Any]], indices: list[int], what: str) -> list[dict[str, Any]]:
    if indices and max(indices) >= len(records):
        raise SystemExit(f"error: split index {max(indices)} is out of range for {what} ({len(records)} examples)")
    return [records[k] for k in indices]


def build_splits(
    raw_train: list[dict[str, Any]],
    raw_dev: list[dict[str, Any]],
    index: dict[str, list[int]],
    fewshot: list[int],
    convert: Any,
    name: str,
) -> dict[str, list[dict[str, Any]]]:
    """Output files (name -> records): train/dev from ``raw_train`` by ``index``, test from ``raw_dev``."""
    return {
        "train": [convert(ex) for ex in _pick(raw_train, index["train"], f"{name} train")],
        "train.64-shot": [convert(ex) for ex in _pick(raw_train, fewshot, f"{name} train")],
        "dev": [convert(ex) for ex in _pick(raw_train, index["dev"], f"{name} train")],
        "test": [convert(ex) for ex in _pick(raw_dev, index["test"], f"{name} dev")],
    }


def build_nq_splits(raw_train: list, raw_dev: list, index: dict[str, list[int]]) -> dict[str, list[dict[str, Any]]]:
    """NQ output files from NQ-open train/dev records and the FiD ``NQ.{split}.idx.json`` lists."""
    return build_splits(raw_train, raw_dev, index, NQ_64SHOT, convert_nq, "NQ-open")


def build_triviaqa_splits(raw_train: list, raw_dev: list, index: dict[str, list[int]]) -> dict[str, list[dict]]:
    """TriviaQA output files from unfiltered-web train/dev records and the FiD ``TQA.{split}.idx.json`` lists."""
    return build_splits(raw_train, raw_dev, index, TRIVIAQA_64SHOT, convert_triviaqa, "TriviaQA")


def read_split_index(index_tar: str, prefix: str) -> dict[str, list[int]]:
    """The FiD split lists ``{prefix}.{train,dev,test}.idx.json`` from ``dataindex.tar.gz``."""
    names = {split: f"{prefix}.{split}.idx.json" for split in SPLITS}
    contents = download_tools.read_tar_members(index_tar, names.values())
    return {split: json.loads(contents[name]) for split, name in names.items()}


def write_splits(output_dir: str, splits: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``{name}.jsonl`` per split into ``output_dir``, replacing it whole (a crash leaves no partial dir)."""
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, records in splits.items():
        n = download_tools.write_jsonl(os.path.join(tmp, f"{name}.jsonl"), records)
        print(f"{n:>8} examples in {os.path.join(output_dir, name + '.jsonl')}")
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)


def prepare_nq(raw_dir: str, index_tar: str, nq_dir: str) -> None:
    raw = {}
    for split in ("train", "dev"):
        path = download_tools.maybe_download_file(NQ_URL.format(split), os.path.join(raw_dir, f"NQ-open.{split}.jsonl"))
        raw[split] = download_tools.read_jsonl(path)
    write_splits(nq_dir, build_nq_splits(raw["train"], raw["dev"], read_split_index(index_tar, "NQ")))


def prepare_triviaqa(raw_dir: str, index_tar: str, triviaqa_dir: str) -> None:
    tar = download_tools.maybe_download_file(TRIVIAQA_URL, os.path.join(raw_dir, "triviaqa-unfiltered.tar.gz"))
    contents = download_tools.read_tar_members(tar, TRIVIAQA_FILES.values())
    train, dev = (json.loads(contents[TRIVIAQA_FILES[split]])["Data"] for split in ("train", "dev"))
    del contents  # the raw json is large: free it before building the splits
    write_splits(triviaqa_dir, build_triviaqa_splits(train, dev, read_split_index(index_tar, "TQA")))


def main(output_directory: str, overwrite: bool = False, base_url: str | None = None) -> None:
    """Write nq_data/ and triviaqa_data/ under ``output_directory``; FiD's index comes from ``base_url`` (resolved)."""
    nq_dir = os.path.join(output_directory, "nq_data")
    triviaqa_dir = os.path.join(output_directory, "triviaqa_data")
    raw_dir = os.path.join(output_directory, "qa_raw_downloads")
    do_nq = overwrite or not os.path.exists(nq_dir)
    do_triviaqa = overwrite or not os.path.exists(triviaqa_dir)
    if not do_nq:
        print(f"{nq_dir} exists, not overwriting (pass --overwrite)")
    if not do_triviaqa:
        print(f"{triviaqa_dir} exists, not overwriting (pass --overwrite)")
    if not (do_nq or do_triviaqa):
        return
    index_url = f"{download_tools.FID.resolve(base_url)}/{INDEX_FILE}"
    index_tar = download_tools.maybe_download_file(index_url, os.path.join(raw_dir, INDEX_FILE))
    if do_triviaqa:
        prepare_triviaqa(raw_dir, index_tar, triviaqa_dir)
    if do_nq:
        prepare_nq(raw_dir, index_tar, nq_dir)
    shutil.rmtree(raw_dir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download and prepare NaturalQuestions-open and TriviaQA for Atlas.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--output_directory", type=str, default="./data/", help="nq_data/ and triviaqa_data/ go here")
    parser.add_argument("--overwrite", action="store_true", help="rebuild existing nq_data/ and triviaqa_data/")
    download_tools.add_base_url_argument(parser, download_tools.FID, INDEX_FILE)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    main(args.output_directory, args.overwrite, args.base_url)
