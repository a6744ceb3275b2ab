"""Optimisers, learning-rate schedules, gradient synchronisation and the training loop."""

import dataclasses
import logging
import math
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from src import distributed as dist
from src.atlas import Atlas
from src.batching import Tokenizers, collate
from src.checkpoint import (
    OPTIMIZER_KEYS,
    checkpoint_content,
    prune_resume_states,
    read_resume_state,
    restore_rng_state,
    restore_schedulers,
    rng_state,
    write_checkpoint,
    write_resume_state,
)
from src.config import Settings, TrainConfig
from src.data import DataPosition, TrainingBatches
from src.index import DistributedIndex
from src.index.refresh import passage_encoder_state, refresh_due, refresh_index
from src.logs import MetricWriter
from src.precision import autocast
from src.retrieval import passages_for, retrieve_with_rows
from src.sharding import DataParallel
from src.tasks import Example, Task

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the original never seeded python's `random`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int, ratio: float = 0.1):
    """Multiplier of the base learning rate at a step, as the original's schedules.

    linear: warm up from `ratio` to 1, then decay linearly to `ratio` at total_steps.
    cosine: warm up from 0 to 1, then ratio + (1 - ratio) * cos(pi/2 * progress).
    fixed:  warm up from 0 to 1, then 1.
    """

    def fn(step: int) -> float:
        if step < warmup_steps:
            start = ratio if scheduler == "linear" else 0.0
            return start + (1.0 - start) * step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if scheduler == "linear":
            return 1.0 - (1.0 - ratio) * progress
        if scheduler == "cosine":
            return ratio + (1.0 - ratio) * math.cos(math.pi / 2 * progress)
        return 1.0

    return fn


def build_optimizers(model: Atlas, cfg: TrainConfig, parallel: DataParallel | None = None) -> tuple[dict, dict]:
    """AdamW for the reader (`--lr`) and, when it trains, the retriever (`--lr_retriever`); their schedulers.

    With `parallel`, after it wrapped the model: its optimizers (ZeRO-1 sharded, or over FSDP's parameter shards)."""
    groups = {"reader": (model.reader, cfg.lr)}
    if cfg.train_retriever and model.retriever is not None:
        groups["retriever"] = (model.retriever, cfg.lr_retriever)
    optimizers, schedulers = {}, {}
    for name, (module, lr) in groups.items():
        params = [p for p in module.parameters() if p.requires_grad]
        kwargs = dict(lr=lr, betas=(0.9, cfg.beta2), eps=cfg.epsilon, weight_decay=cfg.weight_decay)
        build = parallel.build_optimizer if parallel else torch.optim.AdamW
        optimizers[name] = build(params, **kwargs)
        total = cfg.scheduler_steps or cfg.total_steps
        schedulers[name] = LambdaLR(optimizers[name], lr_lambda(cfg.scheduler, cfg.warmup_steps, total))
    return optimizers, schedulers


