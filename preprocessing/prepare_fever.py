"""Download FEVER and write the Atlas fact-checking files.

    python preprocessing/prepare_fever.py --output_directory ${DATA_DIR}

Writes ``${DATA_DIR}/fever_data/{train,dev,test}.jsonl`` (FEVER train, shared_task_dev and shared_task_test, as
published: records with ``claim`` and, except test, ``label`` in SUPPORTS / REFUTES / NOT ENOUGH INFO) and
``train-64.jsonl``: the 64 train claims of the Atlas few-shot experiments, in file order. The line numbers below are
copied from the original ``prepare_fever.py``, so the file is identical to the original's. Use the files with
``--task fever``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any

import download_tools

URLS = {
    "train": "https://fever.ai/download/fever/train.jsonl",
    "dev": "https://fever.ai/download/fever/shared_task_dev.jsonl",
    "test": "https://fever.ai/download/fever/shared_task_test.jsonl",
}
LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")

# Line numbers (0-based) in FEVER train.jsonl of the 64 few-shot claims (from the original prepare_fever.py).
FEVER_64SHOT = [
    23236, 131610, 70907, 110333, 83874, 121714, 17355, 115320, 9907, 42725, 43614, 139489, 30589, 76963, 5916, 7241,
    68848, 59902, 113855, 110886, 102332, 79223, 24359, 105929, 131435, 118883, 8152, 119911, 28803, 111318, 29503,
    43420, 39533, 15214, 29807, 29242, 10288, 111860, 77451, 102160, 77982, 132435, 2875, 47721, 92378, 128574, 24721,
    83985, 41521, 97851, 137243, 74916, 85056, 135, 130085, 19233, 2887, 124345, 91769, 63969, 50865, 135928, 143220,
    124300,
]  # fmt: skip


def select_lines(lines: Iterable[str], line_numbers: Iterable[int]) -> list[dict[str, Any]]:
    """Records on the given 0-based line numbers, in file order (as the original wrote them)."""
    wanted = set(line_numbers)
    return [json.loads(line) for k, line in enumerate(lines) if k in wanted]


def check_records(records: Iterable[dict[str, Any]], path: str, labelled: bool = True) -> None:
    """Fail with a message naming ``path`` if a record lacks a claim, or (``labelled``) a known label."""
    for k, record in enumerate(records, 1):
        if not isinstance(record.get("claim"), str):
            raise SystemExit(f"error: {path} record {k} has no 'claim' string")
        if labelled and record.get("label") not in LABELS:
            raise SystemExit(f"error: {path} record {k} has label {record.get('label')!r}, expected one of {LABELS}")


def main(output_directory: str, overwrite: bool = False) -> None:
    fever_dir = os.path.join(output_directory, "fever_data")
    paths = {split: os.path.join(fever_dir, f"{split}.jsonl") for split in URLS}
    for split, url in URLS.items():
        if overwrite and os.path.exists(paths[split]):
            os.remove(paths[split])
        download_tools.maybe_download_file(url, paths[split])
    with open(paths["train"], encoding="utf-8") as f:
        fewshot = select_lines(f, FEVER_64SHOT)
    if len(fewshot) != len(FEVER_64SHOT):
        raise SystemExit(f"error: {paths['train']} is too short for the 64-shot line numbers: is it FEVER train?")
    check_records(fewshot, paths["train"])
    out = os.path.join(fever_dir, "train-64.jsonl")
    download_tools.write_jsonl(out, fewshot)
    print(f"{len(fewshot):>8} examples in {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download FEVER for Atlas.")
    parser.add_argument("--output_directory", type=str, default="./data/", help="fever_data/ goes here")
    parser.add_argument("--overwrite", action="store_true", help="download the FEVER files again")
    args = parser.parse_args()
    main(args.output_directory, args.overwrite)
