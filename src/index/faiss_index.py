"""faiss indexes for one shard (``--index_mode faiss``); faiss is imported only when this mode is used.

Types (``--faiss_index_type``), all with inner-product metric, built on CPU (faiss-cpu):

| type | faiss class | code size (``--faiss_code_size``) |
|---|---|---|
| flat | IndexFlatIP | unused |
| ivfflat | IndexIVFFlat | unused |
| sq | IndexScalarQuantizer | bits per dimension: 4, 6, 8 (default) or 16 (fp16) |
| ivfsq | IndexIVFScalarQuantizer | as sq |
| pq | IndexPQ | number of sub-quantizers M (bytes per vector); must divide the dimension; required |
| ivfpq | IndexIVFPQ | as pq |

IVF types use ``nlist = floor(sqrt(N_local))`` lists, trained on every local vector. At search time they probe
``nprobe`` lists: ``--faiss_nprobe`` if given (clamped to nlist), else ``max(1, nlist // 8)``. The original Atlas
probed every list (nprobe = nlist), which made IVF as slow as a flat scan; pass ``--faiss_nprobe`` equal to nlist
for that behaviour. PQ codebooks use 8 bits, or fewer (with a warning) when a shard holds under 256 vectors.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from src.errors import UserError

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivfflat", "ivfsq", "sq", "pq", "ivfpq")
_SQ_BITS = {4: "QT_4bit", 6: "QT_6bit", 8: "QT_8bit", 16: "QT_fp16"}


def import_faiss() -> Any:
    """Import faiss, or raise a UserError explaining how to get it."""
    try:
        import faiss
    except ImportError:
        raise UserError("--index_mode faiss needs the faiss package: pip install faiss-cpu") from None
    return faiss


def validate_options(index_type: str, code_size: int | None, dim: int) -> None:
    """UserError for an unknown type or a code size that does not fit the type or the dimension."""
    if index_type not in INDEX_TYPES:
        raise UserError(f"--faiss_index_type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")
    if index_type in ("sq", "ivfsq") and code_size is not None and code_size not in _SQ_BITS:
        raise UserError(f"--faiss_code_size {code_size} is not a valid {index_type} size: use 4, 6, 8 or 16 bits")
    if index_type in ("pq", "ivfpq"):
        if code_size is None:
            raise UserError(f"--faiss_index_type {index_type} needs --faiss_code_size (e.g. 16, 32 or 64 bytes)")
        if code_size <= 0 or dim % code_size != 0:
            raise UserError(f"--faiss_code_size {code_size} must divide the embedding dimension {dim}")


def _pq_bits(n_vectors: int) -> int:
    # k-means for each PQ codebook needs at least 2**bits training points.
    bits = min(8, int(math.log2(n_vectors)))
    if bits < 8:
        logger.warning("only %d vectors in this shard: PQ codebooks use %d bits instead of 8", n_vectors, bits)
    return bits


def build_index(vectors: np.ndarray, index_type: str, code_size: int | None, nprobe: int | None) -> Any:
    """Train a faiss index of ``index_type`` on ``vectors`` (n, d) float32 and add them (row i gets id i)."""
    faiss = import_faiss()
    n, dim = vectors.shape
    validate_options(index_type, code_size, dim)
    metric = faiss.METRIC_INNER_PRODUCT
    if n < 2 and index_type in ("pq", "ivfpq"):
        logger.warning("%d vector(s) in this shard: too few to train %s, using an exact IndexFlatIP", n, index_type)
        index_type = "flat"
    nlist = max(1, math.isqrt(n))
    sq_type = getattr(faiss.ScalarQuantizer, _SQ_BITS[code_size or 8])
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "sq":
        index = faiss.IndexScalarQuantizer(dim, sq_type, metric)
    elif index_type == "pq":
        index = faiss.IndexPQ(dim, code_size, _pq_bits(n), metric)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if index_type == "ivfflat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        elif index_type == "ivfsq":
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, sq_type, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, code_size, _pq_bits(n), metric)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    set_nprobe(index, nprobe)
    return index


def set_nprobe(index: Any, nprobe: int | None) -> None:
    """Set how many IVF lists a search visits (see the module docstring); no-op for non-IVF indexes."""
    if not hasattr(index, "nlist"):
        return
    chosen = max(1, index.nlist // 8) if nprobe is None else max(1, min(nprobe, index.nlist))
    index.nprobe = chosen
    logger.info("faiss IVF index: nlist=%d, nprobe=%d", index.nlist, chosen)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of (B, d) float32 queries: (B, k) float32 scores and (B, k) int64 local ids (-1 where missing)."""
    if index.ntotal == 0 or queries.shape[0] == 0:
        return np.full((queries.shape[0], k), -np.inf, np.float32), np.full((queries.shape[0], k), -1, np.int64)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)  # (B, k), (B, k)
    scores[ids < 0] = -np.inf
    return scores, ids
