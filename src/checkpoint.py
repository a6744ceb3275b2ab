"""Build the Atlas model: fresh from pretrained parts, from a saved/released checkpoint, or resumed; and save.

Layout (as the original): {checkpoint_dir}/{name}/checkpoint/step-N/model.pth.tar and a `latest` symlink. The file is
a dict {step, model, optimizer, retr_optimizer, scheduler, retr_scheduler, opt}; `opt` is a plain dict, so it loads
with torch.load(weights_only=True). State-dict keys are `reader.*` (HF T5 names) and `retriever.contriever.*` or
`retriever.{query,passage}_contriever.*` (HF BERT names), the same as the original's.
"""

import argparse
import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import T5Config

from src import reader as fid
from src import retriever as contriever
from src.atlas import Atlas, AtlasConfig
from src.errors import UserError
from src.options import options_to_dict

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pth.tar"


@dataclass
class Loaded:
    """A model and, when resuming, where training stopped and the optimizer/scheduler states."""

    model: Atlas
    step: int = 0
    state: dict | None = None


def run_dir(opt: argparse.Namespace) -> Path:
    return Path(opt.checkpoint_dir) / opt.name


def needs_retriever(opt: argparse.Namespace) -> bool:
    return bool(opt.train_retriever or not (opt.closed_book or opt.use_file_passages))


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file (ours, or a released Atlas one whose `opt` is an argparse Namespace)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"--model_path: no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable Atlas checkpoint ({type(err).__name__}: {err})") from None


def clean_state_dict(state: dict) -> dict:
    """Strip DDP `.module` prefixes and the persistent position_ids buffers of transformers 4.18 BERT."""
    cleaned = {}
    for key, value in state.items():
        key = key.replace(".module.", ".").removeprefix("module.")
        if not key.endswith("embeddings.position_ids"):
            cleaned[key] = value
    return cleaned


def adapt_retriever_keys(state: dict, query_side: bool) -> dict:
    """Duplicate a tied retriever's weights into query/passage encoders for query-side training (or the reverse)."""
    has_untied = any(k.startswith("retriever.query_contriever.") for k in state)
    if query_side and not has_untied:
        out = {k: v for k, v in state.items() if not k.startswith("retriever.contriever.")}
        for key, value in state.items():
            if key.startswith("retriever.contriever."):
                suffix = key.removeprefix("retriever.contriever.")
                out[f"retriever.query_contriever.{suffix}"] = value
                out[f"retriever.passage_contriever.{suffix}"] = value.clone()
        return out
    return state


@contextlib.contextmanager
def hub_errors(flag: str, name: str):
    """Turn a model that cannot be loaded (not cached and no network, or not a model directory) into a UserError."""
    try:
        yield
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag} {name}: cannot load it ({reason})") from None


def build_model(opt: argparse.Namespace, device: torch.device) -> Loaded:
    """The model the options ask for: resumed run, --model_path checkpoint, or pretrained reader + retriever."""
    latest = run_dir(opt) / "checkpoint" / "latest"
    resume = opt.model_path in (None, "none") and latest.exists()
    ckpt = read_checkpoint(latest) if resume else None
    if ckpt is None and opt.model_path not in (None, "none"):
        ckpt = read_checkpoint(opt.model_path)
    state = clean_state_dict(ckpt["model"]) if ckpt else {}
    query_side = bool(opt.query_side_retriever_training or any(".query_contriever." in k for k in state))
    reader = reader_tok = retriever = retriever_tok = None
    if not getattr(opt, "retrieve_only", False):
        with hub_errors("--reader_model_type", opt.reader_model_type):
            reader_tok = fid.load_reader_tokenizer(opt.reader_model_type)
            if ckpt:  # weights come from the checkpoint: build the architecture only
                config = T5Config.from_pretrained(opt.reader_model_type, dropout_rate=opt.dropout)
                reader = fid.reader_from_config(config)
            else:
                reader = fid.load_reader(opt.reader_model_type, dropout=opt.dropout)
    if needs_retriever(opt):
        with hub_errors("--retriever_model_path", opt.retriever_model_path):
            retriever_tok = contriever.load_tokenizer(opt.retriever_model_path)
            encoder = contriever.load_encoder(opt.retriever_model_path, opt.uncentered_layernorm)
        retriever = contriever.Retriever(encoder, query_side=query_side)
    enable_gradient_checkpointing(reader, retriever, opt)
    model = Atlas(reader, retriever, reader_tok, retriever_tok, AtlasConfig.from_options(opt))
    if ckpt:
        load_weights(model, adapt_retriever_keys(state, query_side), opt)
    model.to(device)
    if resume:
        logger.info("resuming %s from step %d", run_dir(opt), ckpt["step"])
        return Loaded(model, int(ckpt["step"]), ckpt)
    return Loaded(model)


def enable_gradient_checkpointing(reader, retriever, opt: argparse.Namespace) -> None:
    """Switch gradient checkpointing on once, at build time (the original toggled it around every forward)."""
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if reader is not None and opt.use_gradient_checkpoint_reader:
        reader.gradient_checkpointing_enable(**kwargs)
    if retriever is not None and opt.use_gradient_checkpoint_retriever:
        for encoder in {id(m): m for m in (retriever.query_encoder, retriever.passage_encoder)}.values():
            encoder.gradient_checkpointing_enable(**kwargs)


def load_weights(model: Atlas, state: dict, opt: argparse.Namespace) -> None:
    """Load the parts of `state` this model has, strictly for the parts it has."""
    keep = tuple(p for p, part in (("reader.", model.reader), ("retriever.", model.retriever)) if part is not None)
    if model.retriever is not None and not any(k.startswith("retriever.") for k in state):
        # a closed-book or --use_file_passages run saves no retriever: pair its reader with the pretrained one
        logger.info("--model_path %s has no retriever: using --retriever_model_path %s", opt.model_path,
                    opt.retriever_model_path)  # fmt: skip
        keep = ("reader.",)
    state = {k: v for k, v in state.items() if k.startswith(keep)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(keep) and not k.endswith("position_ids")]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:5])
        raise UserError(
            f"--model_path {opt.model_path}: checkpoint does not match --reader_model_type/--retriever_model_path "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {shown})"
        )


def save_checkpoint(
    opt: argparse.Namespace, step: int, model: Atlas, optimizers: dict, schedulers: dict, with_optimizer: bool
) -> Path:
    """Write step-N/model.pth.tar atomically and point `latest` at it. Call on the main rank only."""
    directory = run_dir(opt) / "checkpoint"
    step_dir = directory / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)

    def state_of(objects: dict, name: str) -> dict | None:
        return objects[name].state_dict() if name in objects else None

    content = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": state_of(optimizers, "reader") if with_optimizer else None,
        "retr_optimizer": state_of(optimizers, "retriever") if with_optimizer else None,
        "scheduler": state_of(schedulers, "reader"),
        "retr_scheduler": state_of(schedulers, "retriever"),
        "opt": options_to_dict(opt),
    }
    handle, tmp = tempfile.mkstemp(dir=step_dir, suffix=".tmp")
    os.close(handle)
    torch.save(content, tmp)
    os.replace(tmp, step_dir / CHECKPOINT_FILE)  # a killed save never leaves a truncated model.pth.tar
    link_tmp = directory / f".latest-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(step_dir.name)
    os.replace(link_tmp, directory / "latest")
    logger.info("saved checkpoint %s", step_dir / CHECKPOINT_FILE)
    return step_dir / CHECKPOINT_FILE
