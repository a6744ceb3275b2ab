"""Index refresh: embed this rank's passages with the (passage) retriever and hand them to the index.

Batches are formed inside fixed global blocks of BLOCK_ROWS store rows: each block is tokenised once, sorted by token
count (longest first) and cut into batches, whatever the number of processes. A rank whose rows start or end inside a
block embeds that block's batches that hold any of its rows (the other rows' outputs are dropped), so every passage
is embedded in the same batch, padded to the same length, for any world size: the index is the same bits for any W
(on CPU; see the README for CUDA). Tokenising and padding run in a background thread, one block ahead of the encoder
(the tokenizers' Rust code releases the GIL), and embedding runs under `inference_autocast`.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from src import distributed as dist
from src.errors import UserError
from src.precision import inference_autocast

if TYPE_CHECKING:
    from src.index.distributed_index import DistributedIndex

logger = logging.getLogger(__name__)

# Global store rows per batching block: large enough that sorting by length leaves little padding, small enough that
# a rank embeds at most two blocks partly owned by a neighbour (< 1% extra work at millions of rows per rank).
BLOCK_ROWS = 16384
_PREFETCH = 4  # padded batches the tokenising thread may run ahead


@dataclass
class PaddedBatch:
    """One encoder batch: tokens (b, L) and which of its members this rank keeps."""

    input_ids: torch.Tensor  # (b, L) int64
    attention_mask: torch.Tensor  # (b, L) int64
    keep: np.ndarray  # (n_keep,) positions in the batch of this rank's rows
    local_rows: np.ndarray  # (n_keep,) their local rows (global row - first local row)


def token_id_fn(tokenizer: Any, max_length: int) -> Callable[[list[str]], list[list[int]]]:
    """``texts -> token ids`` as ``tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]`` gives them.

    For a fast (Rust) tokenizer, a private copy of its backend with that truncation and no padding encodes the batch
    directly (``encode_batch_fast``: no offsets, no per-text Python dicts), the path that keeps one thread ahead of
    a GPU; otherwise the tokenizer's own call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return lambda texts: tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    backend = copy.deepcopy(backend)  # the tokenizer's own truncation/padding state is left alone
    backend.no_padding()
    backend.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))
    return lambda texts: [encoding.ids for encoding in backend.encode_batch_fast(texts)]


def _block_batches(
    store: Any,
    local_rows: range,
    passage_format: Callable[[dict], str],
    tokenizer: Any,
    batch_size: int,
    max_length: int,
) -> Iterator[PaddedBatch]:
    """The batches of every global block that overlaps ``local_rows``, each tokenised once and padded to its longest."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    token_ids = token_id_fn(tokenizer, max_length)
    first_block = local_rows.start // BLOCK_ROWS * BLOCK_ROWS
    for block_start in range(first_block, local_rows.stop, BLOCK_ROWS):
        block = range(block_start, min(block_start + BLOCK_ROWS, len(store)))
        texts = [passage_format(p) for p in store.get_many(block)]
        ids = token_ids(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")  # longest first: an out-of-memory error shows at once
        for start in range(0, len(order), batch_size):
            members = order[start : start + batch_size]  # positions in the block
            rows = members + block_start  # global rows
            keep = np.nonzero((rows >= local_rows.start) & (rows < local_rows.stop))[0]
            if len(keep) == 0:
                continue  # another rank's rows only
            width = int(lengths[members].max())
            input_ids = np.full((len(members), width), pad_id, dtype=np.int64)  # (b, L)
            mask = np.zeros((len(members), width), dtype=np.int64)  # (b, L)
            for i, member in enumerate(members):
                n = int(lengths[member])
                span = slice(width - n, width) if left else slice(0, n)
                input_ids[i, span], mask[i, span] = ids[member], 1
            yield PaddedBatch(torch.from_numpy(input_ids), torch.from_numpy(mask), keep, rows[keep] - local_rows.start)


def _prefetch(batches: Iterator[PaddedBatch], depth: int, pin: bool) -> Iterator[PaddedBatch]:
    """Run ``batches`` in a daemon thread, ``depth`` items ahead; re-raise its error here. With ``pin``, tokens are
    put in pinned memory so that the copy to the GPU can overlap the encoder."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                if pin:
                    batch.input_ids, batch.attention_mask = (
                        batch.input_ids.pin_memory(),
                        batch.attention_mask.pin_memory(),
                    )
                while not stop.is_set():
                    try:
                        items.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as error:  # handed to the consumer, which raises it
            items.put(error)

    thread = threading.Thread(target=produce, name="embed-tokenizer", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def embed_passages(
    index: DistributedIndex,
    encoder: torch.nn.Module,
    tokenizer: Any,
    passage_format: Callable[[dict], str],
    batch_size: int,
    max_length: int,
    precision: str = "fp32",
) -> None:
    """COLLECTIVE: embed this rank's passages and `set_embeddings` them (the index refresh).

    ``encoder(input_ids=..., attention_mask=...)`` must return (n, dim) embeddings; it runs under no_grad in eval
    mode, under `inference_autocast(precision)`, and is put back in its previous mode. Batches: see the module
    docstring (each padded only to its longest member). ``batch_size`` is only a batch size; passages are truncated
    to ``min(max_length, tokenizer.model_max_length)`` tokens. Only rank 0 shows progress.
    """
    if batch_size < 1:
        raise UserError(f"--per_gpu_embedder_batch_size must be at least 1, got {batch_size}")
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max > 0:
        max_length = min(max_length, model_max)
    n = len(index.local_rows)
    device = next(encoder.parameters()).device
    out_dtype = torch.float16 if index.device.type == "cuda" else torch.float32
    embeddings = torch.empty((n, index.dim), dtype=out_dtype, device=index.device)  # (N_local, d)
    batches = _block_batches(index.store, index.local_rows, passage_format, tokenizer, batch_size, max_length)
    was_training = encoder.training
    encoder.eval()
    started = time.perf_counter()
    progress = tqdm(total=n, desc="embedding passages", unit="passage", disable=not index.world.is_main)
    try:
        with torch.no_grad(), inference_autocast(precision, device):
            for batch in _prefetch(batches, _PREFETCH, pin=device.type == "cuda"):
                output = encoder(
                    input_ids=batch.input_ids.to(device, non_blocking=True),
                    attention_mask=batch.attention_mask.to(device, non_blocking=True),
                )  # (b, d)
                index.check_dim(output.shape[-1])
                if len(batch.keep) < len(output):  # a block shared with another rank: keep this rank's rows
                    output = output[torch.from_numpy(batch.keep).to(output.device)]  # (n_keep, d)
                targets = torch.from_numpy(batch.local_rows).to(index.device, non_blocking=True)  # (n_keep,)
                embeddings[targets] = output.to(index.device, out_dtype)
                progress.update(len(batch.keep))
    finally:
        progress.close()
        encoder.train(was_training)
    seconds = time.perf_counter() - started
    logger.info("embedded %d passages in %.1f s (%.1f passages/s)", n, seconds, n / max(seconds, 1e-9))
    index.set_embeddings(embeddings)
    dist.barrier()  # the refreshed index is searched collectively next: start together
