"""Does the reader teach the retriever? Dev recall@5 before and after retriever training, for every gold-score mode.

    python benchmarks/retriever_learning.py [--out DIR] [--steps N] [--runs ppmean-query ...] [--reuse]

The world is the offline demo's, with one passage per fact (preprocessing/prepare_demo.py --layout facts), and the
retriever starts as the demo's random tiny BERT: it retrieves the gold passage for ~3% of dev questions at k=5.
1. A teacher reader (T5 from scratch) learns to read on questions about people whose passages are *not* in the
   retrieval corpus (train.py --use_file_passages): first to copy from the gold passage alone (1,200 steps), then
   to find it among three distractors (3,000 steps; from scratch, that takes far longer). It must not know the
   corpus people's facts: a reader that already knows the answer scores every passage alike.
2. Each run trains the retriever from that teacher (train.py --model_path TEACHER --train_retriever) on questions
   about the corpus people, retrieving --retriever_n_context passages per question from their 2,000 fact passages.
3. evaluate.py --retrieve_only measures dev gold recall@5 (dev people are never trained on) with the trained
   retriever; with full training the passages are re-embedded by the trained passage encoder.
The control run uses the untrained reader as teacher: what it gains is what any training without a reading teacher
gains. Everything goes through the user-facing scripts, as a user would run them.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import REPO_ROOT, machine_info

from src.data import read_jsonl as read_rows  # noqa: E402  (bench_common puts the repository on sys.path)

N_PEOPLE = 4000  # people in the world; most only teach the teacher
N_CORPUS_PEOPLE = 360  # train people whose passages form the retrieval corpus (plus the 40 dev people)
QUERY_SIDE = "--query_side_retriever_training"
FROZEN_READER = [QUERY_SIDE, "--lr", "0"]
SEQUENCE = ["--emdr_mixture", "sequence"]
RUNS = {  # name: (gold score mode, extra train.py flags, teacher, steps)
    "ppmean-query": ("ppmean", [QUERY_SIDE], "teacher", 200),
    # evalnormsum scores are attention sums / (256 * layers * tokens): their spread over the passages is ~1,000x
    # smaller than that of ppmean's log-likelihoods, so tau_gold must be that much smaller. Like EMDR it starts late
    # (~150 steps), so it gets 500 steps with the reader frozen (see below)
    "evalnormsum-query": ("evalnormsum", [*FROZEN_READER, "--temperature_gold", "0.001"], "teacher", 500),
    "loop-query": ("loop", [QUERY_SIDE], "teacher", 200),
    # EMDR's maths has no gold temperature (1.0). It sits at its start for ~250 steps before it takes off, and by then
    # a reader that trains (a second epoch over the train questions) has learnt their answers and no longer teaches:
    # the reader is frozen (--lr 0) in these runs
    "emdr-query": ("emdr", [*FROZEN_READER, "--temperature_gold", "1.0"], "teacher", 500),
    # the papers' EMDR^2 mixes whole targets, not tokens (--emdr_mixture, an addition)
    "emdr-sequence-query": ("emdr", [*FROZEN_READER, "--temperature_gold", "1.0", *SEQUENCE], "teacher", 500),
    "ppmean-full-refresh": ("ppmean", ["--refresh_index", "50"], "teacher", 200),
    "control-untrained-reader": ("ppmean", [QUERY_SIDE], "untrained", 200),
}
READER = ["--text_maxlength", "64", "--target_maxlength", "16", "--generation_max_length", "12", "--dropout", "0.0"]


def run(args: list[str], log: Path) -> tuple[str, float]:
    """Run `python ARGS` from the repo root; returns stdout and wall seconds; exits with the log on failure."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"failed ({log}): python {' '.join(args)}\n{result.stderr[-2000:]}")
    return result.stdout, seconds


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_rows(str(path))]


