"""--precision as autocast contexts: training autocasts on every device; inference (embedding, evaluation) on CUDA only.

Weights stay fp32 (the optimizer's master copy); autocast runs matmuls in bf16/fp16. On CPU, inference stays in fp32:
it is the faster there (bf16 autocast measured 6x slower on the 2-core CPU of BENCHMARKS.md §2) and the exact choice.
"""

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for the training forward on any device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=DTYPES[precision])


def inference_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for embedding and evaluation on CUDA; nothing for fp32 and on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return autocast(precision, device)
