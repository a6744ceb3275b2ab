"""Optimisers, learning-rate schedules, gradient synchronisation and the training loop."""

import argparse
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.optim.lr_scheduler import LambdaLR

from src import distributed as dist
from src.atlas import Atlas
from src.checkpoint import run_dir, save_checkpoint
from src.logs import MetricWriter
from src.options import parse_refresh_schedule, refresh_due
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


def build_optimizers(model: Atlas, opt: argparse.Namespace) -> tuple[dict, dict]:
    """AdamW for the reader (`--lr`) and, when it trains, the retriever (`--lr_retriever`); their schedulers."""
    groups = {"reader": (model.reader, opt.lr)}
    if opt.train_retriever and model.retriever is not None:
        groups["retriever"] = (model.retriever, opt.lr_retriever)
    optimizers, schedulers = {}, {}
    for name, (module, lr) in groups.items():
        params = [p for p in module.parameters() if p.requires_grad]
        kwargs = dict(lr=lr, betas=(0.9, opt.beta2), eps=opt.epsilon, weight_decay=opt.weight_decay)
        if opt.shard_optim and dist.is_distributed():  # each rank keeps 1/W of the Adam state
            optimizers[name] = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
        else:
            optimizers[name] = torch.optim.AdamW(params, **kwargs)
        total = opt.scheduler_steps or opt.total_steps
        schedulers[name] = LambdaLR(optimizers[name], lr_lambda(opt.scheduler, opt.warmup_steps, total))
    return optimizers, schedulers


def all_reduce_gradients(model: Atlas, world_size: int) -> None:
    """Average gradients over ranks with one flat all-reduce per dtype (the model is not wrapped in DDP)."""
    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce_sum(flat).div_(world_size)
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast for the forward pass (fp32 master weights stay in the optimiser), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class Trainer:
    """Holds what a training step needs; `train` runs the loop with evaluation, index refresh and saving."""

    def __init__(
        self, model: Atlas, index, task: Task, opt: argparse.Namespace, world: dist.World, evaluate_fn=None
    ) -> None:
        self.model, self.index, self.task, self.opt, self.world = model, index, task, opt, world
        self.optimizers, self.schedulers = build_optimizers(model, opt)
        self.scaler = torch.amp.GradScaler(world.device.type, enabled=opt.precision == "fp16")
        self.evaluate_fn = evaluate_fn
        self.refresh_schedule = parse_refresh_schedule(opt.refresh_index)
        self.writer = MetricWriter(run_dir(opt) if world.is_main else None)

    def load_state(self, state: dict | None) -> None:
        """Restore both optimizers and both schedulers when resuming."""
        if not state:
            return
        for name, key in (("reader", "optimizer"), ("retriever", "retr_optimizer")):
            if name in self.optimizers and state.get(key):
                self.optimizers[name].load_state_dict(state[key])
            elif name in self.optimizers:
                logger.warning("checkpoint has no %s state (saved without --save_optimizer): starting it afresh", key)
        for name, key in (("reader", "scheduler"), ("retriever", "retr_scheduler")):
            if name in self.schedulers and state.get(key):
                self.schedulers[name].load_state_dict(state[key])

    def retriever_frozen(self, step: int) -> bool:
        return step <= self.opt.freeze_retriever_steps

    def train_step(self, batches: Iterator[list[Example]], step: int) -> dict[str, float]:
        """One optimiser update over `accumulation_steps` micro-batches; returns the mean losses."""
        model, opt = self.model, self.opt
        model.train()
        totals: dict[str, float] = {}
        for _ in range(opt.accumulation_steps):
            examples = next(batches)
            # options guarantee retriever_n_context >= n_context: the reader reads the first n_context
            passages, _ = model.passages_for(self.index, examples, opt.retriever_n_context, self.task.filter_by_id)
            with autocast(opt.precision, self.world.device):
                losses = model(examples, passages, train_retriever=not self.retriever_frozen(step))
            self.scaler.scale(losses["loss"] / opt.accumulation_steps).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() / opt.accumulation_steps  # sync: one per value
        all_reduce_gradients(model, self.world.world_size)
        names = [n for n in self.optimizers if not (n == "retriever" and self.retriever_frozen(step))]
        for name in names:
            self.scaler.unscale_(self.optimizers[name])
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], opt.clip)
        for name in names:
            self.scaler.step(self.optimizers[name])
            self.schedulers[name].step()
        self.scaler.update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        return totals

    def maybe_refresh_index(self, step: int, refresh_fn) -> None:
        """Re-embed the index at scheduled steps once the retriever trains (not before --freeze_retriever_steps)."""
        if self.index is None or refresh_fn is None or not self.opt.train_retriever or self.retriever_frozen(step):
            return
        if step > 0 and refresh_due(self.refresh_schedule, step):
            refresh_fn(self.model, self.index)

    def train(self, batches: Iterator[list[Example]], start_step: int, refresh_fn=None) -> None:
        """The loop: step, log, evaluate, refresh, save; ends with a checkpoint at --total_steps."""
        opt = self.opt
        sums: dict[str, float] = {}
        tic = time.perf_counter()
        for step in range(start_step + 1, opt.total_steps + 1):
            self.maybe_refresh_index(step - 1, refresh_fn)  # the original checks the schedule before the step
            for name, value in self.train_step(batches, step).items():
                sums[name] = sums.get(name, 0.0) + value
            if step % opt.log_freq == 0 or step == opt.total_steps:
                n_steps = opt.log_freq if step % opt.log_freq == 0 else step % opt.log_freq
                self.log(step, sums, n_steps, time.perf_counter() - tic)
                sums, tic = {}, time.perf_counter()
            if self.evaluate_fn is not None and (step % opt.eval_freq == 0 or step == opt.total_steps):
                self.writer.scalars(self.evaluate_fn(self.model, self.index, step), step)
            if step % opt.save_freq == 0 or step == opt.total_steps:
                self.save(step)
            dist.barrier()
        self.writer.close()

    def save(self, step: int) -> None:
        """Checkpoint on the main rank; sharded optimizer states are first gathered there (collective)."""
        if self.opt.save_optimizer:
            for optimizer in self.optimizers.values():
                if isinstance(optimizer, ZeroRedundancyOptimizer):
                    optimizer.consolidate_state_dict(to=0)
        if self.world.is_main:
            save_checkpoint(self.opt, step, self.model, self.optimizers, self.schedulers, self.opt.save_optimizer)

    def log(self, step: int, sums: dict[str, float], n_steps: int, seconds: float) -> None:
        means = {name if "/" in name else f"loss/{name}": value / n_steps for name, value in sums.items()}
        means["lr"] = self.schedulers["reader"].get_last_lr()[0]
        means["runtime/train_step"] = seconds / n_steps
        logger.info("step %d/%d | %s", step, self.opt.total_steps, " | ".join(f"{k} {v:.4g}" for k, v in means.items()))
        self.writer.scalars(means, step)
