"""Command line options shared by train.py and evaluate.py.

Every flag of the original Atlas keeps its name, type, default and choices. Flags marked "(addition)" are new.
`parse_options` parses, maps paper-name aliases, applies --closed_book, then validates; a bad combination ends in
`parser.error` (argparse usage line, one error line naming the flags, exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import string
from pathlib import Path
from typing import Any

from src.config import AtlasConfig, EvalConfig, IndexConfig, ModelConfig, Settings, TrainConfig
from src.gold_scores import GOLD_SCORE_ALIASES, GOLD_SCORE_MODES
from src.hf_export import is_export, part_paths
from src.index.distributed_index import MODES as INDEX_MODES
from src.index.faiss_index import INDEX_TYPES as FAISS_INDEX_TYPES
from src.index.refresh import parse_refresh_schedule
from src.reader import ATTENTION as READER_ATTENTION
from src.tasks import TASKS, UNIMPLEMENTED_TASKS

logger = logging.getLogger(__name__)

MODES = ("train", "evaluate")
READER_MODEL_TYPES = (
    "t5-small",
    "t5-base",
    "t5-large",
    "t5-3b",
    "t5-11b",
    "google/t5-v1_1-base",
    "google/t5-v1_1-large",
    "google/t5-v1_1-xl",
    "google/t5-v1_1-xxl",
    "google/t5-base-lm-adapt",
    "google/t5-large-lm-adapt",
    "google/t5-xl-lm-adapt",
    "google/t5-xxl-lm-adapt",
)
PERMUTATIONS = ("single", "cyclic", "all")
DEFAULT_RETRIEVER = "facebook/contriever"


def reader_model_type(value: str) -> str:
    """argparse type for --reader_model_type: a known hub name or an existing local HF directory."""
    if value in READER_MODEL_TYPES or os.path.isdir(value):
        return value
    raise argparse.ArgumentTypeError(
        f"invalid choice: {value!r} (choose from {', '.join(READER_MODEL_TYPES)}, or an existing local directory)"
    )


def task_name(value: str) -> str:
    """argparse type for --task: a registered task; the original's other tasks are named as not implemented yet."""
    if value in UNIMPLEMENTED_TASKS:
        raise argparse.ArgumentTypeError(
            f"task {value!r} of the original Atlas is not implemented yet (implemented: {', '.join(TASKS)})"
        )
    return value


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--name", type=str, default="experiment_name", help="experiment name, also its directory name")
    g.add_argument("--checkpoint_dir", type=str, default="./checkpoint/", help="where experiments are saved")
    g.add_argument(
        "--model_path", type=str, default="none", help="Atlas checkpoint to start from ('none': T5+Contriever)"
    )
    g.add_argument("--per_gpu_batch_size", type=int, default=1, help="training batch size per device")
    g.add_argument(
        "--per_gpu_embedder_batch_size", type=int, default=512, help="passage-embedding batch size per device"
    )
    g.add_argument(
        "--local_rank", "--local-rank", type=int, default=-1, help="local rank for distributed runs (both spellings)"
    )
    g.add_argument("--main_port", type=int, default=-1, help="main port for multi-node jobs")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--log_freq", type=int, default=100, help="log training stats every this many steps")
    g.add_argument("--eval_freq", type=int, default=500, help="evaluate every this many training steps")
    g.add_argument("--save_freq", type=int, default=5000, help="save a checkpoint every this many steps")
    g.add_argument("--train_data", nargs="+", default=[], help="jsonl training files")
    g.add_argument("--eval_data", nargs="+", default=[], help="jsonl evaluation files")
    g.add_argument("--write_results", action="store_true", help="write evaluation outputs to files")
    g.add_argument("--dont_write_passages", action="store_true", help="leave retrieved passages out of written results")