def split_world(world: Path, data: Path, seed: int = 0) -> dict[str, int]:
    """Corpus, retriever-training, dev and teacher files from the demo world; returns their sizes."""
    rng = random.Random(seed)
    passages = read_jsonl(world / "data/passages.jsonl")
    by_id = {p["id"]: p for p in passages}
    by_person: dict[str, list[dict]] = {}
    by_section: dict[str, list[dict]] = {}
    for p in passages:
        if p["section"]:  # fact passages; town and organisation passages are left out of this benchmark
            by_person.setdefault(p["title"], []).append(p)
            by_section.setdefault(p["section"], []).append(p)
    train, dev = read_jsonl(world / "data/train.jsonl"), read_jsonl(world / "data/dev.jsonl")
    person = lambda example: by_id[example["gold_ids"][0]]["title"]
    train_people = sorted({person(e) for e in train})
    rng.shuffle(train_people)
    corpus_people = set(train_people[:N_CORPUS_PEOPLE]) | {person(e) for e in dev}

    def with_distractors(example: dict) -> dict:
        """The gold passage first (--n_context 1 reads it alone; FiD ignores the order), then two other facts of the
        same person and the same fact of someone else."""
        gold = by_id[example["gold_ids"][0]]
        others = rng.sample([p for p in by_person[gold["title"]] if p is not gold], 2)
        others += rng.sample([p for p in by_section[gold["section"]] if p["title"] != gold["title"]], 1)
        return {**example, "passages": [gold, *others]}

    files = {
        "corpus": [p for name in sorted(corpus_people) for p in by_person[name]],
        "train": [e for e in train if person(e) in corpus_people],
        "dev": dev,
        "teacher_train": [with_distractors(e) for e in train if person(e) not in corpus_people],
        "teacher_dev": [with_distractors(e) for e in dev],
    }
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(data / f"{name}.jsonl", rows)
    return {name: len(rows) for name, rows in files.items()}


def metric(stdout: str, name: str) -> float:
    """The value evaluate.py printed as `dev/NAME: value`."""
    found = re.search(rf"^\w+/{re.escape(name)}: ([0-9.]+)$", stdout, re.MULTILINE)
    if not found:
        sys.exit(f"no {name} in evaluate.py output:\n{stdout}")
    return float(found.group(1))


def recall_at_5(out: Path, data: Path, name: str, model_path: Path | None) -> float:
    """Dev gold recall@5 over the corpus, embedded by the given checkpoint's retriever (or the initial one)."""
    args = ["evaluate.py", "--task", "qa", "--retrieve_only", "--checkpoint_dir", str(out / "runs"), "--name", name]
    args += ["--retriever_model_path", str(out / "world/models/retriever"), "--passages", str(data / "corpus.jsonl")]
    args += ["--eval_data", str(data / "dev.jsonl"), "--n_context", "5", "--per_gpu_embedder_batch_size", "256"]
    if model_path:
        args += ["--model_path", str(model_path)]
    stdout, _ = run(args, out / "logs" / f"{name}.log")
    return metric(stdout, "gold_recall@5")


def train_args(out: Path, name: str) -> list[str]:
    """The train.py flags every run shares: task, run name and directory, reader model and its lengths."""
    return ["train.py", "--task", "qa", "--name", name, "--checkpoint_dir", str(out / "runs"), *READER,
            "--reader_model_type", str(out / "world/models/reader")]  # fmt: skip


def train_teacher(out: Path, data: Path, steps: tuple[int, int]) -> tuple[Path, float]:
    """Copy from the gold passage alone, then find it among distractors; returns the checkpoint and wall seconds."""
    total = 0.0
    for name, n_context, n_steps, lr, start in (("teacher_copy", 1, steps[0], "1e-3", None), ("teacher", 4, steps[1],
                                                "5e-4", out / "runs/teacher_copy/checkpoint/latest")):  # fmt: skip
        args = [*train_args(out, name), "--use_file_passages"]
        args += ["--train_data", str(data / "teacher_train.jsonl"), "--eval_data", str(data / "teacher_dev.jsonl")]
        args += ["--n_context", str(n_context), "--per_gpu_batch_size", "16", "--total_steps", str(n_steps)]
        args += ["--warmup_steps", "20", "--lr", lr, "--scheduler", "linear", "--weight_decay", "0.01"]
        args += ["--eval_freq", str(n_steps), "--save_freq", str(n_steps), "--log_freq", "100", "--seed", "0"]
        if start is not None:
            args += ["--model_path", str(start)]
        total += run(args, out / "logs" / f"{name}.log")[1]
    return out / "runs/teacher/checkpoint/latest", total


