"""Checkpoint files and training state: read a checkpoint, find the run's latest one, save, resume states.

Layout (as the original): {checkpoint_dir}/{name}/checkpoint/step-N/model.pth.tar and a `latest` symlink. The file is
a dict {step, model, optimizer, retr_optimizer, scheduler, retr_scheduler, opt}; `opt` is a plain dict, so it loads
with torch.load(weights_only=True). State-dict keys are `reader.*` (HF T5 names) and `retriever.contriever.*` or
`retriever.{query,passage}_contriever.*` (HF BERT names), the same as the original's. Turning the `model` entry into
modules is `src.model_factory`'s job.

The latest step also carries a resume state: step-N/resume/ holds the optimizer states (one file per rank when they
are sharded, else one file), whatever --save_optimizer says; model.pth.tar carries the rest (schedulers, GradScaler,
every rank's data position and random states). Older steps' resume states are pruned.
"""

import argparse
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.data import DataPosition
from src.errors import UserError
from src.hf_export import is_export, read_export

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pth.tar"
RESUME_DIR = "resume"  # step-N/resume/: the optimizer states a rerun resumes with (kept for the latest step only)
# optimizer / scheduler names in the trainer -> keys of the checkpoint dict (the original's)
OPTIMIZER_KEYS = {"reader": "optimizer", "retriever": "retr_optimizer"}
SCHEDULER_KEYS = {"reader": "scheduler", "retriever": "retr_scheduler"}


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file (ours, or a released Atlas one whose `opt` is an argparse Namespace), or an export."""
    path = Path(path)
    if is_export(path):  # a directory written by preprocessing/export_hf.py
        return read_export(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"--model_path: no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable Atlas checkpoint ({type(err).__name__}: {err})") from None


RESUME_MUST_MATCH = ("task", "reader_model_type")  # flags a resumed run cannot change


def resume_state(run_dir: Path, options: dict[str, Any] | None = None) -> dict | None:
    """The run's latest checkpoint when it has one (the run resumes from it), else None.

    Temporary files of a save that was killed are removed first. A `latest` link to a missing step is an error (never
    a silent restart that would overwrite the older checkpoints); with `options`, the flags that changed since the
    checkpoint are logged and a different task or reader refused.
    """
    directory = run_dir / "checkpoint"
    for orphan in [*directory.glob("step-*/*.tmp"), *directory.glob(f"step-*/{RESUME_DIR}/*.tmp")]:
        orphan.unlink(missing_ok=True)
        logger.info("removed %s, left by a save that did not finish", orphan)
    latest = directory / "latest"
    if latest.is_symlink() and not latest.exists():
        raise UserError(f"{latest} points to {os.readlink(latest)}, which does not exist: restore that step, or point "
                        "`latest` at another step-N directory, or remove the link to start the run afresh")  # fmt: skip
    if not latest.exists():
        return None
    state = read_checkpoint(latest)
    saved = state.get("opt") if isinstance(state.get("opt"), dict) else {}
    if options is not None and saved:
        for name in RESUME_MUST_MATCH:
            if name in saved and saved[name] != options.get(name):
                raise UserError(f"{run_dir} was trained with --{name} {saved[name]}, not {options.get(name)}: resume "
                                "it with the same flag, or give the run another --name")  # fmt: skip
        # a flag left at "auto" (--uncentered_layernorm) resolves to what the checkpoint recorded: not a change
        changed = sorted(k for k in options if k in saved and saved[k] != options[k] and options[k] != "auto")
        if changed:
            logger.info(
                "resuming with changed flags: %s", ", ".join(f"--{k} {saved[k]!r} -> {options[k]!r}" for k in changed)
            )
    logger.info("resuming %s from step %d", run_dir, state["step"])
    return state


def data_position(state: dict | None, rank: int, world_size: int) -> DataPosition | None:
    """This rank's position in the training data from a resumed checkpoint (None: start at the beginning)."""
    positions = (state or {}).get("data_positions")
    if not state:
        return None
    if not positions or len(positions) != world_size or positions[rank] is None:
        logger.warning("the checkpoint holds no data position for %d processes: training data starts over", world_size)
        return None
    return DataPosition(**positions[rank])


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) random states, as tensors and lists (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(states: list | None, rank: int, world_size: int) -> None:
    """Put back this rank's random states from a resumed checkpoint (same number of processes), so that dropout
    continues exactly as in an uninterrupted run."""
    if not states or len(states) != world_size or states[rank] is None:
        if states is not None:
            logger.warning("the checkpoint's random states are for %d processes, not %d: not restored", len(states),
                           world_size)  # fmt: skip
        return
    state = states[rank]
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_schedulers(optimizers: dict, schedulers: dict, state: dict | None) -> None:
    """Restore both schedulers from a resumed checkpoint and give the optimizers their learning rates (a sharded or
    restarted optimizer state does not carry them)."""
    for name, key in SCHEDULER_KEYS.items():
        if name in schedulers and (state or {}).get(key):
            schedulers[name].load_state_dict(state[key])
            for group, lr in zip(optimizers[name].param_groups, schedulers[name].get_last_lr()):
                group["lr"] = lr


def _atomic_save(content: Any, path: Path) -> None:
    """torch.save to a temporary sibling, fsync, rename: a killed save never leaves a truncated file at `path`."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    torch.save(content, tmp)
    with open(tmp, "rb") as handle:  # on disk before the rename: a crash never leaves a renamed, empty file
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def checkpoint_content(
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_states: dict[str, dict | None],
    scheduler_states: dict[str, dict],
    options: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict:
    """The model.pth.tar dict: the original's keys (an optimizer's entry None when not saved), then `extra`."""
    content: dict[str, Any] = {"step": step, "model": model_state}
    for name, key in OPTIMIZER_KEYS.items():
        content[key] = optimizer_states.get(name)
    for name, key in SCHEDULER_KEYS.items():
        content[key] = scheduler_states.get(name)
    content["opt"] = options
    content.update(extra or {})
    return content


def write_checkpoint(run_dir: Path, step: int, content: dict) -> Path:
    """Write step-N/model.pth.tar atomically and point `latest` at it. Call on the main rank only."""
    directory = run_dir / "checkpoint"
    step_dir = directory / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save(content, step_dir / CHECKPOINT_FILE)
    link_tmp = directory / f".latest-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(step_dir.name)
    os.replace(link_tmp, directory / "latest")
    logger.info("saved checkpoint %s", step_dir / CHECKPOINT_FILE)
    return step_dir / CHECKPOINT_FILE


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizers: dict,
    schedulers: dict,
    with_optimizer: bool,
    options: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write step-N/model.pth.tar of an unwrapped model and its optimizers (their states only with `with_optimizer`).

    `extra` adds keys of ours (e.g. `data_positions`) after the original's; the original's loaders ignore them.
    """
    optimizer_states = {name: o.state_dict() for name, o in optimizers.items()} if with_optimizer else {}
    scheduler_states = {name: s.state_dict() for name, s in schedulers.items()}
    content = checkpoint_content(step, model.state_dict(), optimizer_states, scheduler_states, options, extra)
    return write_checkpoint(run_dir, step, content)


