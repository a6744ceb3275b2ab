"""Exact search: our DistributedIndex (flat, one process) vs faiss IndexFlatIP on the same synthetic vectors.

    python benchmarks/search.py [--n 1000000] [--dim 768] [--k 100] [--batch_sizes 1 64 256]

Builds a PassageStore of ``--n`` minimal passages in a temporary directory (deleted afterwards), fills a
DistributedIndex with seeded standard-normal fp32 vectors and adds the same vectors to faiss. Before timing, checks
that both return the same ids (up to float ties) for the main batch. Reports per batch size: best time of each, the
speed ratio, achieved bytes/s (N*d*4 / time) against this machine's memory read bandwidth, and GFLOP/s against its
measured sgemm peak; the roofline bound is max(bytes / bandwidth, flops / peak).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_common import (  # noqa: E402
    best_time,
    build_id_only_store,
    load_note,
    machine_info,
    matmul_peak_flops,
    memory_read_bandwidth,
    print_table,
    seeded_rows,
    with_threads,
)
from src.distributed import World  # noqa: E402
from src.index import DistributedIndex  # noqa: E402


def check_same_ids(
    embeddings: torch.Tensor, queries: torch.Tensor, ours: np.ndarray, theirs: np.ndarray, atol: float
) -> tuple[int, bool]:
    """(queries whose id lists are identical, whether every difference is a near-tie).

    A difference is a tie when the two lists' float64 scores, position by position, agree within ``atol``.
    """
    identical = int((ours == theirs).all(axis=1).sum())
    ties_only = True
    q64 = queries.double()
    for b in np.nonzero(~(ours == theirs).all(axis=1))[0]:
        s_ours = (embeddings[torch.from_numpy(ours[b])].double() @ q64[b]).numpy()  # (k,)
        s_theirs = (embeddings[torch.from_numpy(theirs[b])].double() @ q64[b]).numpy()  # (k,)
        ties_only &= bool(np.allclose(s_ours, s_theirs, atol=atol, rtol=0))
    return identical, ties_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="number of vectors")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--queries", type=int, default=64, help="main batch size (checked for equal ids)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=4, help="best of this many searches, ours and faiss alternating")
    parser.add_argument("--tmp", default=None, help="parent directory for the temporary passage store")
    args = parser.parse_args()

    import faiss

    print(machine_info())
    print(f"torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}")
    read_1t = with_threads(1, lambda: memory_read_bandwidth(repeats=5))
    read_bw = max(read_1t, memory_read_bandwidth(repeats=5))
    peak = matmul_peak_flops(repeats=5)
    print(f"memory read bandwidth: {read_1t / 1e9:.1f} GB/s (1 thread), {read_bw / 1e9:.1f} GB/s (best)")
    print(f"fp32 sgemm 4096^2: {peak / 1e9:.0f} GFLOP/s")

    tmp = tempfile.mkdtemp(prefix="bench_search_", dir=args.tmp)
    try:
        started = time.perf_counter()
        store = build_id_only_store(args.n, f"{tmp}/store")
        print(f"built a {args.n}-passage store in {time.perf_counter() - started:.1f} s")
        embeddings = seeded_rows(0, args.n, args.dim)  # (N, d) fp32
        index = DistributedIndex(store, args.dim, World(0, 0, 1, torch.device("cpu")))
        index.set_embeddings(embeddings)  # kept as is: already fp32 and contiguous
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(embeddings.numpy())

        def ours(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return index.search(q, args.k)

        def theirs(q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            return flat.search(q.numpy(), args.k)

        generator = torch.Generator().manual_seed(1234)
        all_queries = torch.randn((max(args.batch_sizes + [args.queries]), args.dim), generator=generator)
        main_q = all_queries[: args.queries]
        our_rows = ours(main_q)[1].numpy()
        their_rows = theirs(main_q)[1]
        identical, ties_only = check_same_ids(embeddings, main_q, our_rows, their_rows, atol=1e-3)
        print(
            f"ids, batch {args.queries}, k {args.k}: identical lists for {identical}/{args.queries} queries; "
            f"all differences are float ties (|score diff| <= 1e-3): {ties_only}"
        )
        if not ties_only:
            raise SystemExit("our ids differ from faiss beyond float ties")

        table = []
        bytes_read = args.n * args.dim * 4
        for batch in args.batch_sizes:
            q = all_queries[:batch]
            ours(q)  # warm-up
            t_ours, t_faiss = float("inf"), float("inf")
            for _ in range(args.repeats):  # interleaved, so both see the same background load
                t_ours = min(t_ours, best_time(lambda q=q: ours(q), 1))
                t_faiss = min(t_faiss, best_time(lambda q=q: theirs(q), 1))
            flops = 2 * args.n * args.dim * batch
            bound = max(bytes_read / read_bw, flops / peak)
            table.append(
                [
                    batch,
                    f"{t_ours * 1e3:.0f}",
                    f"{t_faiss * 1e3:.0f}",
                    f"{t_faiss / t_ours:.1f}x",
                    f"{bytes_read / t_ours / 1e9:.1f} ({100 * bytes_read / t_ours / read_bw:.0f}%)",
                    f"{flops / t_ours / 1e9:.0f} ({100 * flops / t_ours / peak:.0f}%)",
                    f"{bound * 1e3:.0f} ({100 * bound / t_ours:.0f}%)",
                ]
            )
            print(f"batch {batch}: ours {t_ours:.3f} s, faiss {t_faiss:.3f} s", flush=True)
        print_table(
            [
                "batch",
                "ours ms",
                "faiss IndexFlatIP ms",
                "speed-up",
                "ours GB/s (% of read bw)",
                "ours GFLOP/s (% of sgemm)",
                "roofline ms (ours at % of it)",
            ],
            table,
            title=f"exact search, N={args.n}, d={args.dim}, k={args.k}, fp32, one process",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"at the end: {load_note()}")


if __name__ == "__main__":
    main()