def teacher_exact_match(out: Path) -> float:
    """The teacher's dev exact match with its gold passage among three distractors (logged by its last eval)."""
    found = re.findall(r"exact_match ([0-9.]+)", (out / "logs/teacher.log").read_text())
    return float(found[-1]) if found else float("nan")


def train_retriever(out: Path, data: Path, name: str, teacher: Path | None, steps: int, opts: argparse.Namespace):
    mode, extra, _, _ = RUNS[name]
    shutil.rmtree(out / "runs" / name, ignore_errors=True)  # else train.py would resume an earlier run of this name
    args = [*train_args(out, name), "--passages", str(data / "corpus.jsonl")]
    args += ["--retriever_model_path", str(out / "world/models/retriever"), "--train_data", str(data / "train.jsonl")]
    args += ["--train_retriever", "--gold_score_mode", mode, "--n_context", "1"]
    args += ["--retriever_n_context", str(opts.retriever_n_context), "--per_gpu_batch_size", str(opts.batch_size)]
    args += ["--lr", str(opts.lr), "--lr_retriever", str(opts.lr_retriever), "--scheduler", "linear"]
    args += ["--temperature_gold", str(opts.temperature_gold), "--temperature_score", str(opts.temperature_score)]
    args += ["--warmup_steps", "20", "--total_steps", str(steps), "--save_freq", str(steps), "--eval_freq", "100000"]
    args += ["--log_freq", "50", "--per_gpu_embedder_batch_size", "256", "--seed", "0", *extra]
    if teacher is not None:
        args += ["--model_path", str(teacher)]
    _, seconds = run(args, out / "logs" / f"{name}.log")
    return out / "runs" / name / "checkpoint/latest", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/atlas_bench/retriever_learning"))
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--steps", type=int, default=None, help="steps of every run (default: per run)")
    parser.add_argument("--teacher_steps", type=int, nargs=2, default=(1200, 3000), help="copy, then select")
    parser.add_argument("--retriever_n_context", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5, help="reader lr while the retriever trains")
    parser.add_argument("--lr_retriever", type=float, default=3e-4)
    parser.add_argument("--temperature_gold", type=float, default=0.1)
    parser.add_argument("--temperature_score", type=float, default=0.1)
    parser.add_argument("--reuse", action="store_true", help="keep the world and teacher of an earlier run in --out")
    opts = parser.parse_args()
    out = opts.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(machine_info())
    data = out / "data"
    teacher = out / "runs/teacher/checkpoint/latest"
    if not (opts.reuse and teacher.exists()):
        shutil.rmtree(out / "runs", ignore_errors=True)  # train.py would resume the runs of an earlier benchmark
        world = ["preprocessing/prepare_demo.py", "--output_directory", str(out / "world"), "--layout", "facts"]
        run([*world, "--retriever", "scratch", "--n_entities", str(N_PEOPLE)], out / "logs/world.log")
        sizes = split_world(out / "world", data)
        print("data: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
        teacher, seconds = train_teacher(out, data, opts.teacher_steps)
        print(f"teacher: {sum(opts.teacher_steps)} steps in {seconds:.0f} s, dev EM {teacher_exact_match(out):.1f} "
              f"with its gold passage among 3 distractors")  # fmt: skip
    before = recall_at_5(out, data, "recall_before", None)
    print(f"dev recall@5 of the initial (random BERT) retriever: {before:.1f}")
    header = f"{'run':<26} {'mode':<12} {'steps':>5} {'wall s':>7} {'recall@5 before':>16} {'after':>6}"
    print(header + f" {'after/before':>12}")
    for name in opts.runs:
        mode, _, kind, steps = RUNS[name]
        steps = opts.steps or steps
        ckpt, seconds = train_retriever(out, data, name, teacher if kind == "teacher" else None, steps, opts)
        after = recall_at_5(out, data, f"recall_{name}", ckpt)
        ratio = after / before if before else float("inf")
        print(f"{name:<26} {mode:<12} {steps:>5} {seconds:>7.0f} {before:>16.1f} {after:>6.1f} {ratio:>11.1f}x",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
