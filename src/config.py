"""Typed settings: small frozen dataclasses built once from the flags by `src.options.parse_settings`.

Field names are the flags' names where a field is a flag. Each part of the code takes the one config it needs:
the model factory a `ModelConfig`, the collate step, retrieval and `Atlas` an `AtlasConfig`, the index an
`IndexConfig`, the training loop a `TrainConfig`, the evaluation loop an `EvalConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AtlasConfig:
    """What collate, retrieval and the model need: shapes, formats, the retriever loss, generation."""

    n_context: int = 1
    retriever_n_context: int = 5
    text_maxlength: int = 200
    target_maxlength: int | None = None
    encoder_format: str = "{query} title: {title} context: {text}"
    retriever_format: str = "{title} {text}"
    decoder_format: str | None = None  # the target as the decoder writes it, e.g. "answer: {target}"
    decoder_prompt_format: str | None = None  # a prompt the decoder is given and must not learn, e.g. "{query} ->"
    train_retriever: bool = False
    gold_score_mode: str = "ppmean"
    temperature_gold: float = 0.01
    temperature_score: float = 0.01
    kl_reduction: str = "mean"
    emdr_mixture: str = "token"
    compute_crossattention_stats: bool = False
    filtering_overretrieve_ratio: int = 2
    retrieve_with_rerank: bool = False
    n_to_rerank_with_retrieve_with_rerank: int = 128
    generation_max_length: int = 128
    generation_min_length: int | None = None
    generation_num_beams: int = 1
    generation_length_penalty: float = 1.0

    @property
    def needs_attention_scores(self) -> bool:
        """The reader must return cross-attention probabilities (eager attention): evalnormsum targets or stats."""
        return (self.train_retriever and self.gold_score_mode == "evalnormsum") or self.compute_crossattention_stats


@dataclass(frozen=True)
class ModelConfig:
    """What the model factory needs to build the reader and the retriever."""

    reader_model_type: str | None = None
    retriever_model_path: str = "facebook/contriever"
    model_path: str | None = None  # None: start from the pretrained parts (the flag's "none")
    dropout: float = 0.1
    uncentered_layernorm: str = "auto"  # auto | on | off (auto: what the checkpoint was trained with)
    query_side_retriever_training: bool = False
    use_gradient_checkpoint_reader: bool = False
    use_gradient_checkpoint_retriever: bool = False
    with_reader: bool = True  # False with --retrieve_only
    with_retriever: bool = True  # False for closed-book and --use_file_passages runs that do not train it
    eager_attention: bool = False  # build the reader with eager attention (cross-attention probabilities)
    reader_attention: str = "auto"  # --reader_attention (eager_attention overrides it)
    compile: bool = False  # --compile: torch.compile the reader's encoder blocks and the retriever's layers


@dataclass(frozen=True)
class IndexConfig:
    """The passage index: its kind (the first four fields), where passages come from, saving, refreshing."""

    mode: str = "flat"
    faiss_index_type: str = "flat"
    faiss_code_size: int | None = None
    faiss_nprobe: int | None = None
    enabled: bool = True  # False for --closed_book / --use_file_passages: nothing is retrieved
    passages: tuple[str, ...] = ()
    max_passages: int = -1
    passage_store_dir: str = "passage_store"
    load_index_path: str | None = None
    save_index_path: str | None = None
    save_index_n_shards: int = 128
    embedder_batch_size: int = 512
    retriever_format: str = "{title} {text}"
    text_maxlength: int = 200
    refresh_schedule: tuple[tuple[int, int, int], ...] = ()  # (start, end, rate) items of --refresh_index
    precision: str = "fp32"  # --precision: embedding (index build, refresh, queries, rerank) autocasts on CUDA


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: steps, batches, optimisation, precision, logging and saving."""

    run_dir: Path = Path("checkpoint/experiment_name")
    total_steps: int = 1000
    per_gpu_batch_size: int = 1
    accumulation_steps: int = 1
    shuffle: bool = False
    lr: float = 1e-4
    lr_retriever: float = 1e-5
    beta2: float = 0.999
    epsilon: float = 1e-6
    weight_decay: float = 0.1
    scheduler: str = "cosine"
    scheduler_steps: int | None = None
    warmup_steps: int = 1000
    clip: float = 1.0
    precision: str = "fp32"
    shard_optim: bool = False
    shard_grads: bool = False
    save_optimizer: bool = False
    train_retriever: bool = False
    freeze_retriever_steps: int = -1
    log_freq: int = 100
    eval_freq: int = 500
    save_freq: int = 5000


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation loop and what it writes."""

    run_dir: Path = Path("checkpoint/experiment_name")
    eval_data: tuple[str, ...] = ()
    per_gpu_batch_size: int = 1
    n_context: int = 1
    retrieve_only: bool = False
    write_results: bool = False
    dont_write_passages: bool = False
    precision: str = "fp32"  # --precision: evaluation and generation autocast on CUDA


@dataclass(frozen=True)
class Settings:
    """Everything a run is configured with; `options` is the flat flag dict saved in checkpoints."""

    mode: str
    task: str
    seed: int
    local_rank: int
    main_port: int
    run_dir: Path
    train_data: tuple[str, ...]
    model: ModelConfig
    atlas: AtlasConfig
    index: IndexConfig
    train: TrainConfig
    eval: EvalConfig
    options: dict[str, Any] = field(default_factory=dict)