def _add_index_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index")
    g.add_argument("--load_index_path", type=str, default=None, help="load a saved index (embeddings and passages)")
    g.add_argument("--save_index_path", type=str, default=None, help="save the index (and embeddings) here")
    g.add_argument(
        "--save_index_n_shards", type=int, default=128, help="number of shards to save; a multiple of the world size"
    )
    g.add_argument("--index_mode", type=str, default="flat", choices=list(INDEX_MODES), help="exact torch or faiss kNN")
    g.add_argument(
        "--faiss_index_type", type=str, default="flat", choices=list(FAISS_INDEX_TYPES), help="faiss index kind"
    )
    g.add_argument("--faiss_code_size", type=int, default=None, help="code size for PQ/SQ quantization")
    g.add_argument(
        "--faiss_nprobe", type=int, default=None, help="(addition) IVF lists probed per query; None: index code decides"
    )
    g.add_argument(
        "--passage_store_dir",
        type=str,
        default=None,
        help="(addition) passage store directory; None: a cache dir under --checkpoint_dir",
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--reader_model_type",
        type=reader_model_type,
        default=None,
        metavar="{" + ",".join(READER_MODEL_TYPES) + "}",
        help="reader T5 architecture (hub name), or a local HF model directory (addition)",
    )
    g.add_argument("--text_maxlength", type=int, default=200, help="max tokens of each query+passage input")
    g.add_argument("--target_maxlength", type=int, default=None, help="max target tokens in training; -1: no limit")
    g.add_argument("--n_context", type=int, default=1, help="passages given to the reader")
    g.add_argument("--passages", nargs="+", default=None, help="jsonl passage files to index (ignored with an index)")
    g.add_argument("--max_passages", type=int, default=-1, help="max passages to index; -1: all")
    g.add_argument(
        "--retriever_model_path",
        type=str,
        default=DEFAULT_RETRIEVER,
        help="Contriever hub name or local directory (--model_path overrides)",
    )
    g.add_argument("--retrieve_only", action="store_true", help="evaluate.py only: no reader, retrieval metrics only")
    g.add_argument("--train_retriever", action="store_true", help="train the retriever too")
    g.add_argument("--use_file_passages", action="store_true", help="use the 'passages' field of the data files")
    g.add_argument(
        "--retriever_n_context",
        type=int,
        default=5,
        help="passages retrieved for retriever training; raised to --n_context unless --train_retriever",
    )
    g.add_argument(
        "--gold_score_mode",
        type=str,
        default="ppmean",
        choices=list(GOLD_SCORE_MODES) + list(GOLD_SCORE_ALIASES),
        help="retriever loss; paper names: pdist = ppmean, adist = evalnormsum",
    )
    g.add_argument("--closed_book", action="store_true", help="no retrieval (plain T5): 1 context, encoder '{query}'")
    g.add_argument("--temperature_score", type=float, default=0.01, help="retriever softmax temperature")
    g.add_argument("--temperature_gold", type=float, default=0.01, help="target-distribution softmax temperature")
    g.add_argument("--compute_crossattention_stats", action="store_true", help="log gold/attention score correlations")
    g.add_argument("--filtering_overretrieve_ratio", type=int, default=2, help="over-retrieval factor when filtering")
    g.add_argument("--freeze_retriever_steps", type=int, default=-1, help="keep the retriever frozen for N steps")
    g.add_argument("--query_side_retriever_training", action="store_true", help="train the query encoder only")
    g.add_argument("--retrieve_with_rerank", action="store_true", help="rerank with a fresh passage encoder")
    g.add_argument("--n_to_rerank_with_retrieve_with_rerank", type=int, default=128, help="passages to rerank")
    g.add_argument(
        "--uncentered_layernorm",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        help="(addition) the original retriever's uncentered LayerNorm: auto (default) uses what --model_path was "
        "trained with (on for a released Atlas checkpoint), off otherwise; the bare flag means on",
    )
    g.add_argument(
        "--kl_reduction",
        type=str,
        default="mean",
        choices=["mean", "batchmean"],
        help="(addition) KL loss reduction; mean: original (divides by B*K)",
    )
    g.add_argument(
        "--emdr_mixture",
        type=str,
        default="token",
        choices=["token", "sequence"],
        help="(addition) emdr: mix passages per target token (original) or over the whole target (EMDR^2, paper)",
    )


