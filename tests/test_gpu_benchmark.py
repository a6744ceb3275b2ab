"""benchmarks/gpu.py runs end to end in its CPU smoke mode (tiny sizes; the figures mean nothing there)."""

from pathlib import Path

import pytest

from benchmarks import gpu

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


@pytest.mark.skipif(not (BENCH / "corpus.jsonl").exists(), reason="needs ../shared/bench (corpus and tokenizer)")
def test_gpu_benchmark_smoke_run(capsys):
    figures = gpu.main(["--cpu-smoke", "--bench_dir", str(BENCH)])
    names = [f.name for f in figures]
    assert any(n.startswith("search") and "B=16" in n for n in names) and any("index build" in n for n in names)
    assert sum(n.startswith("FiD step") for n in names) == 3 + 6 and any(n.startswith("evaluation") for n in names)
    assert all(f.met is not False for f in figures if f.name.startswith("search:"))  # device scan == naive torch
    out = capsys.readouterr().out
    assert "| figure" in out and ("MET" in out or "MISSED" in out)
