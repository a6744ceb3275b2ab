"""Score MMLU predictions written by `--task multiple_choice --write_results`: accuracy per subject and per category.

    python example_scripts/mmlu/evaluate_mmlu_predictions.py \
        --predictions_path ${SAVE_DIR}/${EXPERIMENT_NAME}/combined_test-step-${STEP}.jsonl \
        [--gold_path ${DATA_DIR}/data/mmlu_data/5-shot-multitask/combined_test.jsonl]
    python example_scripts/mmlu/evaluate_mmlu_predictions.py --predictions_path ${SAVE_DIR} --step 16 --split test

`--predictions_path` takes results files, or (5-shot) the directory holding one experiment directory per subject,
from which `{subject}/{subject}.{split}-step-{step}.jsonl` is read for every subdirectory named after an MMLU subject.

Each results row is one question (the task writes the row of its original answer order). Two accuracies, as the
original's script:
- Acc: the letter with the highest logit in the original answer order (`choice_logits` of the `permutations` row
  marked `is_original`). It differs from the evaluation's `accuracy` metric, which scores the generated text of every
  permutation row;
- Debias Acc: the row's `generation`, the letter whose probability averaged over the answer orders is highest (the
  evaluation's `debiased_accuracy`).

The subject is the `dataset` field (a split suffix such as `_test`, which prepare_mmlu.py's csv stems carry, is
dropped), and the gold letter the row's `answer`. With `--gold_path` (an MMLU data file) the gold letters come from it
instead, matched by question and options, and every question of it must have a prediction. Per category and for "all"
the accuracy is the micro average over questions. A missing or malformed file ends in one line on stderr (exit 2).
Needs only the Python standard library.
"""

import argparse
import json
import sys
from pathlib import Path