def _add_format_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("formats and generation")
    g.add_argument("--decoder_format", type=str, default=None, help="target format used in training and eval")
    g.add_argument("--decoder_prompt_format", type=str, default=None, help="decoder prompt, e.g. 'answer to {query}:'")
    g.add_argument(
        "--encoder_format", type=str, default="{query} title: {title} context: {text}", help="reader input format"
    )
    g.add_argument("--retriever_format", type=str, default="{title} {text}", help="retriever passage format")
    g.add_argument("--generation_max_length", type=int, default=128, help="max generated tokens")
    g.add_argument("--generation_min_length", type=int, default=None, help="min generated tokens")
    g.add_argument("--generation_length_penalty", type=float, default=1.0, help="beam-search length penalty")
    g.add_argument("--generation_num_beams", type=int, default=1, help="beam size")


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument(
        "--task", type=task_name, default=None, choices=list(TASKS), help="task: preprocessing, filters, metrics"
    )
    g.add_argument("--mlm_noise_density", type=float, default=0.15, help="fraction of text masked by MLM spans")
    g.add_argument("--mlm_mean_noise_span_length", type=float, default=3, help="mean MLM span length")
    g.add_argument("--min_words_per_lm_instance", type=int, default=None, help="skip shorter mlm/lm/section texts")
    g.add_argument("--min_lm_context_ratio", type=float, default=0.5, help="min left/right length ratio for lm")
    g.add_argument("--max_lm_context_ratio", type=float, default=0.5, help="max left/right length ratio for lm")
    g.add_argument(
        "--qa_prompt_format", type=str, default="question: {question} answer: <extra_id_0>", help="qa input prompt"
    )
    g.add_argument("--multiple_choice_num_options", type=int, default=4, help="answer options (MMLU: 4)")
    g.add_argument(
        "--multiple_choice_train_permutations",
        type=str,
        default="single",
        choices=list(PERMUTATIONS),
        help="answer-order permutations in training",
    )
    g.add_argument(
        "--multiple_choice_eval_permutations",
        type=str,
        default="single",
        choices=list(PERMUTATIONS),
        help="answer-order permutations in evaluation",
    )


def _add_optim_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization")
    g.add_argument("--warmup_steps", type=int, default=1000, help="learning-rate warmup steps")
    g.add_argument("--total_steps", type=int, default=1000, help="training steps")
    g.add_argument("--scheduler_steps", type=int, default=None, help="scheduler length; None: --total_steps")
    g.add_argument("--accumulation_steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout rate")
    g.add_argument("--lr", type=float, default=1e-4, help="reader learning rate")
    g.add_argument("--lr_retriever", type=float, default=1e-5, help="retriever learning rate")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--scheduler", type=str, default="cosine", choices=["linear", "cosine", "fixed"], help="lr schedule")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--save_optimizer", action="store_true", help="save optimizer state in checkpoints")
    g.add_argument("--epsilon", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--alpha", type=float, default=1.0, help="AdamW alpha")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument(
        "--refresh_index",
        type=str,
        default="-1",
        help="index refresh schedule: 'start-end:rate,...' (e.g. 0-100:10,100-1000000:500), N (every N steps), "
        "or -1 (never refresh)",
    )
    g.add_argument("--shuffle", action="store_true", help="shuffle training data")
    g.add_argument("--precision", type=str, default="fp32", choices=["fp16", "fp32", "bf16"], help="numeric precision")
    g.add_argument("--shard_optim", action="store_true", help="shard the AdamW state over processes (ZeRO-1)")
    g.add_argument(
        "--shard_grads",
        action="store_true",
        help="shard gradients (and weights between steps) too (ZeRO-2: FSDP2); needs --shard_optim",
    )
    g.add_argument("--use_gradient_checkpoint_reader", action="store_true", help="gradient checkpointing in reader")
    g.add_argument(
        "--use_gradient_checkpoint_retriever", action="store_true", help="gradient checkpointing in retriever"
    )
    g.add_argument(
        "--reader_attention",
        type=str,
        default="auto",
        choices=list(READER_ATTENTION),
        help="the reader's attention kernels (transformers' implementations; evalnormsum needs eager and gets it)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the reader's encoder blocks and the retriever's layers (names and checkpoints unchanged)",
    )


