"""Index refresh: embed this rank's passages with the (passage) retriever and hand them to the index."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from src import distributed as dist
from src.errors import UserError

if TYPE_CHECKING:
    from src.index.distributed_index import DistributedIndex

logger = logging.getLogger(__name__)

_LENGTH_BLOCK = 4096  # passages read at a time when measuring lengths


def _token_lengths(passages: Any, passage_format: Callable[[dict], str], tokenizer: Any, max_length: int) -> np.ndarray:
    """Token count (after truncation) of every formatted passage, so that each batch holds passages of one length.

    Tokenising twice costs far less than the encoder; sorting by characters left batches spanning 2x in tokens.
    """
    lengths = np.empty(len(passages), dtype=np.int64)
    for start in range(0, len(passages), _LENGTH_BLOCK):
        texts = [passage_format(p) for p in passages[start : start + _LENGTH_BLOCK]]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        lengths[start : start + len(texts)] = [len(x) for x in ids]
    return lengths


def embed_passages(
    index: DistributedIndex,
    encoder: torch.nn.Module,
    tokenizer: Any,
    passage_format: Callable[[dict], str],
    batch_size: int,
    max_length: int,
) -> None:
    """COLLECTIVE: embed this rank's passages and `set_embeddings` them (the index refresh).

    ``encoder(input_ids=..., attention_mask=...)`` must return (n, dim) embeddings; it runs under no_grad in eval
    mode and is put back in its previous mode. Passages are sorted by length (longest first, so an out-of-memory
    error shows at once) and each batch is padded only to its longest member. ``batch_size`` is only a batch size;
    passages are truncated to ``min(max_length, tokenizer.model_max_length)`` tokens. Only rank 0 shows progress.
    """
    if batch_size < 1:
        raise UserError(f"--per_gpu_embedder_batch_size must be at least 1, got {batch_size}")
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max > 0:
        max_length = min(max_length, model_max)
    passages = index.local_passages()
    n = len(passages)
    order = np.argsort(-_token_lengths(passages, passage_format, tokenizer, max_length), kind="stable")  # longest first
    device = next(encoder.parameters()).device
    out_dtype = torch.float16 if index.device.type == "cuda" else torch.float32
    embeddings = torch.empty((n, index.dim), dtype=out_dtype, device=index.device)  # (N_local, d)
    was_training = encoder.training
    encoder.eval()
    started = time.perf_counter()
    progress = tqdm(total=n, desc="embedding passages", unit="passage", disable=not index.world.is_main)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch_rows = order[start : start + batch_size]
                texts = [passage_format(passages[int(i)]) for i in batch_rows]
                tokens = tokenizer(
                    texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
                )
                output = encoder(
                    input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
                )  # (b, d)
                index.check_dim(output.shape[-1])
                embeddings[torch.from_numpy(batch_rows).to(index.device)] = output.to(index.device, out_dtype)
                progress.update(len(batch_rows))
    finally:
        progress.close()
        encoder.train(was_training)
    seconds = time.perf_counter() - started
    logger.info("embedded %d passages in %.1f s (%.1f passages/s)", n, seconds, n / max(seconds, 1e-9))
    index.set_embeddings(embeddings)
    dist.barrier()  # the refreshed index is searched collectively next: start together
