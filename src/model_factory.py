"""Build the Atlas model and its tokenizers: from pretrained parts, or with the weights of a checkpoint.

The checkpoint (a released Atlas `model.pth.tar`, one of ours, or the run's own resume state) is read by
`src.checkpoint`; this module only turns its `model` state dict into modules: DDP prefixes and the persistent
position_ids of transformers 4.18 BERT are dropped, and a tied retriever is copied into the query and passage
encoders for query-side training.
"""

import argparse
import contextlib
import dataclasses
import logging

import torch
from transformers import T5Config

from src import reader as fid
from src import retriever as contriever
from src.atlas import Atlas
from src.batching import Tokenizers
from src.config import AtlasConfig, ModelConfig, Settings
from src.errors import UserError

logger = logging.getLogger(__name__)


def clean_state_dict(state: dict) -> dict:
    """Strip DDP `.module` prefixes and the persistent position_ids buffers of transformers 4.18 BERT."""
    cleaned = {}
    for key, value in state.items():
        key = key.replace(".module.", ".").removeprefix("module.")
        if not key.endswith("embeddings.position_ids"):
            cleaned[key] = value
    return cleaned


def adapt_retriever_keys(state: dict, query_side: bool) -> dict:
    """Duplicate a tied retriever's weights into query/passage encoders for query-side training."""
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


def load_tokenizers(cfg: ModelConfig) -> Tokenizers:
    """The tokenizers of the models the settings build (None for a model that is not built); with --retrieve_only,
    the reader's too when --reader_model_type names it (the mlm task cuts its inputs with it)."""
    reader_tok = retriever_tok = None
    if cfg.with_reader or cfg.reader_model_type:
        with hub_errors("--reader_model_type", cfg.reader_model_type):
            reader_tok = fid.load_reader_tokenizer(cfg.reader_model_type)
    if cfg.with_retriever:
        with hub_errors("--retriever_model_path", cfg.retriever_model_path):
            retriever_tok = contriever.load_tokenizer(cfg.retriever_model_path)
    return Tokenizers(reader_tok, retriever_tok)


def uncentered_layernorm(cfg: ModelConfig, checkpoint: dict | None) -> bool:
    """Resolve --uncentered_layernorm: on/off as given; auto uses the formula the checkpoint's retriever was trained
    with: uncentered for a released Atlas checkpoint (its `opt` is the original's Namespace), what our checkpoints
    and exports record, and the standard LayerNorm for a retriever from --retriever_model_path alone."""
    opt = (checkpoint or {}).get("opt")
    if isinstance(opt, argparse.Namespace):
        recorded, source = True, "a released Atlas checkpoint (the original's uncentered LayerNorm)"
    elif isinstance(opt, dict) and opt.get("uncentered_layernorm") in ("on", True):
        recorded, source = True, "the checkpoint records the uncentered LayerNorm"
    elif checkpoint:
        recorded, source = False, "the checkpoint records the standard LayerNorm"
    else:
        recorded, source = False, f"a new retriever from {cfg.retriever_model_path}"
    if cfg.uncentered_layernorm == "auto":
        logger.info("retriever LayerNorm: %s (%s)", "uncentered" if recorded else "standard", source)
        return recorded
    chosen = cfg.uncentered_layernorm == "on"
    if checkpoint and chosen != recorded:
        logger.warning("--uncentered_layernorm %s, but %s", cfg.uncentered_layernorm, source)
    return chosen


def record_layernorm(settings: Settings, model: Atlas) -> Settings:
    """The settings with --uncentered_layernorm resolved to what the retriever uses (on/off): the options are saved
    in checkpoints, so `auto` then loads them with the same formula."""
    if model.retriever is None:
        return settings
    value = "on" if model.retriever.uncentered_layernorm else "off"
    return dataclasses.replace(
        settings,
        model=dataclasses.replace(settings.model, uncentered_layernorm=value),
        options={**settings.options, "uncentered_layernorm": value},
    )


