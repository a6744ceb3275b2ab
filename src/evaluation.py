"""The evaluation loop (loss, generation, task metrics), retrieve-only recall, and --write_results files."""

import itertools
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from src import distributed as dist
from src.atlas import Atlas
from src.batching import Tokenizers, collate, decode
from src.config import EvalConfig
from src.data import RawInstance, eval_batches, load_instances
from src.index import DistributedIndex
from src.metrics import answer_in_text
from src.precision import inference_autocast
from src.retrieval import passages_for
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


def eval_names(paths: list[str]) -> dict[str, str]:
    """A name per eval file for metric keys and results files: its stem, or (when stems collide) the stem prefixed by
    as many parent directories as tell the files apart ("nq/dev.jsonl" -> "nq-dev")."""
    names = {}
    for path in paths:
        parts = Path(path).with_suffix("").parts
        for depth in range(1, len(parts) + 1):
            name = "-".join(parts[-depth:])
            if all(
                name != "-".join(Path(o).with_suffix("").parts[-depth:]) for o in paths if o != path
            ) or depth == len(parts):
                names[path] = name
                break
    return names


class Evaluator:
    """Evaluates the model on the --eval_data files: `__call__(model, index, step)` -> `{file_stem}/{metric}`."""

    def __init__(
        self, task: Task, cfg: EvalConfig, tokenizers: Tokenizers, world: dist.World, data: list[EvalData]
    ) -> None:
        self.task, self.cfg, self.tokenizers, self.world, self.data = task, cfg, tokenizers, world, data
        self.names = eval_names([path for path, _ in data])

    def __call__(self, model: Atlas, index: DistributedIndex | None, step: int) -> dict[str, float]:
        results = {}
        evaluate = self.evaluate_retrieval if self.cfg.retrieve_only else self.evaluate_file
        for path, instances in self.data:
            tic = time.perf_counter()
            scores, _ = evaluate(model, index, path, instances, step)
            seconds = time.perf_counter() - tic
            logger.info("%s step %d | %s", path, step, " | ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            n = dist.all_reduce_sum(torch.tensor([len(instances)], dtype=torch.float64)).item()  # all ranks' questions
            logger.info("%s: %d questions in %.1f s (%.1f questions/s)", path, n, seconds, n / max(seconds, 1e-9))
            results.update({f"{self.names[path]}/{k}": v for k, v in scores.items()})
        return results

    def evaluate_file(self, model: Atlas, index, path: str, instances: list[RawInstance], step: int):
        """Scores of one eval file (percentages; eval_loss as is) and the written results path, if any."""
        task, cfg = self.task, self.cfg
        sums = dict.fromkeys(task.metrics, 0.0)  # the same names on every rank, for the all-reduce
        counts = dict.fromkeys(task.metrics, 0.0)
        rows: list[dict] = []
        for examples in padded_batches(eval_batches(instances, task, cfg.per_gpu_batch_size)):
            passages, _ = passages_for(model, self.tokenizers, index, examples, cfg.n_context, task.filter_by_id)
            if not examples:
                continue
            batch = collate(examples, passages, self.tokenizers, model.config).to(model.device)
            with inference_autocast(cfg.precision, model.device):
                losses, choice_logits = model.eval_outputs(batch)
                generated = model.generate(batch)
            if "eval_loss" in task.metrics:  # per example, so that it does not depend on how batches fall on ranks
                for value in losses.tolist():
                    add(sums, counts, "eval_loss", value)
            generations = decode(self.tokenizers, generated, batch.decoder_prompts)
            for b, (ex, ps, generation) in enumerate(zip(examples, passages, generations)):
                if ex.answers:  # rows without gold answers (a hidden test set) are written, not scored
                    for name, value in task.evaluate(generation, ex.answers).items():
                        add(sums, counts, name, 100.0 * value)
                row = self.result_row(ex, ps[: cfg.n_context], generation=generation)
                if choice_logits is not None:
                    row["choice_logits"] = choice_logits[b].tolist()
                rows.append(row)
        rows, extra = task.postprocess(rows)
        for name, values in extra.items():
            for value in values:
                add(sums, counts, name, 100.0 * value)
        scores = reduce_means(sums, counts)
        written = self.write_results(rows, path, step) if cfg.write_results else None
        return scores, written

    def evaluate_retrieval(self, model: Atlas, index, path: str, instances: list[RawInstance], step: int):
        """Retrieve-only: recall@k by answer string (and by gold passage id when rows have `gold_ids`)."""
        task, cfg = self.task, self.cfg
        ks = [k for k in RECALL_AT if k <= cfg.n_context]
        names = [f"{kind}@{k}" for kind in ("recall", "gold_recall") for k in ks]
        sums, counts = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)  # the same names on every rank
        rows: list[dict] = []
        for examples in padded_batches(eval_batches(instances, task, cfg.per_gpu_batch_size)):
            passages, scores = passages_for(model, self.tokenizers, index, examples, cfg.n_context, task.filter_by_id)
            for ex, ps, sc in zip(examples, passages, scores.tolist() if scores is not None else []):
                hits = [answer_in_text(ex.answers, p.get("text", "")) for p in ps]
                gold = set(ex.metadata.get("gold_ids") or [])
                for k in ks:
                    add(sums, counts, f"recall@{k}", 100.0 * any(hits[:k]))
                    if gold:
                        add(sums, counts, f"gold_recall@{k}", 100.0 * any(str(p.get("id")) in gold for p in ps[:k]))
                rows.append(self.result_row(ex, [{**p, "score": s} for p, s in zip(ps, sc)]))
        scores = reduce_means(sums, counts)
        written = self.write_results(rows, path, step) if cfg.write_results else None
        return scores, written

    def result_row(self, ex: Example, passages: list[dict], generation: str | None = None) -> dict:
        """One --write_results row in the original's format."""
        row: dict = {"query": ex.query, "answers": ex.answers}
        if generation is not None:
            row["generation"] = generation
        if not self.cfg.dont_write_passages:
            row["passages"] = passages
        row["metadata"] = ex.metadata
        if "id" in ex.metadata:
            row["id"] = ex.metadata["id"]
        return row

    def write_results(self, rows: list[dict], path: str, step: int) -> Path:
        """Gather every rank's rows on the main rank and write {checkpoint_dir}/{name}/{stem}-step-{step}.jsonl in the
        input file's order (rank r holds instances r, r + W, ...: the shards interleave back)."""
        out = self.cfg.run_dir / f"{self.names[path]}-step-{step}.jsonl"
        shards = dist.gather_object_to_main(rows)
        if self.world.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                for group in itertools.zip_longest(*shards):
                    for row in group:
                        if row is not None:
                            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, out)  # never a half-written results file
            logger.info("wrote %s", out)
        return out


def add(sums: dict[str, float], counts: dict[str, float], name: str, value: float) -> None:
    sums[name] = sums.get(name, 0.0) + value
    counts[name] = counts.get(name, 0) + 1


def load_eval_data(task: Task, cfg: EvalConfig, world: dist.World) -> list[EvalData]:
    """This rank's instances of every --eval_data file, read (and checked) once, before any model is built."""
    return [(path, load_instances([path], task, world.rank, world.world_size)) for path in cfg.eval_data]
