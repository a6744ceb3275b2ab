"""The evaluation loop (loss, generation, task metrics), retrieve-only recall, and --write_results files."""

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from src import distributed as dist
from src.atlas import Atlas
from src.checkpoint import run_dir
from src.data import RawInstance, eval_batches, load_instances
from src.metrics import answer_in_text
from src.tasks import Example, Task

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10, 20, 50, 100)
EvalData = tuple[str, list[RawInstance]]  # an eval file and this rank's instances of it


def padded_batches(batches: list[list[Example]]) -> list[list[Example]]:
    """Pad this rank's batch list with empty batches so every rank runs the same number of collective searches."""
    n_batches = dist.all_reduce_max_int(len(batches))
    return batches + [[] for _ in range(n_batches - len(batches))]


def reduce_means(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """Average per-example sums over all ranks (one all-reduce)."""
    names = sorted(sums)
    packed = torch.tensor([sums[n] for n in names] + [counts[n] for n in names], dtype=torch.float64)
    dist.all_reduce_sum(packed)
    return {n: (packed[i] / packed[len(names) + i]).item() for i, n in enumerate(names) if packed[len(names) + i] > 0}


def evaluate_file(model: Atlas, index, task: Task, opt: argparse.Namespace, data: EvalData, step: int, world):
    """Scores of one eval file (percentages; eval_loss as is) and the written results path, if any."""
    path, instances = data
    sums = dict.fromkeys(task.metrics, 0.0)  # the same names on every rank, for the all-reduce
    counts = dict.fromkeys(task.metrics, 0.0)
    rows: list[dict] = []
    for examples in padded_batches(eval_batches(instances, task, opt.per_gpu_batch_size)):
        passages, _ = model.passages_for(index, examples, opt.n_context, task.filter_by_id)
        if not examples:
            continue
        if "eval_loss" in task.metrics:
            add(sums, counts, "eval_loss", model.eval_loss(examples, passages).item())
        for ex, ps, generation in zip(examples, passages, model.generate(examples, passages)):
            for name, value in task.evaluate(generation, ex.answers).items():
                add(sums, counts, name, 100.0 * value)
            rows.append(result_row(ex, ps[: opt.n_context], opt, generation=generation))
    scores = reduce_means(sums, counts)
    written = write_results(rows, opt, path, step, world) if opt.write_results else None
    return scores, written


def evaluate_retrieval(model: Atlas, index, task: Task, opt: argparse.Namespace, data: EvalData, step: int, world):
    """Retrieve-only: recall@k by answer string (and by gold passage id when rows have `gold_ids`)."""
    path, instances = data
    ks = [k for k in RECALL_AT if k <= opt.n_context]
    names = [f"{kind}@{k}" for kind in ("recall", "gold_recall") for k in ks]
    sums, counts = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)  # the same names on every rank
    rows: list[dict] = []
    for examples in padded_batches(eval_batches(instances, task, opt.per_gpu_batch_size)):
        passages, scores = model.passages_for(index, examples, opt.n_context, task.filter_by_id)
        for ex, ps, sc in zip(examples, passages, scores.tolist() if scores is not None else []):
            hits = [answer_in_text(ex.answers, p.get("text", "")) for p in ps]
            gold = set(ex.metadata.get("gold_ids") or [])
            for k in ks:
                add(sums, counts, f"recall@{k}", 100.0 * any(hits[:k]))
                if gold:
                    add(sums, counts, f"gold_recall@{k}", 100.0 * any(str(p.get("id")) in gold for p in ps[:k]))
            rows.append(result_row(ex, [{**p, "score": s} for p, s in zip(ps, sc)], opt))
    scores = reduce_means(sums, counts)
    written = write_results(rows, opt, path, step, world) if opt.write_results else None
    return scores, written


def add(sums: dict[str, float], counts: dict[str, float], name: str, value: float) -> None:
    sums[name] = sums.get(name, 0.0) + value
    counts[name] = counts.get(name, 0) + 1


def result_row(ex: Example, passages: list[dict], opt: argparse.Namespace, generation: str | None = None) -> dict:
    """One --write_results row in the original's format."""
    row: dict = {"query": ex.query, "answers": ex.answers}
    if generation is not None:
        row["generation"] = generation
    if not opt.dont_write_passages:
        row["passages"] = passages
    row["metadata"] = ex.metadata
    if "id" in ex.metadata:
        row["id"] = ex.metadata["id"]
    return row


def write_results(rows: list[dict], opt: argparse.Namespace, path: str, step: int, world) -> Path:
    """Gather every rank's rows on the main rank and write {checkpoint_dir}/{name}/{stem}-step-{step}.jsonl."""
    out = run_dir(opt) / f"{Path(path).stem}-step-{step}.jsonl"
    shards = dist.all_gather_object(rows) if world.world_size > 1 else [rows]
    if world.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            for shard in shards:
                for row in shard:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)  # never a half-written results file
        logger.info("wrote %s", out)
    return out


def load_eval_data(task: Task, opt: argparse.Namespace, world) -> list[EvalData]:
    """This rank's instances of every --eval_data file, read (and checked) once, before any model is built."""
    return [(path, load_instances([path], task, world.rank, world.world_size)) for path in opt.eval_data]


def build_evaluate_fn(
    task: Task, opt: argparse.Namespace, world, eval_data: list[EvalData]
) -> Callable[[Atlas, object, int], dict[str, float]]:
    """evaluate(model, index, step) over every --eval_data file, logging and returning `{file_stem}/{metric}`."""

    def run(model: Atlas, index, step: int) -> dict[str, float]:
        results = {}
        fn = evaluate_retrieval if opt.retrieve_only else evaluate_file
        for data in eval_data:
            path = data[0]
            scores, _ = fn(model, index, task, opt, data, step, world)
            logger.info("%s step %d | %s", path, step, " | ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            results.update({f"{Path(path).stem}/{k}": v for k, v in scores.items()})
        return results

    return run