def build_model(
    cfg: ModelConfig,
    atlas_cfg: AtlasConfig,
    device: torch.device,
    checkpoint: dict | None = None,
    tokenizers: Tokenizers | None = None,
) -> tuple[Atlas, Tokenizers]:
    """The model the settings ask for, with `checkpoint["model"]` weights when a checkpoint is given, and its
    tokenizers (loaded unless given)."""
    tokenizers = tokenizers or load_tokenizers(cfg)
    state = clean_state_dict(checkpoint["model"]) if checkpoint else {}
    query_side = bool(cfg.query_side_retriever_training or any(".query_contriever." in k for k in state))
    reader = retriever = None
    if cfg.with_reader:
        with hub_errors("--reader_model_type", cfg.reader_model_type):
            if checkpoint:  # weights come from the checkpoint: build the architecture only
                config = T5Config.from_pretrained(cfg.reader_model_type, dropout_rate=cfg.dropout)
                reader = fid.reader_from_config(config)
            else:
                reader = fid.load_reader(cfg.reader_model_type, dropout=cfg.dropout)
        # evalnormsum reads attention probabilities, which fused kernels do not return
        fid.set_attention(reader, "eager" if cfg.eager_attention else cfg.reader_attention)
    if cfg.with_retriever:
        with hub_errors("--retriever_model_path", cfg.retriever_model_path):
            encoder = contriever.load_encoder(cfg.retriever_model_path, uncentered_layernorm(cfg, checkpoint))
        retriever = contriever.Retriever(encoder, query_side=query_side)
    enable_gradient_checkpointing(reader, retriever, cfg)
    if cfg.compile:
        compile_model(reader, retriever)
    model = Atlas(reader, retriever, atlas_cfg)
    if checkpoint:
        load_weights(model, adapt_retriever_keys(state, query_side), cfg)
    return model.to(device), tokenizers


def enable_gradient_checkpointing(reader, retriever, cfg: ModelConfig) -> None:
    """Switch gradient checkpointing on once, at build time (the original toggled it around every forward)."""
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if reader is not None and cfg.use_gradient_checkpoint_reader:
        reader.gradient_checkpointing_enable(**kwargs)
    if retriever is not None and cfg.use_gradient_checkpoint_retriever:
        for encoder in {id(m): m for m in (retriever.query_encoder, retriever.passage_encoder)}.values():
            encoder.gradient_checkpointing_enable(**kwargs)


# Compiled graphs kept per function (torch's default: 8). A T5 block has one graph for the first block (which makes
# the position bias) and one for the others, for each of train / eval-no-grad (the teacher, evaluation) and static /
# dynamic lengths, and the same block code serves every T5 in the process: 8 was reached in one benchmark run, after
# which torch runs the block eagerly without saying so in the step's figures.
COMPILED_GRAPHS_PER_FUNCTION = 64


def compile_model(reader, retriever) -> None:
    """--compile: the reader's encoder blocks and the retriever's layers, each compiled in place (after the query-side
    copy of the encoder is made: a compiled module does not deep-copy)."""
    import torch._dynamo.config

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.8
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), COMPILED_GRAPHS_PER_FUNCTION))
    if reader is not None:
        fid.compile_encoder(reader)
    n_layers = 0
    if retriever is not None:
        for encoder in {id(m): m for m in (retriever.query_encoder, retriever.passage_encoder)}.values():
            n_layers += contriever.compile_layers(encoder)
    logger.info("--compile: %d reader encoder blocks and %d retriever layers compiled on first use",
                len(reader.encoder.block) if reader is not None else 0, n_layers)  # fmt: skip


def load_weights(model: Atlas, state: dict, cfg: ModelConfig) -> None:
    """Load the parts of `state` this model has, strictly for the parts it has."""
    keep = tuple(p for p, part in (("reader.", model.reader), ("retriever.", model.retriever)) if part is not None)
    if model.retriever is not None and not any(k.startswith("retriever.") for k in state):
        # a closed-book or --use_file_passages run saves no retriever: pair its reader with the pretrained one
        logger.info("the checkpoint has no retriever: using --retriever_model_path %s", cfg.retriever_model_path)
        keep = ("reader.",)
    state = {k: v for k, v in state.items() if k.startswith(keep)}
    own = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        key, saved, built = wrong[0]
        raise UserError(
            f"--model_path {cfg.model_path}: {key} is {saved} in the checkpoint but {built} in the model built from "
            f"--reader_model_type/--retriever_model_path ({len(wrong)} tensors differ in shape)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(keep) and not k.endswith("position_ids")]
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:5])
        raise UserError(
            f"--model_path {cfg.model_path}: checkpoint does not match --reader_model_type/--retriever_model_path "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {shown})"
        )