def _shard_name(rank: int, world_size: int) -> str:
    return f"optimizers.rank{rank:05d}-of-{world_size:05d}.pt"


def write_resume_state(run_dir: Path, step: int, content: dict, rank: int, world_size: int, sharded: bool) -> None:
    """Write this rank's optimizer states for step N (sharded: one file per rank; else rank 0 writes the one file)."""
    directory = run_dir / "checkpoint" / f"step-{step}" / RESUME_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (_shard_name(rank, world_size) if sharded else "optimizers.pt")
    try:
        _atomic_save({"step": step, "world_size": world_size, **content}, path)
    except OSError as err:
        raise UserError(f"cannot write the resume state {path} ({err.strerror or err})") from None


def read_resume_state(run_dir: Path, step: int, rank: int, world_size: int) -> tuple[dict | None, bool]:
    """This rank's saved optimizer states of step N and whether they are its shard (True) or whole states (False).

    (None, False) when the step has no resume state (saved by an older version, or pruned) or when it is sharded over
    another number of processes (a shard cannot be re-split: logged, the optimizers start afresh).
    """
    directory = run_dir / "checkpoint" / f"step-{step}" / RESUME_DIR
    if (directory / "optimizers.pt").is_file():
        return torch.load(directory / "optimizers.pt", map_location="cpu", weights_only=True), False
    mine = directory / _shard_name(rank, world_size)
    if mine.is_file():
        return torch.load(mine, map_location="cpu", weights_only=True), True
    others = sorted(directory.glob("optimizers.rank*-of-*.pt"))
    if others:
        saved = int(others[0].stem.rsplit("-of-", 1)[1])
        logger.warning("the optimizer states of step %d are sharded over %d processes, not %d: the optimizers start "
                       "afresh (weights, schedulers and data continue)", step, saved, world_size)  # fmt: skip
    return None, False


def prune_resume_states(run_dir: Path, keep_step: int) -> None:
    """Remove the resume states of every step but `keep_step` (older model.pth.tar files stay)."""
    for directory in (run_dir / "checkpoint").glob(f"step-*/{RESUME_DIR}"):
        if directory.parent.name != f"step-{keep_step}":
            shutil.rmtree(directory, ignore_errors=True)