def build_parser(mode: str) -> argparse.ArgumentParser:
    """Parser with every flag; `mode` ("train" or "evaluate") only sets the program name."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parser = argparse.ArgumentParser(prog=f"{mode}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (
        _add_run_flags,
        _add_index_flags,
        _add_model_flags,
        _add_format_flags,
        _add_task_flags,
        _add_optim_flags,
    ):
        add(parser)
    return parser


def _normalise(opt: argparse.Namespace) -> None:
    """Map gold-score aliases and target_maxlength -1 in place (also used for loaded dicts)."""
    mode = getattr(opt, "gold_score_mode", None)
    if mode in GOLD_SCORE_ALIASES:
        opt.gold_score_mode = GOLD_SCORE_ALIASES[mode]
        logger.info(
            "--gold_score_mode %s is the paper name of %s: using %s", mode, opt.gold_score_mode, opt.gold_score_mode
        )
    if getattr(opt, "target_maxlength", None) == -1:
        opt.target_maxlength = None


def _apply_consequences(opt: argparse.Namespace) -> None:
    """--closed_book and --use_file_passages overrides, as in the original; an export's architectures."""
    if is_export(opt.model_path):  # an export_hf.py directory carries its own reader and retriever architectures
        parts = part_paths(opt.model_path)
        if opt.reader_model_type is None and "reader" in parts:
            opt.reader_model_type = parts["reader"]
        if opt.retriever_model_path == DEFAULT_RETRIEVER and "retriever" in parts:
            opt.retriever_model_path = parts["retriever"]
    if opt.closed_book:
        opt.n_context, opt.retriever_n_context = 1, 1
        opt.encoder_format, opt.use_file_passages = "{query}", True
        logger.info("--closed_book: n_context=1, retriever_n_context=1, encoder_format='{query}', use_file_passages")
    if opt.use_file_passages:
        names = ("train_retriever", "query_side_retriever_training", "use_gradient_checkpoint_retriever")
        on = [f for f in names if getattr(opt, f)]
        if on:
            logger.warning("--use_file_passages loads no retriever: ignoring %s", ", ".join("--" + f for f in on))
        for f in on:
            setattr(opt, f, False)


# The fields each format flag is given (anything else would fail with a KeyError on the first batch).
FORMAT_FIELDS = {
    "encoder_format": ("query", "title", "text"),
    "retriever_format": ("title", "text"),
    "qa_prompt_format": ("question",),
    "decoder_format": ("target",),
    "decoder_prompt_format": ("query",),
}


