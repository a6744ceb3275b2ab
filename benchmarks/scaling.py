"""Search scaling: 2 gloo ranks (torchrun, 1 torch thread each) vs 1 rank (1 and 2 threads), same N and batch.

    python benchmarks/scaling.py [--n 1000000] [--dim 768] [--batch 64] [--k 100] [--repeats 5]

The script builds one PassageStore of ``--n`` minimal passages (temporary, deleted afterwards), then runs itself as
a worker: twice as one plain process (torch threads 1, then 2) and once under
``torchrun --standalone --nproc_per_node=2`` with OMP_NUM_THREADS=1. Every run holds the same seeded (N, d) fp32
embeddings in total (each rank generates only its own rows) and answers the same global batch of ``--batch``
queries, split evenly over the ranks (as evaluation does). The time of one collective `DistributedIndex.search` is
the slowest rank's, best of ``--repeats`` searches in each of ``--cycles`` launches (the configurations alternate).
Core-normalised efficiency = (t_1rank * threads_1rank) / (t_2ranks * 2): with 1 thread it is t1 / (2 * t2); against
1 rank with 2 threads (the same two cores) it is t1 / t2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_common import build_id_only_store, load_note, machine_info, print_table, seeded_rows  # noqa: E402


def worker(store_dir: str, out_dir: str, dim: int, batch: int, k: int, repeats: int, threads: int) -> None:
    """One rank: load its rows, time `search` on its share of the global batch, write times and result rows."""
    torch.set_num_threads(threads)
    from src import distributed as dist
    from src.index import DistributedIndex, block_ranges
    from src.index.flat import exact_topk
    from src.passages import PassageStore

    world = dist.init_distributed()
    try:
        index = DistributedIndex(PassageStore.open(store_dir), dim, world)
        index.set_embeddings(seeded_rows(index.local_rows.start, index.local_rows.stop, dim))
        all_queries = torch.randn((batch, dim), generator=torch.Generator().manual_seed(1234))  # (B, d) global
        lo, hi = block_ranges(batch, world.world_size)[world.rank]
        mine = all_queries[lo:hi]  # this rank's queries
        index.search(mine, k)  # warm-up
        search_times, local_times = [], []
        for _ in range(repeats):
            dist.barrier()
            started = time.perf_counter()
            rows = index.search(mine, k)[1]
            search_times.append(time.perf_counter() - started)
            dist.barrier()
            started = time.perf_counter()  # the local part alone: every query against this rank's rows
            exact_topk(index.local_embeddings, all_queries, k, index.local_rows.start)  # the local part alone
            local_times.append(time.perf_counter() - started)
        slowest = torch.tensor([search_times, local_times], dtype=torch.float64)  # (2, repeats)
        if dist.is_distributed():
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        np.save(f"{out_dir}/rows.w{world.world_size}.t{threads}.r{world.rank}.npy", rows.numpy())
        if world.is_main:
            result = {"search_s": slowest[0].min().item(), "local_s": slowest[1].min().item()}
            with open(f"{out_dir}/times.w{world.world_size}.t{threads}.json", "w") as handle:
                json.dump(result, handle)
    finally:
        dist.destroy_distributed()


def launch(args: argparse.Namespace, store_dir: str, out_dir: str, world_size: int, threads: int) -> dict:
    """Run the worker (plain process for 1 rank, torchrun for more) and return rank 0's times."""
    script = os.path.abspath(__file__)
    flags = [
        "--worker", store_dir, out_dir, "--dim", str(args.dim), "--batch", str(args.batch),
        "--k", str(args.k), "--repeats", str(args.repeats), "--threads", str(threads),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if world_size == 1:
        command = [sys.executable, script, *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
        command += [script, *flags]
    subprocess.run(command, check=True, env=env)
    with open(f"{out_dir}/times.w{world_size}.t{threads}.json") as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64, help="global query batch")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="searches per launch (the best is kept)")
    parser.add_argument("--cycles", type=int, default=2, help="launches of each configuration, alternating")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help="parent of the temporary directory (default: the system's)")
    parser.add_argument("--worker", nargs=2, metavar=("STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.dim, args.batch, args.k, args.repeats, args.threads)
        return

    print(machine_info())
    tmp = tempfile.mkdtemp(prefix="bench_scaling_", dir=args.tmp)
    try:
        build_id_only_store(args.n, f"{tmp}/store")
        runs: dict[tuple[int, int], dict] = {}  # (ranks, threads per rank) -> best times over the cycles
        for _ in range(args.cycles):  # the configurations alternate, so all see the same background load
            for world_size, threads in ((1, 1), (1, 2), (2, 1)):
                times = launch(args, f"{tmp}/store", tmp, world_size, threads)
                print(f"{world_size} rank(s) x {threads} thread(s): {times}", flush=True)
                best = runs.setdefault((world_size, threads), times)
                runs[(world_size, threads)] = {name: min(best[name], times[name]) for name in times}
        reference = np.load(f"{tmp}/rows.w1.t1.r0.npy")
        two_ranks = np.concatenate([np.load(f"{tmp}/rows.w2.t1.r{r}.npy") for r in range(2)])
        same = np.array_equal(reference, two_ranks) and np.array_equal(reference, np.load(f"{tmp}/rows.w1.t2.r0.npy"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    t2 = runs[(2, 1)]["search_s"]
    rows = []
    for (world_size, threads), r in runs.items():
        efficiency = "-" if world_size == 2 else f"{r['search_s'] * threads / (t2 * 2):.2f}"
        rows.append(
            [
                f"{world_size} x {threads}",
                f"{r['search_s'] * 1e3:.0f}",
                f"{r['local_s'] * 1e3:.0f}",
                f"{r['search_s'] / t2:.2f}",
                efficiency,
            ]
        )
    print_table(
        [
            "ranks x threads",
            "search ms/batch",
            "local top-k only ms",
            "t / t(2x1)",
            "efficiency of 2x1 vs this",
        ],
        rows,
        title=f"N={args.n}, d={args.dim}, global batch {args.batch}, k={args.k}, fp32, gloo",
    )
    print(f"2-rank results identical to 1-rank results: {same}")
    print(f"at the end: {load_note()}")
    if not same:
        raise SystemExit("the 2-rank search returned different rows")


if __name__ == "__main__":
    main()
