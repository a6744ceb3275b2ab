"""Can this reader teach the retriever? How each gold-score mode's target treats the gold passage.

    python benchmarks/teacher_signal.py [--out DIR] [--teacher CHECKPOINT_DIR ...] [--questions 64]

Needs the world and data of `benchmarks/retriever_learning.py` (same --out); the teacher defaults to its teacher.
For each teacher checkpoint (e.g. the copy stage, the final teacher) and each mode's scores (`src/gold_scores.py`),
on train questions of the corpus people:
- "gold first": how often the gold passage scores highest among itself and 19 random corpus passages;
- on the initial retriever's top-50 (what retriever training starts from), the target distribution
  softmax(scores / tau_gold) with the benchmark's tau_gold: its mass on the gold passage (averaged over all
  questions; the gold is among the 50 for few of them) and, where the gold is absent, its mass on passages of the
  question's kind of fact (e.g. careers for "What does X work as?") against their share of the candidates.
A target that prefers the gold passage where it is present teaches; one that is flat there teaches the teacher's
other preferences. LOOP and EMDR are left out: LOOP costs 50 decoder runs per question, and EMDR has no target.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from bench_common import machine_info
from retriever_dynamics import LOSSES, QUERY, Setup

from src import retriever as contriever
from src.gold_scores import GOLD_SCORE_FNS

MODES = {mode: LOSSES[mode][1] for mode in ("ppmean", "evalnormsum")}  # mode: the benchmarks' tau_gold


def measure(setup: Setup, questions: list[dict], rng: random.Random, batch_size: int = 8) -> dict[str, list[float]]:
    """Per mode: [% gold first among 20, target mass on gold in the top-50, same-kind mass where absent, share]."""
    encoder = contriever.load_encoder(setup.retriever_path)
    setup.reader.set_attn_implementation("eager")  # evalnormsum reads attention probabilities
    first = {mode: 0 for mode in MODES}
    on_gold = {mode: 0.0 for mode in MODES}
    on_kind = {mode: 0.0 for mode in MODES}
    kind_share, absent_count = 0.0, 0
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        gold = [setup.corpus[setup.position[e["gold_ids"][0]]] for e in batch]
        random_sets = [[g, *rng.sample([p for p in setup.corpus if p is not g], 19)] for g in gold]
        queries = [QUERY.format(question=e["question"]) for e in batch]
        top = (setup.embed(encoder, queries) @ setup.passage_emb.T).topk(50, dim=1).indices.tolist()
        candidates = [[setup.corpus[j] for j in ids] for ids in top]
        is_gold = torch.tensor([[p is g for p in ps] for g, ps in zip(gold, candidates)], dtype=torch.float)
        same_kind = torch.tensor([[p["section"] == g["section"] for p in ps] for g, ps in zip(gold, candidates)],
                                 dtype=torch.float)  # fmt: skip
        absent = is_gold.sum(dim=1) == 0
        kind_share += same_kind[absent].mean(dim=1).sum().item()
        absent_count += int(absent.sum())
        among_random, among_top = setup.reader_inputs(batch, random_sets), setup.reader_inputs(batch, candidates)
        for mode, tau in MODES.items():
            first[mode] += int((GOLD_SCORE_FNS[mode](setup.reader, *among_random).argmax(dim=1) == 0).sum())
            target = torch.softmax(GOLD_SCORE_FNS[mode](setup.reader, *among_top) / tau, dim=-1)
            on_gold[mode] += (target * is_gold).sum().item()
            on_kind[mode] += (target * same_kind)[absent].sum().item()
    n, share = len(questions), kind_share / max(absent_count, 1)
    return {mode: [100 * first[mode] / n, on_gold[mode] / n, on_kind[mode] / max(absent_count, 1), share]
            for mode in MODES}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/atlas_bench/retriever_learning"))
    parser.add_argument("--teacher", type=Path, nargs="+", default=None, help="checkpoint dirs (default: the teacher)")
    parser.add_argument("--questions", type=int, default=64)
    opts = parser.parse_args()
    teachers = opts.teacher or [opts.out / "runs/teacher/checkpoint/latest"]
    for teacher in teachers:
        if not (teacher / "model.pth.tar").exists():
            raise SystemExit(f"no checkpoint at {teacher}: run benchmarks/retriever_learning.py --out {opts.out} first")
    print(machine_info())
    labels = [str(t.relative_to(opts.out)) if t.is_relative_to(opts.out) else str(t) for t in teachers]
    width = max(len("teacher"), *map(len, labels))
    print(f"{'teacher':<{width}} {'mode':<12} {'gold first /20':>14} {'top-50 mass: gold':>17} "
          f"{'same kind (gold absent)':>23}")  # fmt: skip
    for teacher, label in zip(teachers, labels):
        setup = Setup(opts.out, teacher)
        questions = random.Random(0).sample(setup.train, min(opts.questions, len(setup.train)))
        for mode, (first, gold, kind, share) in measure(setup, questions, random.Random(1)).items():
            print(f"{label:<{width}} {mode:<12} {first:>13.0f}% {gold:>17.3f} {kind:>14.3f} (share {share:.3f})")


if __name__ == "__main__":
    main()
