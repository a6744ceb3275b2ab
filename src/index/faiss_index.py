"""faiss indexes for one shard (``--index_mode faiss``); faiss is imported only when this mode is used.

Types (``--faiss_index_type``), all with inner-product metric, built on CPU (faiss-cpu), or on the GPU when the
shard lives on CUDA and faiss has GPU support (``faiss.StandardGpuResources``; see `gpu_device_index`):

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

On the GPU (flat, ivfflat, ivfsq, ivfpq: the types faiss can move there; sq and pq stay on the CPU with a warning),
the index is trained, filled and searched with torch CUDA tensors through ``faiss.contrib.torch_utils``, so queries
and results never leave the device. Saving writes a CPU copy (`to_cpu`).
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any

import numpy as np
import torch

from src.errors import UserError

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivfflat", "ivfsq", "sq", "pq", "ivfpq")
_SQ_BITS = {4: "QT_4bit", 6: "QT_6bit", 8: "QT_8bit", 16: "QT_fp16"}
_GPU_RESOURCES: dict[int, Any] = {}  # one StandardGpuResources per CUDA device, kept alive with the indexes using it


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


def gpu_device_index(device: torch.device) -> int | None:
    """The CUDA device number faiss should build on for a shard on ``device``; None for CPU faiss (a CPU shard, or
    faiss without GPU support)."""
    if device.type != "cuda":
        return None
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def is_gpu_index(index: Any) -> bool:
    """True for a faiss GPU index (they alone have ``getDevice``)."""
    return hasattr(index, "getDevice")


def to_gpu(index: Any, gpu: int) -> Any:
    """``index`` moved to CUDA device ``gpu``, or left on the CPU (with a warning) for types faiss cannot move."""
    faiss = import_faiss()
    importlib.import_module("faiss.contrib.torch_utils")  # lets GPU indexes take and return torch CUDA tensors
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES[gpu], gpu, index)
    except (RuntimeError, AttributeError) as error:  # e.g. IndexPQ, IndexScalarQuantizer: no GPU version
        logger.warning("faiss cannot put a %s on the GPU (%s): it stays on the CPU", type(index).__name__, error)
        return index


def to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index (what gets saved); a CPU index as it is."""
    return import_faiss().index_gpu_to_cpu(index) if is_gpu_index(index) else index


def build_index(
    vectors: np.ndarray | torch.Tensor,
    index_type: str,
    code_size: int | None,
    nprobe: int | None,
    gpu: int | None = None,
) -> Any:
    """Train a faiss index of ``index_type`` on ``vectors`` (n, d) float32 and add them (row i gets id i).

    With ``gpu`` (a CUDA device number), the index is moved there before training when faiss can, and trained and
    filled from ``vectors`` as a torch tensor (pass it on that device); otherwise from a numpy array.
    """
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
    if gpu is not None:
        index = to_gpu(index, gpu)
    if is_gpu_index(index):
        data = torch.as_tensor(vectors, dtype=torch.float32).contiguous()  # on the caller's (CUDA) device
    else:
        data = vectors.cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors
        data = np.ascontiguousarray(data, dtype=np.float32)
    if not index.is_trained:
        index.train(data)
    index.add(data)
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


def search_torch(index: Any, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`search` for a GPU index on (B, d) float32 torch ``queries`` on its device: (B, k) float32 scores and int64
    local ids (-1 where missing; score -inf there), on the queries' device. Nothing is copied to the host."""
    importlib.import_module("faiss.contrib.torch_utils")  # index.search then takes and returns torch tensors
    scores, ids = index.search(queries.float().contiguous(), k)  # (B, k), (B, k)
    return torch.where(ids < 0, float("-inf"), scores), ids.long()