class StopRequest:
    """SIGUSR1 (SLURM's warning before preemption, `--signal=USR1@...`) and SIGTERM set a flag; the loop stops at the
    next step boundary once any rank has seen it. The previous handlers come back on `restore`."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (one small all-reduce: call it at the same step on all)."""
        return dist.all_reduce_max_int(int(self.requested)) > 0

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job() -> None:
    """Under SLURM, put the job back in the queue (rank 0 only); it resumes from the checkpoint just saved."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
        logger.info("requeued SLURM job %s", job)
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("could not requeue SLURM job %s (%s): resubmit it to resume", job, err)


class Trainer:
    """Holds what a training step needs; `train` runs the loop with evaluation, index refresh and saving."""

    def __init__(
        self,
        model: Atlas,
        tokenizers: Tokenizers,
        index: DistributedIndex | None,
        task: Task,
        settings: Settings,
        world: dist.World,
        evaluate_fn: Callable[[Atlas, DistributedIndex | None, int], dict[str, float]] | None = None,
    ) -> None:
        self.model, self.tokenizers, self.index, self.task, self.world = model, tokenizers, index, task, world
        self.settings, self.cfg = settings, settings.train
        # When the passage encoder trains, the index lags behind it: keep the weights the index was embedded with,
        # so that a resumed run rebuilds the same index (not one embedded with the resumed weights).
        tracks = index is not None and self.cfg.train_retriever and not model.retriever.query_side
        self.index_weights = passage_encoder_state(model) if tracks else None
        # Query-side training keeps the passage encoder frozen, so the passages' vectors the retriever loss needs are
        # the ones the flat index holds: read them from it instead of re-embedding K passages per example (~8% of a
        # t5-large step's FLOPs at K=40, and their tokenising).
        self.reads_index_vectors = bool(
            index is not None and index.mode == "flat" and self.cfg.train_retriever and model.retriever.query_side
        )
        if self.reads_index_vectors:
            logger.info("query-side training: the retriever loss reads the passages' vectors from the index")
        self.parallel = DataParallel(model, self.cfg, world.world_size)  # before the optimizers: FSDP shards in place
        self.optimizers, self.schedulers = build_optimizers(model, self.cfg, self.parallel)
        self.scaler = self.parallel.grad_scaler(world.device.type, enabled=self.cfg.precision == "fp16")
        self.evaluate_fn = evaluate_fn
        self.writer = MetricWriter(self.cfg.run_dir if world.is_main else None)

    def load_state(self, state: dict | None) -> None:
        """Resume: both optimizers (from the step's resume state, else the optimizer states model.pth.tar kept), both
        schedulers, the GradScaler, this rank's random states and the index's passage-encoder weights."""
        if not state:
            return
        saved_ranks = len(state.get("rng_states") or []) or None
        if saved_ranks is not None and saved_ranks != self.world.world_size:
            logger.info("resuming on %d processes a run saved by %d", self.world.world_size, saved_ranks)
        resume, local = read_resume_state(self.cfg.run_dir, int(state["step"]), self.world.rank, self.world.world_size)
        if local and resume.get("layout") != self.parallel.layout:  # e.g. ZeRO-1 shards, now FSDP: not the same split
            logger.warning("the optimizer states were saved sharded as %s, this run is %s: the optimizers start afresh",
                           resume.get("layout"), self.parallel.layout)  # fmt: skip
            resume, local = {"optimizers": {}}, False
        for name, optimizer in self.optimizers.items():
            saved = (resume or {}).get("optimizers", {}).get(name) if resume else state.get(OPTIMIZER_KEYS[name])
            if saved is None:
                logger.warning("step %s has no %s optimizer state: it starts afresh", state["step"], name)
            elif local:
                self.parallel.load_local_optimizer_state(optimizer, saved)
            else:
                self.parallel.load_full_optimizer_state(optimizer, saved)
        restore_schedulers(self.optimizers, self.schedulers, state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state.get("rng_states"), self.world.rank, self.world.world_size)
        if self.index_weights is not None and state.get("index_passage_encoder") is not None:
            self.index_weights = state["index_passage_encoder"]

    def retriever_frozen(self, step: int) -> bool:
        return step <= self.cfg.freeze_retriever_steps

    def train_step(self, batches: Iterator[list[Example]], step: int) -> dict[str, float]:
        """One optimiser update over `accumulation_steps` micro-batches: examples -> retrieve -> collate -> forward."""
        model, cfg, atlas_cfg = self.model, self.cfg, self.model.config
        train_retriever = atlas_cfg.train_retriever and model.retriever is not None and not self.retriever_frozen(step)
        model.train()
        totals: dict[str, float] = {}
        for micro in range(cfg.accumulation_steps):
            examples = next(batches)
            self.parallel.unshard()  # FSDP: whole weights for retrieval (the forward keeps them, backward shards them)
            # options guarantee retriever_n_context >= n_context: the reader reads the first n_context
            k, vectors = atlas_cfg.retriever_n_context, None
            if train_retriever and self.reads_index_vectors:
                passages, _, rows = retrieve_with_rows(model, self.tokenizers, self.index, examples, k,
                                                       self.task.filter_by_id)  # fmt: skip
                vectors = self.index.vectors(rows)  # COLLECTIVE, (B, k', D)
                if rows.shape[1] != k or bool((rows < 0).any()):  # fewer than k passages: padded ones are embedded
                    vectors = None
            else:
                passages, _ = passages_for(model, self.tokenizers, self.index, examples, k, self.task.filter_by_id)
            batch = collate(examples, passages, self.tokenizers, atlas_cfg, retriever=train_retriever,
                            passage_vectors=vectors)  # fmt: skip
            # Gradients are synchronised during the last micro-batch's backward (DDP buckets / FSDP reduce-scatter).
            with self.parallel.micro_batch(last=micro == cfg.accumulation_steps - 1):
                with autocast(cfg.precision, self.world.device):
                    losses = self.parallel.forward_module(batch.to(self.world.device), train_retriever=train_retriever)
                self.scaler.scale(losses["loss"] / cfg.accumulation_steps).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / cfg.accumulation_steps  # sync: one per value
        names = [n for n in self.optimizers if not (n == "retriever" and self.retriever_frozen(step))]
        norms = []
        for name in names:  # unscale, then clip each optimizer's gradients on their own (norm over all ranks' shards)
            self.scaler.unscale_(self.optimizers[name])
            params = [p for group in self.optimizers[name].param_groups for p in group["params"] if p.grad is not None]
            norms.append(self.parallel.clip_grad_norm(params, cfg.clip))
        # One non-finite gradient (an fp16 overflow in either model) skips the update of both: stepping the other one
        # alone would train the reader and the retriever on different batches. One host sync per step.
        if not norms or bool(torch.isfinite(torch.stack(norms)).all()):
            for name in names:
                self.scaler.step(self.optimizers[name])
                self.schedulers[name].step()
        else:
            logger.warning("step %d: non-finite gradients: update skipped for every optimizer", step)
        self.scaler.update()  # with fp16, a non-finite gradient lowers the loss scale
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        return totals

    def maybe_refresh_index(self, step: int) -> None:
        """Re-embed the index at scheduled steps once the retriever trains (not before --freeze_retriever_steps)."""
        if self.index is None or not self.cfg.train_retriever or self.retriever_frozen(step):
            return
        if step > 0 and refresh_due(self.settings.index.refresh_schedule, step):
            with self.parallel.gathered():
                refresh_index(self.index, self.model, self.tokenizers, self.settings.index)
            if self.index_weights is not None:
                self.index_weights = self.parallel.full_state(self.model.retriever.passage_encoder)

    def train(self, batches: TrainingBatches, start_step: int) -> bool:
        """The loop: step, log, evaluate, refresh, save; ends with a checkpoint at --total_steps.

        On SIGUSR1 / SIGTERM (to any rank), every rank stops at the next step boundary, before evaluating or
        refreshing the index, the step just done is saved and False is returned; True when it ran to --total_steps.
        """
        cfg = self.cfg
        sums: dict[str, float] = {}
        tic = time.perf_counter()
        stop = StopRequest()
        try:
            for step in range(start_step + 1, cfg.total_steps + 1):
                self.maybe_refresh_index(step - 1)  # the original checks the schedule before the step
                for name, value in self.train_step(batches, step).items():
                    sums[name] = sums.get(name, 0.0) + value
                if step % cfg.log_freq == 0 or step == cfg.total_steps:
                    n_steps = cfg.log_freq if step % cfg.log_freq == 0 else step % cfg.log_freq
                    self.log(step, sums, n_steps, time.perf_counter() - tic)
                    sums, tic = {}, time.perf_counter()
                if stop.agreed():  # one small all-reduce per step: every rank stops at the same step
                    logger.info("stop requested (SIGUSR1/SIGTERM): saving step %d and exiting", step)
                    self.save(step, batches.position)
                    return False
                if self.evaluate_fn is not None and (step % cfg.eval_freq == 0 or step == cfg.total_steps):
                    with self.parallel.gathered():
                        metrics = self.evaluate_fn(self.model, self.index, step)
                    self.writer.scalars(metrics, step)
                if step % cfg.save_freq == 0 or step == cfg.total_steps:
                    self.save(step, batches.position)
                # No barrier: the next step's collectives (search, gradients, the stop check) keep ranks together.
        finally:
            stop.restore()
            self.writer.close()
        return True

    def save(self, step: int, position: DataPosition | None = None) -> None:
        """COLLECTIVE: save step N: every rank writes its resume state (optimizer shards), then the main rank writes
        model.pth.tar (whole weights; optimizers only with --save_optimizer), moves `latest` and prunes older resume
        states."""
        cfg, world = self.cfg, self.world
        positions = dist.all_gather_object(dataclasses.asdict(position) if position else None)
        rng_states = dist.all_gather_object(rng_state())
        model_state = self.parallel.model_state()
        full = {}  # the optimizers in model.pth.tar: only with --save_optimizer (COLLECTIVE when sharded)
        if cfg.save_optimizer:
            full = {name: self.parallel.full_optimizer_state(o) for name, o in self.optimizers.items()}
        if self.parallel.shards_optimizer or world.is_main:
            local = {name: self.parallel.local_optimizer_state(o) for name, o in self.optimizers.items()}
            sharded = self.parallel.shards_optimizer
            content = {"layout": self.parallel.layout, "optimizers": local}
            write_resume_state(cfg.run_dir, step, content, world.rank, world.world_size, sharded)
        dist.barrier()  # every rank's resume state is on disk before `latest` moves to this step
        if world.is_main:
            extra = {"data_positions": positions, "rng_states": rng_states, "scaler": self.scaler.state_dict()}
            if self.index_weights is not None:
                extra["index_passage_encoder"] = self.index_weights
            schedulers = {name: s.state_dict() for name, s in self.schedulers.items()}
            options = self.settings.options
            write_checkpoint(cfg.run_dir, step, checkpoint_content(step, model_state, full, schedulers, options, extra))
            prune_resume_states(cfg.run_dir, step)

    def log(self, step: int, sums: dict[str, float], n_steps: int, seconds: float) -> None:
        """Log the losses averaged over the last steps and over ranks (one small all-reduce; every rank calls it)."""
        names = sorted(sums)
        totals = dist.all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64)).tolist()
        ranks = self.world.world_size
        means = {n if "/" in n else f"loss/{n}": total / n_steps / ranks for n, total in zip(names, totals)}
        means["lr"] = self.schedulers["reader"].get_last_lr()[0]
        means["runtime/train_step"] = seconds / n_steps
        logger.info("step %d/%d | %s", step, self.cfg.total_steps, " | ".join(f"{k} {v:.4g}" for k, v in means.items()))
        self.writer.scalars(means, step)
