"""Shared fixtures: a tiny offline demo world (data + small reader/retriever models) built once per session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` run where a GPU is and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_script(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repo root, as a user would (offline: no hub lookups, which only time out here)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A small demo world with a scratch BERT retriever (no pretrained weights needed)."""
    out = tmp_path_factory.mktemp("demo") / "world"
    result = run_script(["preprocessing/prepare_demo.py", "--output_directory", str(out), "--n_entities", "40",
                         "--retriever", "scratch"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def demo_args(demo: Path, checkpoint_dir: Path) -> list[str]:
    """Flags every run on the demo world shares: task, models, passages, training data, output directory."""
    return [
        *("--task", "qa", "--reader_model_type", str(demo / "models/reader")),
        *("--retriever_model_path", str(demo / "models/retriever")),
        *("--passages", str(demo / "data/passages.jsonl"), "--train_data", str(demo / "data/train.jsonl")),
        *("--checkpoint_dir", str(checkpoint_dir), "--text_maxlength", "64", "--per_gpu_embedder_batch_size", "16"),
    ]