# MMLU's 57 subjects in its four categories (Hendrycks et al., 2021; subcategories in the comments).
CATEGORIES = {
    "STEM": [
        *("astronomy", "college_physics", "conceptual_physics", "high_school_physics"),  # physics
        *("college_chemistry", "high_school_chemistry"),  # chemistry
        *("college_biology", "high_school_biology"),  # biology
        *("college_computer_science", "computer_security", "high_school_computer_science", "machine_learning"),
        *("abstract_algebra", "college_mathematics", "elementary_mathematics", "high_school_mathematics"),  # math
        *("high_school_statistics", "electrical_engineering"),  # math, engineering
    ],
    "humanities": [
        *("high_school_european_history", "high_school_us_history", "high_school_world_history", "prehistory"),
        *("formal_logic", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy"),  # philosophy
        *("world_religions", "international_law", "jurisprudence", "professional_law"),  # philosophy, law
    ],
    "social sciences": [
        *("high_school_government_and_politics", "public_relations", "security_studies", "us_foreign_policy"),
        *("human_sexuality", "sociology"),  # culture
        *("econometrics", "high_school_macroeconomics", "high_school_microeconomics"),  # economics
        *("high_school_geography", "high_school_psychology", "professional_psychology"),  # geography, psychology
    ],
    "other": [
        *("business_ethics", "management", "marketing", "professional_accounting"),  # business
        *("anatomy", "clinical_knowledge", "college_medicine", "human_aging", "medical_genetics", "nutrition"),
        *("professional_medicine", "virology"),  # health
        *("global_facts", "miscellaneous"),  # other
    ],
}
CATEGORY_OF = {subject: category for category, subjects in CATEGORIES.items() for subject in subjects}
SPLIT_SUFFIXES = ("_test", "_val", "_valid", "_dev")
REPORT_ORDER = ("humanities", "social sciences", "STEM", "other")  # the original's table order


class ScoreError(Exception):
    """A problem with an input file; printed as one line."""


def subject_of(dataset: str) -> str:
    """The MMLU subject of a `dataset` value: `abstract_algebra` or prepare_mmlu.py's `abstract_algebra_test`."""
    if dataset not in CATEGORY_OF:
        for suffix in SPLIT_SUFFIXES:
            if dataset.endswith(suffix) and dataset[: -len(suffix)] in CATEGORY_OF:
                return dataset[: -len(suffix)]
    return dataset


def question_key(question: str, options: dict) -> str:
    return json.dumps([question, sorted(options.items())], ensure_ascii=False)


def read_jsonl(path: Path):
    """(file:line, object) for each non-blank line; ScoreError for an unreadable file or a malformed line."""
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    try:  # split at "\n" only: str.splitlines() also splits at U+0085 or U+2028 in JSON strings (MMLU has U+0085)
        with open(path, encoding="utf-8", newline="\n") as handle:
            lines = list(handle)
    except (OSError, UnicodeDecodeError) as err:
        raise ScoreError(f"{path}: cannot read it ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScoreError(f"{where}: not valid JSON ({err.msg} at character {err.pos + 1})") from None
        if not isinstance(obj, dict):
            raise ScoreError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def plain_letter(original: dict, where: str) -> str:
    """The letter with the highest logit in the original order (`choice_logits`: a list aligned with the letters,
    or the original code's {letter: logit})."""
    logits = original.get("choice_logits")
    letters = sorted(original["metadata"].get("options") or {})
    if isinstance(logits, dict) and logits:
        return max(logits, key=logits.get)
    if isinstance(logits, list) and logits and len(logits) == len(letters):
        return letters[max(range(len(logits)), key=logits.__getitem__)]
    raise ScoreError(f"{where}: the original order's 'choice_logits' are missing or do not match its options")


def read_prediction(row: dict, where: str) -> dict:
    """{subject, key, answer, plain, debiased} of one results row."""
    permutations = row.get("permutations", row.get("permuatations"))  # the original once misspelt the key
    if not isinstance(permutations, list):
        raise ScoreError(f"{where}: no 'permutations': not a row written by --task multiple_choice --write_results")
    original = next(
        (p for p in permutations if isinstance(p, dict) and (p.get("metadata") or {}).get("is_original")), None
    )
    if original is None:
        raise ScoreError(f"{where}: no permutation row has metadata 'is_original' true")
    meta = original["metadata"]
    for field in ("question", "options", "answer", "dataset"):
        if field not in meta:
            raise ScoreError(f"{where}: the original order's metadata has no '{field}'")
    if not isinstance(row.get("generation"), str):
        raise ScoreError(f"{where}: no 'generation' (the de-biased letter)")
    return {
        "subject": subject_of(str(meta["dataset"])),
        "key": question_key(meta["question"], meta["options"]),
        "answer": meta["answer"],
        "plain": plain_letter(original, where),
        "debiased": row["generation"].strip(),
    }


def prediction_files(paths: list[str], step: int, split: str) -> list[Path]:
    """The results files: files as given, and for a directory its subjects' `{s}/{s}.{split}-step-{step}.jsonl`."""
    files = []
    for name in paths:
        path = Path(name)
        if not path.is_dir():
            files.append(path)
            continue
        subjects = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name in CATEGORY_OF)
        if not subjects:
            raise ScoreError(f"{path}: no experiment directory named after an MMLU subject")
        files += [path / s / f"{s}.{split}-step-{step}.jsonl" for s in subjects]
    return files


def load_predictions(files: list[Path]) -> list[dict]:
    return [read_prediction(row, where) for path in files for where, row in read_jsonl(path)]


def apply_gold(predictions: list[dict], gold_path: Path) -> list[dict]:
    """The gold file's questions with their predictions, gold letters from the file."""
    by_key = {p["key"]: p for p in predictions}
    scored, missing = [], []
    for where, row in read_jsonl(gold_path):
        if not all(f in row for f in ("question", "options", "answer")) or not isinstance(row["options"], dict):
            raise ScoreError(f"{where}: an MMLU row needs 'question', 'options' (an object) and 'answer'")
        prediction = by_key.get(question_key(row["question"], row["options"]))
        if prediction is None:
            missing.append(where)
            continue
        scored.append({**prediction, "answer": row["answer"]})
    if missing:
        raise ScoreError(f"{len(missing)} questions of {gold_path} have no prediction (the first at {missing[0]})")
    return scored


def accuracies(predictions: list[dict]) -> tuple[float, float]:
    n = len(predictions)
    plain = sum(p["plain"] == p["answer"] for p in predictions)
    debiased = sum(p["debiased"] == p["answer"] for p in predictions)
    return 100.0 * plain / n, 100.0 * debiased / n


def report(predictions: list[dict]) -> str:
    """The per-subject and per-category table."""
    lines = [f"{'subject':<38} {'category':<16} {'n':>6} {'Acc(%)':>8} {'Debias Acc(%)':>14}"]
    subjects = sorted({p["subject"] for p in predictions})
    for subject in subjects:
        group = [p for p in predictions if p["subject"] == subject]
        acc, debiased = accuracies(group)
        category = CATEGORY_OF.get(subject, "-")
        lines.append(f"{subject:<38} {category:<16} {len(group):>6} {acc:>8.2f} {debiased:>14.2f}")
    lines += ["-" * 86, f"{'category':<55} {'n':>6} {'Acc(%)':>8} {'Debias Acc(%)':>14}"]
    groups = [(c, [p for p in predictions if CATEGORY_OF.get(p["subject"]) == c]) for c in REPORT_ORDER]
    for name, group in [*groups, ("all", predictions)]:
        if group:
            acc, debiased = accuracies(group)
            lines.append(f"{name:<55} {len(group):>6} {acc:>8.2f} {debiased:>14.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions_path", nargs="+", required=True, help="results files, or a 5-shot directory")
    parser.add_argument("--gold_path", default=None, help="the MMLU data file the predictions must cover")
    parser.add_argument("--step", type=int, default=16, help="5-shot directory: the step of the results files")
    parser.add_argument("--split", default="test", help="5-shot directory: the eval file's split (test or val)")
    args = parser.parse_args(argv)
    try:
        predictions = load_predictions(prediction_files(args.predictions_path, args.step, args.split))
        if args.gold_path:
            predictions = apply_gold(predictions, Path(args.gold_path))
        if not predictions:
            raise ScoreError(f"no predictions in {' '.join(args.predictions_path)}")
    except ScoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"predictions: {' '.join(args.predictions_path)}")
    print(report(predictions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
