"""Sharded search and re-sharding save/load with real process groups (torchrun, gloo, CPU).

Runs tests/dist_index_worker.py with 2 ranks (build, search, save) and then 3 ranks (load the 2-rank save, search,
save again), then loads both saves in this single process. Each torchrun costs ~5 s of start-up.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed

from src import distributed
from src.distributed import World, first_slurm_host
from src.index import load_index

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_index_worker as worker  # noqa: E402
from test_index import tiny_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.distributed


def torchrun(n_procs: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}"]
    command += [os.path.join(REPO, "tests", "dist_index_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun -n {n_procs} {args} failed:\n{result.stdout}\n{result.stderr[-6000:]}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed (torchrun) is not available")
def test_sharded_search_and_reshard(tmp_path):
    with open(tmp_path / "p.jsonl", "w") as handle:
        for i in range(worker.N_PASSAGES):
            handle.write(json.dumps({"id": str(i), "title": "t", "text": f"passage {i}"}) + "\n")
    torchrun(2, "build", str(tmp_path))
    torchrun(3, "load", str(tmp_path))
    embeddings = worker.matrices()["float"]
    queries = np.random.default_rng(2).standard_normal((6, worker.DIM)).astype(np.float32)
    one = World(0, 0, 1, torch.device("cpu"))
    for saved in ("saved_w2", "saved_w3"):
        index = load_index(str(tmp_path / saved), one)
        scores, rows = index.search(torch.from_numpy(queries), 10)
        ref_scores, ref_rows = worker.brute_force(embeddings, queries, 10)
        np.testing.assert_array_equal(rows.numpy(), ref_rows)
        np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5, rtol=1e-5)
        assert index.passages(rows[:1])[0][0]["id"] == str(ref_rows[0, 0])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed (torchrun) is not available")
def test_index_built_on_two_ranks_has_the_bits_of_one_built_on_one(tmp_path):
    with open(tmp_path / "p.jsonl", "w") as handle:
        for i in range(worker.N_PASSAGES):
            words = " ".join(f"w{(i * j) % 11}" for j in range(i % 9))  # lengths vary, so batches are sorted
            handle.write(json.dumps({"id": str(i), "title": "t", "text": f"passage {i} {words}"}) + "\n")
    # Trained once here: WordPiece training numbers its vocabulary differently in different processes.
    texts = [json.loads(line)["text"] for line in open(tmp_path / "p.jsonl")]
    tiny_tokenizer(["t " + text for text in texts]).save_pretrained(str(tmp_path / "tokenizer"))
    torchrun(1, "embed", str(tmp_path))
    torchrun(2, "embed", str(tmp_path))
    one = World(0, 0, 1, torch.device("cpu"))
    built_on_1 = load_index(str(tmp_path / "embedded_w1"), one).local_embeddings
    built_on_2 = load_index(str(tmp_path / "embedded_w2"), one).local_embeddings
    assert built_on_1.shape == (worker.N_PASSAGES, 32) and torch.equal(built_on_1, built_on_2)


def test_single_process_helpers_are_identities(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    world = distributed.init_distributed()
    assert (world.rank, world.world_size, world.is_main) == (0, 1, True) and not distributed.is_distributed()
    t = torch.arange(6.0).view(3, 2)
    gathered, sizes = distributed.all_gather_varsize(t)
    assert gathered is t and sizes == [3]
    assert distributed.all_reduce_sum(t) is t and distributed.all_reduce_max_int(4) == 4
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    distributed.destroy_distributed()


def test_first_slurm_host(monkeypatch):
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)  # exercise the built-in parser
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_slurm_host("node7,node8") == "node7"
    assert first_slurm_host("rack-[12-13]-x") == "rack-12-x"