def format_problem(template: str, allowed: tuple[str, ...]) -> str | None:
    """Why `template` cannot be formatted with the `allowed` fields, or None when it can."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        return f"is not a valid format string ({err})"
    for name in fields:
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base not in allowed:
            shown = "{" + name + "}"
            return f"names the field {shown}, which is not one of " + ", ".join("{" + a + "}" for a in allowed)
    return None


_AT_LEAST_ONE = (
    "per_gpu_batch_size per_gpu_embedder_batch_size total_steps text_maxlength n_context retriever_n_context "
    "accumulation_steps save_index_n_shards filtering_overretrieve_ratio n_to_rerank_with_retrieve_with_rerank "
    "generation_max_length generation_num_beams log_freq eval_freq save_freq multiple_choice_num_options"
)
_OPTIONAL_AT_LEAST_ONE = ("faiss_code_size", "faiss_nprobe", "scheduler_steps", "min_words_per_lm_instance")
_POSITIVE_FLOATS = ("temperature_score", "temperature_gold", "mlm_mean_noise_span_length")


def _validate(parser: argparse.ArgumentParser, opt: argparse.Namespace, mode: str) -> None:
    """Check flag values and combinations; parser.error() on the first problem."""
    err = parser.error
    for name in _AT_LEAST_ONE.split():
        if getattr(opt, name) < 1:
            err(f"--{name} must be >= 1, got {getattr(opt, name)}")
    for name in _OPTIONAL_AT_LEAST_ONE:
        if getattr(opt, name) is not None and getattr(opt, name) < 1:
            err(f"--{name} must be >= 1, got {getattr(opt, name)}")
    for name in _POSITIVE_FLOATS:
        if not getattr(opt, name) > 0:
            err(f"--{name} must be > 0, got {getattr(opt, name)}")
    if opt.warmup_steps < 0:
        err(f"--warmup_steps must be >= 0, got {opt.warmup_steps}")
    if opt.target_maxlength is not None and opt.target_maxlength < 1:
        err(f"--target_maxlength must be >= 1 or -1 (no truncation), got {opt.target_maxlength}")
    if opt.generation_min_length is not None and opt.generation_min_length < 0:
        err(f"--generation_min_length must be >= 0, got {opt.generation_min_length}")
    if opt.max_passages != -1 and opt.max_passages < 1:
        err(f"--max_passages must be >= 1 or -1 (all), got {opt.max_passages}")
    if not 0 <= opt.dropout < 1:
        err(f"--dropout must be in [0, 1), got {opt.dropout}")
    if not 0 < opt.mlm_noise_density < 1:
        err(f"--mlm_noise_density must be in (0, 1), got {opt.mlm_noise_density}")
    if mode == "train" and opt.retrieve_only:
        err("--retrieve_only is for evaluate.py only")
    if opt.retrieve_only and opt.closed_book:
        err("--retrieve_only cannot be combined with --closed_book")
    if opt.reader_model_type is None and not opt.retrieve_only:
        extra = " unless --retrieve_only" if mode == "evaluate" else ""
        err(f"--reader_model_type is required{extra} (a hub name or a local model directory)")
    if opt.shard_grads and not opt.shard_optim:
        err("--shard_grads requires --shard_optim")
    if opt.compile and opt.shard_grads:
        err("--compile with --shard_grads (FSDP2) is not supported yet: use --compile with --shard_optim or alone")
    if opt.query_side_retriever_training and not opt.train_retriever:
        err("--query_side_retriever_training requires --train_retriever")
    if opt.n_context > opt.retriever_n_context:
        if opt.train_retriever:
            err(
                f"--n_context ({opt.n_context}) must be <= --retriever_n_context ({opt.retriever_n_context}) "
                "with --train_retriever"
            )
        opt.retriever_n_context = opt.n_context
    if opt.retrieve_with_rerank and opt.n_to_rerank_with_retrieve_with_rerank < opt.retriever_n_context:
        err(
            f"--n_to_rerank_with_retrieve_with_rerank ({opt.n_to_rerank_with_retrieve_with_rerank}) must be >= "
            f"--retriever_n_context ({opt.retriever_n_context}) with --retrieve_with_rerank"
        )
    if opt.index_mode == "faiss" and opt.faiss_index_type in ("pq", "ivfpq") and opt.faiss_code_size is None:
        err(f"--faiss_index_type {opt.faiss_index_type} needs --faiss_code_size")
    if opt.load_index_path and opt.passages:
        logger.warning("--load_index_path given: ignoring --passages")
    if not (opt.passages or opt.load_index_path or opt.use_file_passages or opt.closed_book):
        err("give --passages or --load_index_path (or --use_file_passages / --closed_book)")
    for flag, allowed in FORMAT_FIELDS.items():
        template = getattr(opt, flag)
        problem = None if template is None else format_problem(template, allowed)
        if problem:
            err(f"--{flag} {template!r} {problem}")
    try:
        parse_refresh_schedule(opt.refresh_index)
    except ValueError as e:
        err(f"--refresh_index {opt.refresh_index!r}: {e}")
    if mode == "train" and not opt.train_data:
        err("--train_data: give at least one jsonl file to train on")
    if mode == "evaluate" and not opt.eval_data:
        err("--eval_data: give at least one jsonl file to evaluate")


def parse_options(argv: list[str] | None, mode: str) -> argparse.Namespace:
    """Parse argv (None: sys.argv[1:]), map aliases, apply --closed_book, validate; exits with status 2 on errors."""
    parser = build_parser(mode)
    opt = parser.parse_args(argv)
    _normalise(opt)
    _apply_consequences(opt)
    _validate(parser, opt, mode)
    return opt


def _plain(key: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(key, v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _plain(key, v) for k, v in value.items()}
    raise TypeError(f"option {key!r} has a value of type {type(value).__name__} that is not JSON-able")


def options_to_dict(opt: argparse.Namespace) -> dict[str, Any]:
    """Plain dict of JSON-able values (safe for torch.load(weights_only=True))."""
    return {k: _plain(k, v) for k, v in sorted(vars(opt).items())}


def options_from_dict(d: dict[str, Any], mode: str) -> argparse.Namespace:
    """Namespace from a saved dict; missing keys get the parser's defaults, unknown keys are kept. No validation."""
    opt = build_parser(mode).parse_args([])
    for k, v in d.items():
        setattr(opt, k, list(v) if isinstance(v, (list, tuple)) else v)
    _normalise(opt)
    return opt


