"""Download TempLAMA and derive the Atlas temporal cloze-QA files.

    python preprocessing/prepare_templama.py --output_directory ${DATA_DIR}

Writes ``${DATA_DIR}/data/templama_data/temp_lama.{train,valid,test}.{2017,2020}.jsonl`` (the raw TempLAMA files
are kept beside them as ``{split}.original.jsonl``). Only queries whose answer changes between the years are kept:
for each query, its first record (in file order) among the chosen years is compared with the later ones, and a later
record is kept if it shares no answer name with the first; the first is kept when at least one later record is.
Records are ``{"question": query with "_X_" replaced by "<extra_id_0>", "answers": [unique answer names],
"metadata": {"original_instance": raw record}}``. Use them with ``--task qa --qa_prompt_format "{question}"``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from typing import Any

import download_tools

URLS = {
    "train": "https://storage.googleapis.com/gresearch/templama/train.json",
    "valid": "https://storage.googleapis.com/gresearch/templama/val.json",
    "test": "https://storage.googleapis.com/gresearch/templama/test.json",
}
YEARS = ("2017", "2020")


def prep_question(question: str) -> str:
    """TempLAMA marks the blank with ``_X_``; T5 fills blanks marked by its first sentinel."""
    return question.replace("_X_", "<extra_id_0>")


def answer_names(record: dict[str, Any]) -> list[str]:
    """Unique answer names of a TempLAMA record, in first-seen order (the original used an unordered set)."""
    return list(dict.fromkeys(answer["name"] for answer in record["answer"]))


def export_record(record: dict[str, Any]) -> dict[str, Any]:
    """Raw TempLAMA record -> Atlas QA record."""
    return {
        "question": prep_question(record["query"]),
        "answers": answer_names(record),
        "metadata": {"original_instance": record},
    }


def group_by_query(records: Iterable[dict[str, Any]], years: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Records dated in ``years``, grouped by query in file order."""
    years = {str(y) for y in years}
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if str(record["date"]) in years:
            groups.setdefault(record["query"], []).append(record)
    return groups


def changed_answers(records: Iterable[dict[str, Any]], years: Iterable[str] = YEARS) -> dict[str, list[dict]]:
    """Year -> exported records of the queries whose answers differ between ``years`` (see module docstring)."""
    years = [str(y) for y in years]
    out: dict[str, list[dict[str, Any]]] = {y: [] for y in years}
    for group in group_by_query(records, years).values():
        first, later = group[0], group[1:]
        before = set(answer_names(first))
        changed = [r for r in later if all(name not in before for name in answer_names(r))]
        if changed:
            out[str(first["date"])].append(export_record(first))
            for record in changed:
                out[str(record["date"])].append(export_record(record))
    return out


def write_split(output_directory: str, split: str, by_year: dict[str, list[dict[str, Any]]]) -> None:
    for year, items in by_year.items():
        path = os.path.join(output_directory, f"temp_lama.{split}.{year}.jsonl")
        n = download_tools.write_jsonl(path, items)
        print(f"{n:>8} examples in {path}")


def main(output_directory: str) -> None:
    """Download the raw splits into ``output_directory`` and write the derived files next to them."""
    os.makedirs(output_directory, exist_ok=True)
    for split, url in URLS.items():
        raw = download_tools.maybe_download_file(url, os.path.join(output_directory, f"{split}.original.jsonl"))
        write_split(output_directory, split, changed_answers(download_tools.read_jsonl(raw)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download TempLAMA and derive the Atlas temporal QA files.")
    parser.add_argument(
        "--output_directory", type=str, default="./data", help="files go to {output_directory}/data/templama_data/"
    )
    args = parser.parse_args()
    main(os.path.join(args.output_directory, "data", "templama_data"))
