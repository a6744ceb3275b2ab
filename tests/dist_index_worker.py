"""Run under torchrun by tests/test_distributed_index.py: sharded search and save/load across world sizes on gloo.

Usage: torchrun --standalone --nproc_per_node=W tests/dist_index_worker.py {build,load,embed} WORKDIR
  build: build the store (rank 0) and index, check searches against brute force, save to WORKDIR/saved_w{W}.
  load:  load WORKDIR/saved_w2 under this world size, check searches, save again to WORKDIR/saved_w{W}.
  embed: embed the passages with a tiny seeded BERT and WORKDIR/tokenizer (batching blocks of 16 rows, so rank
         edges fall inside blocks) and save the index to WORKDIR/embedded_w{W}.
Any failed check raises, so torchrun exits non-zero.
"""

import importlib.util
import logging
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.config import IndexConfig  # noqa: E402
from src.distributed import barrier, destroy_distributed, end_process, init_distributed  # noqa: E402
from src.index import DistributedIndex, embed, embed_passages, load_index, save_index  # noqa: E402
from src.passages import PassageStore  # noqa: E402

N_PASSAGES, DIM = 103, 8


def matrices() -> dict[str, np.ndarray]:
    """The same embeddings on every rank: random floats, and small integers (exact scores, many ties)."""
    rng = np.random.default_rng(0)
    return {
        "float": rng.standard_normal((N_PASSAGES, DIM)).astype(np.float32),
        "int": rng.integers(-1, 2, size=(N_PASSAGES, DIM)).astype(np.float32),
    }


def brute_force(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T  # (B, N)
    rows = np.array([np.lexsort((np.arange(scores.shape[1]), -line))[:k] for line in scores], np.int64).reshape(-1, k)
    return np.take_along_axis(scores, rows, 1), rows


def check_searches(index: DistributedIndex, embeddings: np.ndarray, rank: int, world_size: int) -> None:
    """Per-rank query counts differ (rank 0 has none); every rank calls search the same number of times."""
    counts = [(r * 3) % 5 for r in range(world_size)]
    queries = np.random.default_rng(1).standard_normal((sum(counts), DIM)).astype(np.float32)
    queries[::2] = np.round(queries[::2])  # integer queries on the integer matrix give exact ties
    mine = queries[sum(counts[:rank]) : sum(counts[: rank + 1])]
    for k in (1, 5, 40, 500):
        scores, rows = index.search(torch.from_numpy(mine), k)
        ref_scores, ref_rows = brute_force(embeddings, mine, min(k, N_PASSAGES))
        assert rows.shape == (len(mine), min(k, N_PASSAGES)), rows.shape
        np.testing.assert_array_equal(rows.numpy(), ref_rows, err_msg=f"rank {rank} k {k}")
        np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5, rtol=1e-5)
        if index.mode == "flat" and k == 40:  # the rows' vectors, held by other ranks too (collective)
            asked = rows.clone()
            asked[:, -1] = -1  # no passage: zeros
            want = embeddings[np.maximum(asked.numpy(), 0)].astype(np.float32)  # (B, k, d)
            want[asked.numpy() < 0] = 0.0
            np.testing.assert_array_equal(index.vectors(asked).numpy(), want)
    only_last = mine if rank == world_size - 1 else mine[:0]  # every rank but one asks nothing
    rows = index.search(torch.from_numpy(only_last), 3)[1]
    np.testing.assert_array_equal(rows.numpy(), brute_force(embeddings, only_last, 3)[1])


def embed_with_tiny_bert(workdir: str, world) -> None:
    """Embed the store with the same seeded tiny encoder and tokenizer on every rank and save the index."""
    from test_index import MeanPooled
    from transformers import PreTrainedTokenizerFast

    from src.passages import passage_title

    def fmt(passage: dict) -> str:
        return f"{passage_title(passage)} {passage['text']}"

    store = PassageStore.build_or_open([os.path.join(workdir, "p.jsonl")], os.path.join(workdir, "store"), -1, world)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(workdir, "tokenizer"))  # trained by the test
    torch.manual_seed(0)
    encoder = MeanPooled(len(tokenizer))
    embed.BLOCK_ROWS = 16
    index = DistributedIndex(store, 32, world)
    embed_passages(index, encoder, tokenizer, fmt, 5, max_length=64)
    save_index(index, os.path.join(workdir, f"embedded_w{world.world_size}"), n_shards=3)


def main() -> None:
    phase, workdir = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.WARNING)
    world = init_distributed()
    try:
        data = matrices()
        if phase == "build":
            store = PassageStore.build_or_open([os.path.join(workdir, "p.jsonl")], workdir, -1, world)
            index = DistributedIndex(store, DIM, world)
            for name in ("int", "float"):
                index.set_embeddings(torch.from_numpy(data[name][index.local_rows.start : index.local_rows.stop]))
                check_searches(index, data[name], world.rank, world.world_size)
            save_index(index, os.path.join(workdir, f"saved_w{world.world_size}"), n_shards=5)
            if importlib.util.find_spec("faiss") is not None:  # optional: only --index_mode faiss needs it
                exact_faiss = DistributedIndex(store, DIM, world, IndexConfig(mode="faiss", faiss_index_type="flat"))
                exact_faiss.set_embeddings(
                    torch.from_numpy(data["float"][index.local_rows.start : index.local_rows.stop])
                )
                check_searches(exact_faiss, data["float"], world.rank, world.world_size)
        elif phase == "embed":
            embed_with_tiny_bert(workdir, world)
        else:
            index = load_index(os.path.join(workdir, "saved_w2"), world)
            check_searches(index, data["float"], world.rank, world.world_size)
            save_index(index, os.path.join(workdir, f"saved_w{world.world_size}"), n_shards=4)
        barrier()
    except BaseException:
        destroy_distributed()
        raise
    end_process(0)  # as train.py / evaluate.py end: see its docstring


if __name__ == "__main__":
    main()
