"""Download MMLU (Hendrycks et al.) and write the Atlas multiple-choice files for its three settings.

    python preprocessing/prepare_mmlu.py --output_directory ${DATA_DIR}

Everything goes to ``${DATA_DIR}/data/mmlu_data/`` (``data.tar`` and its extracted ``data/`` are kept):

    5-shot/             individual_train/{domain}.5-shot-train.jsonl   (the 5 dev examples of each domain)
                        individual_valid/{domain}.val.jsonl, individual_test/{domain}.test.jsonl
                        combined_valid.jsonl, combined_test.jsonl
    5-shot-multitask/   train.jsonl (all domains' 5-shot examples) + the same valid/test files
    full/               train.jsonl (auxiliary_train minus 5000 held out, then all 5-shot examples),
                        auxillary_valid.jsonl (the 5000 held out; name spelled as the original) + valid/test files

* 5-shot: train one model per domain on 5-shot/individual_train/{domain}.5-shot-train.jsonl and test on
  5-shot/individual_test/{domain}.test.jsonl. (Zero-shot: evaluate 5-shot-multitask/combined_test.jsonl untrained.)
* 5-shot-multitask: train on 5-shot-multitask/train.jsonl, test on 5-shot-multitask/combined_test.jsonl.
* full: train on full/train.jsonl, test on full/combined_test.jsonl.
Overall accuracy is the micro average over the domains' test sets.

Records: ``{"question", "options": {"A".."D"}, "answer": letter, "dataset": csv file stem}``. The auxiliary data is
shuffled with ``random.Random(10)`` as in the original; csv files are read in sorted name order (the original used
``os.listdir`` order, which depends on the file system), so ``full/`` is reproducible.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
from typing import Any

import download_tools

DATA_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
RAW_SPLITS = ("auxiliary_train", "dev", "val", "test")
AUX_VALID_SIZE = 5000
SHUFFLE_SEED = 10

Record = dict[str, Any]
Data = dict[str, dict[str, list[Record]]]  # raw split -> csv stem -> records


def build_mmlu_instance(name: str, row: list[str]) -> Record:
    """One MMLU csv row ``question, A, B, C, D, answer`` -> Atlas record; ``name`` is the csv stem."""
    question, option_a, option_b, option_c, option_d, answer = row
    return {
        "question": question,
        "options": {"A": option_a, "B": option_b, "C": option_c, "D": option_d},
        "answer": answer,
        "dataset": name,
    }


def dataset_name(path: str) -> str:
    """``.../abstract_algebra_test.csv`` -> ``abstract_algebra_test``."""
    return os.path.basename(path).removesuffix(".csv")


def domain_name(dataset: str) -> str:
    """Drop the split suffix of a csv stem: ``abstract_algebra_test`` -> ``abstract_algebra``."""
    return "_".join(dataset.split("_")[:-1])


def parse_mmlu_csv(path: str) -> list[Record]:
    name, records = dataset_name(path), []
    with open(path, encoding="utf-8", newline="") as f:
        for line_number, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise SystemExit(f"error: {path} row {line_number} has {len(row)} fields, expected 6")
            records.append(build_mmlu_instance(name, row))
    return records


def parse_all_mmlu_data(directory: str) -> Data:
    """Read every ``{split}/*.csv`` of the extracted MMLU ``data/`` directory, in sorted file order."""
    data: Data = {}
    for split in RAW_SPLITS:
        split_dir = os.path.join(directory, split)
        names = sorted(f for f in os.listdir(split_dir) if f.endswith(".csv"))
        data[split] = {dataset_name(f): parse_mmlu_csv(os.path.join(split_dir, f)) for f in names}
    return data


def _combined(per_dataset: dict[str, list[Record]]) -> list[Record]:
    return [record for records in per_dataset.values() for record in records]


def _dump(path: str, records: list[Record]) -> None:
    download_tools.write_jsonl(path, records)


def _write_individual(per_dataset: dict[str, list[Record]], directory: str, suffix: str) -> None:
    for name, records in per_dataset.items():
        _dump(os.path.join(directory, f"{domain_name(name)}.{suffix}.jsonl"), records)


def _write_eval_files(data: Data, output_directory: str) -> None:
    """individual_{valid,test}/ and combined_{valid,test}.jsonl: the same in every setting."""
    _write_individual(data["val"], os.path.join(output_directory, "individual_valid"), "val")
    _write_individual(data["test"], os.path.join(output_directory, "individual_test"), "test")
    _dump(os.path.join(output_directory, "combined_valid.jsonl"), _combined(data["val"]))
    _dump(os.path.join(output_directory, "combined_test.jsonl"), _combined(data["test"]))


def make_five_shot_data(data: Data, output_directory: str) -> None:
    """5-shot/: one training file per domain."""
    _write_individual(data["dev"], os.path.join(output_directory, "individual_train"), "5-shot-train")
    _write_eval_files(data, output_directory)


def make_five_shot_multitask_data(data: Data, output_directory: str) -> None:
    """5-shot-multitask/: every domain's 5 examples in one training file."""
    _dump(os.path.join(output_directory, "train.jsonl"), _combined(data["dev"]))
    _write_eval_files(data, output_directory)


def split_auxiliary(data: Data) -> tuple[list[Record], list[Record]]:
    """(train, held-out valid) of the auxiliary data: shuffled with seed 10, the last 5000 held out."""
    auxiliary = _combined(data["auxiliary_train"])
    random.Random(SHUFFLE_SEED).shuffle(auxiliary)  # same permutation as the original's random.seed(10); shuffle
    return auxiliary[:-AUX_VALID_SIZE], auxiliary[-AUX_VALID_SIZE:]


def make_full_transfer_data(data: Data, output_directory: str) -> None:
    """full/: auxiliary training data plus all 5-shot examples."""
    auxiliary_train, auxiliary_valid = split_auxiliary(data)
    _dump(os.path.join(output_directory, "auxillary_valid.jsonl"), auxiliary_valid)
    _dump(os.path.join(output_directory, "train.jsonl"), auxiliary_train + _combined(data["dev"]))
    _write_eval_files(data, output_directory)


def make_all(data: Data, output_directory: str) -> None:
    """Write the three settings under ``output_directory``."""
    make_five_shot_data(data, os.path.join(output_directory, "5-shot"))
    make_five_shot_multitask_data(data, os.path.join(output_directory, "5-shot-multitask"))
    make_full_transfer_data(data, os.path.join(output_directory, "full"))


def main(output_directory: str) -> None:
    tar = download_tools.maybe_download_file(DATA_URL, os.path.join(output_directory, "data.tar"))
    raw = os.path.join(output_directory, "data")
    if not os.path.exists(raw):  # data.tar holds one top-level directory, data/
        extracted = download_tools.extract_tar(tar, raw + ".extracted")
        if not os.path.isdir(os.path.join(extracted, "data")):
            raise SystemExit(f"error: {tar} has no top-level data/ directory: is it the MMLU data.tar?")
        os.replace(os.path.join(extracted, "data"), raw)
        shutil.rmtree(extracted)
    make_all(parse_all_mmlu_data(raw), output_directory)
    print(f"MMLU files written under {output_directory}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output_directory", type=str, default="./data/", help="files go to {output_directory}/data/mmlu_data/"
    )
    args = parser.parse_args()
    main(os.path.join(args.output_directory, "data", "mmlu_data"))