def _fields(cls: type, opt: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of config class `cls` taking every field named like a flag from `opt`, then `overrides`."""
    names = cls.__dataclass_fields__
    values = {name: getattr(opt, name) for name in names if hasattr(opt, name)}
    values.update(overrides)
    return cls(**values)


def build_settings(opt: argparse.Namespace, mode: str) -> Settings:
    """The typed settings of a parsed, validated Namespace (the only place that reads flags after parsing)."""
    run_dir = Path(opt.checkpoint_dir) / opt.name
    retrieves = not (opt.closed_book or opt.use_file_passages)
    atlas = _fields(AtlasConfig, opt)
    model = _fields(
        ModelConfig,
        opt,
        model_path=None if opt.model_path in (None, "none") else opt.model_path,
        with_reader=not opt.retrieve_only,
        with_retriever=bool(opt.train_retriever or retrieves),
        eager_attention=atlas.needs_attention_scores,
    )
    index = _fields(
        IndexConfig,
        opt,
        enabled=retrieves,
        passages=tuple(opt.passages or ()),
        passage_store_dir=opt.passage_store_dir or str(Path(opt.checkpoint_dir) / "passage_store"),
        embedder_batch_size=opt.per_gpu_embedder_batch_size,
        refresh_schedule=tuple(parse_refresh_schedule(opt.refresh_index)),
    )
    return Settings(
        mode=mode,
        task=opt.task,
        seed=opt.seed,
        local_rank=opt.local_rank,
        main_port=opt.main_port,
        run_dir=run_dir,
        train_data=tuple(opt.train_data),
        model=model,
        atlas=atlas,
        index=index,
        train=_fields(TrainConfig, opt, run_dir=run_dir),
        eval=_fields(EvalConfig, opt, run_dir=run_dir, eval_data=tuple(opt.eval_data)),
        options=options_to_dict(opt),
    )


def parse_settings(argv: list[str] | None, mode: str) -> Settings:
    """parse_options, then the typed settings; exits with status 2 on a bad flag."""
    return build_settings(parse_options(argv, mode), mode)
