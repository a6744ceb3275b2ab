"""The index lifecycle: the --refresh_index schedule, building the index at start-up, and refreshing it.

`build_index` loads --load_index_path or builds the passage store from --passages and embeds it; `refresh_index`
re-embeds every rank's shard with the current passage encoder (and saves it when --save_index_path is given);
the training loop asks `refresh_due` at each step.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch

from src.config import IndexConfig
from src.distributed import World
from src.errors import UserError
from src.index.distributed_index import DistributedIndex
from src.index.embed import embed_passages
from src.index.io import load_index, save_index
from src.passages import PassageStore, format_passage
from src.retriever import PassageEmbedder

if TYPE_CHECKING:
    from src.atlas import Atlas
    from src.batching import Tokenizers

logger = logging.getLogger(__name__)

REFRESH_END = 2**32  # open end of a single-number refresh schedule
Schedule = tuple[tuple[int, int, int], ...]


def parse_refresh_schedule(text: str) -> list[tuple[int, int, int]]:
    """Parse --refresh_index: "-1" -> [], "N" -> [(0, 2**32, N)], "s-e:r,..." -> [(s, e, r), ...]; ValueError if bad."""
    text = text.strip()
    if text == "-1":
        return []
    if re.fullmatch(r"\d+", text):
        rate = int(text)
        if rate <= 0:
            raise ValueError(f"refresh rate must be positive, got {text!r}")
        return [(0, REFRESH_END, rate)]
    schedule = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)-(\d+):(\d+)\s*", item)
        if not m:
            raise ValueError(f"expected -1, N, or start-end:rate items, got {item!r}")
        start, end, rate = (int(x) for x in m.groups())
        if start >= end or rate <= 0:
            raise ValueError(f"need start < end and rate > 0 in {item.strip()!r}")
        schedule.append((start, end, rate))
    return schedule


def refresh_due(schedule: Schedule | list[tuple[int, int, int]], step: int) -> bool:
    """True if some (start, end, rate) item has start <= step < end and (step - start) % rate == 0."""
    return any(s <= step < e and (step - s) % r == 0 for s, e, r in schedule)


def passage_encoder_state(model: Atlas) -> dict[str, torch.Tensor]:
    """A CPU copy of the passage encoder's weights: what a resumed run needs to rebuild the index it was searching."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.retriever.passage_encoder.state_dict().items()}


def layernorm_name(uncentered: bool) -> str:
    return "uncentered" if uncentered else "standard"


def refresh_index(
    index: DistributedIndex,
    model: Atlas,
    tokenizers: Tokenizers,
    cfg: IndexConfig,
    encoder_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """COLLECTIVE: re-embed every rank's shard with the current passage encoder, then save it if asked.

    With `encoder_state`, those passage-encoder weights embed the passages instead (then the current ones come back):
    a run resumed after its passage encoder moved searches the index the uninterrupted run was searching.
    """
    encoder = model.retriever.passage_encoder
    current = passage_encoder_state(model) if encoder_state is not None else None
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    try:
        embed_passages(
            index,
            PassageEmbedder(model.retriever),
            tokenizers.retriever,
            lambda passage: format_passage(cfg.retriever_format, passage),
            cfg.embedder_batch_size,
            min(cfg.text_maxlength, 512),
            cfg.precision,
        )
    finally:
        if current is not None:
            encoder.load_state_dict(current)
    index.retriever_layernorm = layernorm_name(model.retriever.uncentered_layernorm)
    if cfg.save_index_path:
        save_index(index, cfg.save_index_path, cfg.save_index_n_shards)


def build_index(
    cfg: IndexConfig,
    model: Atlas,
    tokenizers: Tokenizers,
    world: World,
    encoder_state: dict[str, torch.Tensor] | None = None,
) -> DistributedIndex | None:
    """COLLECTIVE: load --load_index_path, or build from --passages and embed; None when nothing is retrieved.

    `encoder_state` (from a resumed checkpoint): embed with the passage-encoder weights the index had when it was saved.
    """
    if not cfg.enabled:
        return None
    if cfg.load_index_path:
        index = load_index(cfg.load_index_path, world, cfg)
        index.check_dim(model.retriever.dim)
        ours = layernorm_name(model.retriever.uncentered_layernorm)
        if index.retriever_layernorm not in (None, ours):
            flag = "on" if index.retriever_layernorm == "uncentered" else "off"
            saved = index.retriever_layernorm
            raise UserError(
                f"--load_index_path {cfg.load_index_path} was embedded by a retriever with the {saved} LayerNorm, but "
                f"this retriever uses the {ours} one: pass --uncentered_layernorm {flag}, or rebuild the index"
            )
        if encoder_state is not None:
            refresh_index(index, model, tokenizers, cfg, encoder_state)
        return index
    store = PassageStore.build_or_open(list(cfg.passages), cfg.passage_store_dir, cfg.max_passages, world)
    index = DistributedIndex(store, model.retriever.dim, world, cfg)
    logger.info("embedding %d passages (%d on this rank)", len(store), len(index.local_rows))
    refresh_index(index, model, tokenizers, cfg, encoder_state)
    return index
