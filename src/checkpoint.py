"""Checkpoint files and training state: read a checkpoint, find the run's latest one, save, restore optimizers.

Layout (as the original): {checkpoint_dir}/{name}/checkpoint/step-N/model.pth.tar and a `latest` symlink. The file is
a dict {step, model, optimizer, retr_optimizer, scheduler, retr_scheduler, opt}; `opt` is a plain dict, so it loads
with torch.load(weights_only=True). State-dict keys are `reader.*` (HF T5 names) and `retriever.contriever.*` or
`retriever.{query,passage}_contriever.*` (HF BERT names), the same as the original's. Turning the `model` entry into
modules is `src.model_factory`'s job.
"""

import argparse
import logging
import os
import random
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
    for orphan in directory.glob("step-*/*.tmp"):
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
        changed = sorted(k for k in options if k in saved and saved[k] != options[k])
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


def restore_training_state(optimizers: dict, schedulers: dict, state: dict | None) -> None:
    """Restore both optimizers and both schedulers from a resumed checkpoint."""
    if not state:
        return
    for name, key in OPTIMIZER_KEYS.items():
        if name in optimizers and state.get(key):
            optimizers[name].load_state_dict(state[key])
        elif name in optimizers:
            logger.warning("checkpoint has no %s state (saved without --save_optimizer): starting it afresh", key)
    for name, key in SCHEDULER_KEYS.items():
        if name in schedulers and state.get(key):
            schedulers[name].load_state_dict(state[key])


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
    """Write step-N/model.pth.tar atomically and point `latest` at it. Call on the main rank only.

    `extra` adds keys of ours (e.g. `data_positions`) after the original's; the original's loaders ignore them.
    """
    directory = run_dir / "checkpoint"
    step_dir = directory / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)

    def state_of(objects: dict, name: str) -> dict | None:
        return objects[name].state_dict() if name in objects else None

    content = {"step": step, "model": model.state_dict()}
    for name, key in OPTIMIZER_KEYS.items():
        content[key] = state_of(optimizers, name) if with_optimizer else None
    for name, key in SCHEDULER_KEYS.items():
        content[key] = state_of(schedulers, name)
    content["opt"] = options
    content.update(extra or {})
    handle, tmp = tempfile.mkstemp(dir=step_dir, suffix=".tmp")
    os.close(handle)
    torch.save(content, tmp)
    with open(tmp, "rb") as handle:  # on disk before the rename: a crash never leaves a renamed, empty file
        os.fsync(handle.fileno())
    os.replace(tmp, step_dir / CHECKPOINT_FILE)  # a killed save never leaves a truncated model.pth.tar
    link_tmp = directory / f".latest-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(step_dir.name)
    os.replace(link_tmp, directory / "latest")
    logger.info("saved checkpoint %s", step_dir / CHECKPOINT_FILE)
    return step_dir / CHECKPOINT_FILE
