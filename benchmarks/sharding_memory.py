"""Per-rank bytes of parameters, gradients and AdamW state without sharding, with --shard_optim (ZeRO-1) and with
--shard_optim --shard_grads (ZeRO-2, FSDP2), on 2 CPU processes (gloo) with a small T5 reader + BERT retriever built
from configs (reader and retriever both train).

Bytes are counted from the tensors each rank holds (a DTensor's local shard; DDP's gradients are views of its
buckets, so they are counted once), not from RSS, which gloo's emulated collectives and the allocator make a poor
measure. Parameters are counted at rest (between steps); under ZeRO-2 they are gathered whole during a step.

    python benchmarks/sharding_memory.py [--d_model 256] [--layers 4]
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src import distributed as dist  # noqa: E402
from src.atlas import Atlas  # noqa: E402
from src.batching import Batch  # noqa: E402
from src.config import AtlasConfig, TrainConfig  # noqa: E402
from src.retriever import Retriever  # noqa: E402
from src.sharding import DataParallel  # noqa: E402
from src.training import build_optimizers  # noqa: E402

FLAGS = {
    "none": {},
    "--shard_optim": {"shard_optim": True},
    "--shard_optim --shard_grads": {"shard_optim": True, "shard_grads": True},
}


def build(d_model: int, layers: int) -> Atlas:
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5Config(vocab_size=8000, d_model=d_model, d_kv=d_model // 4, d_ff=4 * d_model, num_layers=layers,
                  num_heads=4, decoder_start_token_id=0, tie_word_embeddings=False)  # fmt: skip
    bert = BertConfig(vocab_size=8000, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=4 * d_model)  # fmt: skip
    atlas = AtlasConfig(n_context=2, retriever_n_context=2, train_retriever=True)
    return Atlas(T5ForConditionalGeneration(t5), Retriever(BertModel(bert)), atlas)


def batch(B: int = 2, K: int = 2, L: int = 32, T: int = 8) -> Batch:
    g = torch.Generator().manual_seed(dist.rank())
    reader_ids = torch.randint(1, 8000, (B, K, L), generator=g)  # (B, K, L)
    passage_ids = torch.randint(1, 8000, (B * K, L), generator=g)  # (B*K, L)
    query_ids = torch.randint(1, 8000, (B, L // 2), generator=g)  # (B, Lq)
    return Batch(reader_ids, torch.ones_like(reader_ids), torch.randint(1, 8000, (B, T), generator=g), query_ids,
                 torch.ones_like(query_ids), passage_ids, torch.ones_like(passage_ids), reader_ids,
                 torch.ones_like(reader_ids))  # fmt: skip


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a DTensor's local shard only)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if isinstance(t, torch.Tensor))


def measure(flags: dict, d_model: int, layers: int) -> dict[str, int]:
    """One training step under the flags' layout; bytes held after backward (gradients) and after the step."""
    model = build(d_model, layers)
    cfg = TrainConfig(**flags, train_retriever=True)
    parallel = DataParallel(model, cfg, 2)
    optimizers, _ = build_optimizers(model, cfg, parallel)
    parallel.unshard()
    losses = parallel.forward_module(batch(), train_retriever=True)
    losses["loss"].backward()
    grads = local_bytes(p.grad for p in model.parameters())
    for optimizer in optimizers.values():
        optimizer.step()
    states = []
    for optimizer in optimizers.values():
        local = optimizer.optim if parallel.layout == "zero1" else optimizer  # ZeRO-1: this rank's partition
        states += [t for s in local.state.values() for t in s.values()]
    return {"params": local_bytes(model.parameters()), "grads": grads, "optimizer": local_bytes(states)}


def worker(rank: int, port: int, d_model: int, layers: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    dist.init_distributed()
    try:
        results = {name: dist.all_gather_object(measure(flags, d_model, layers)) for name, flags in FLAGS.items()}
    finally:
        dist.destroy_distributed()
    if rank != 0:
        return
    base = results["none"][0]
    base_total = sum(base.values())
    print(f"T5 + BERT, d_model {d_model}, {layers} layers each; 2 processes (gloo); MB per rank (ratio to no flag)")
    print(f"{'flags':<28} {'rank':>4} {'params':>15} {'grads':>15} {'AdamW state':>15} {'total':>15}")
    for name, per_rank in results.items():
        for r, b in enumerate(per_rank):
            cells = [f"{b[k] / 2**20:7.2f} ({b[k] / base[k]:.2f})" for k in ("params", "grads", "optimizer")]
            total = sum(b.values())
            print(f"{name:<28} {r:>4} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                  f"{total / 2**20:7.2f} ({total / base_total:.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mp.spawn(worker, args=(args.port, args.d_model, args.layers), nprocs=2)


if __name__ == "__main__":
    main()
