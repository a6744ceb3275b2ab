"""--precision: the training forward autocasts on every device; embedding and evaluation autocast on CUDA only."""

import pytest
import torch

from src.options import parse_settings
from src.precision import autocast, inference_autocast

CPU = torch.device("cpu")
ARGS = ["--reader_model_type", "t5-small", "--passages", "p.jsonl", "--train_data", "t.jsonl"]


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_training_autocasts_on_cpu_too(precision: str, dtype: torch.dtype) -> None:
    a = torch.randn(4, 4)
    with autocast(precision, CPU):
        assert (a @ a).dtype == dtype


def test_inference_stays_fp32_on_cpu_and_autocasts_on_cuda() -> None:
    a = torch.randn(4, 4)
    with inference_autocast("bf16", CPU):
        assert (a @ a).dtype == torch.float32  # fp32 is the faster and exact choice on CPU
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else torch.no_grad():
        context = inference_autocast("fp16", torch.device("cuda"))
    assert isinstance(context, torch.autocast) and (context.device, context.fast_dtype) == ("cuda", torch.float16)
    with pytest.raises(ValueError, match="precision"):
        autocast("fp8", CPU)


def test_precision_reaches_training_evaluation_and_the_index() -> None:
    settings = parse_settings([*ARGS, "--precision", "bf16"], "train")
    assert settings.train.precision == settings.eval.precision == settings.index.precision == "bf16"
