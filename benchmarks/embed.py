"""Passage embedding: ours (`src.index.embed_passages`: length-sorted, dynamic padding) vs file-order peers.

    python benchmarks/embed.py [--n 1000] [--batch_size 64] [--text_maxlength 512] [--bf16_n 256]

Embeds the first ``--n`` passages of ``corpus.jsonl`` with all-MiniLM-L6-v2 (the same encoder and batch size
everywhere, formatted "{title} {text}" with the "title: section" title, as `--retriever_format` does).
Peers, in file order: every passage padded to ``--text_maxlength`` ("max_length"), and every batch padded to its
longest passage ("longest", what the original Atlas `build_index` did). Checks that all embeddings agree, prints
passages/s and the ratios, then times ours under fp32 and under bf16 autocast on ``--bf16_n`` passages.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_common import REPO_ROOT, load_note, machine_info, minilm_path, print_table  # noqa: E402
from src.distributed import World  # noqa: E402
from src.index import DistributedIndex, embed_passages  # noqa: E402
from src.passages import (
    PassageStore,  # noqa: E402
    format_passage,  # noqa: E402
)
from src.retriever import PassageEmbedder, Retriever, encode, load_encoder, load_tokenizer  # noqa: E402

WORLD = World(0, 0, 1, torch.device("cpu"))
FORMAT = "{title} {text}"


class TokenCounter(torch.nn.Module):
    """Wraps an encoder ``(input_ids, attention_mask) -> (n, d)`` and counts the token slots it is given."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.slots = inner, 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.slots += input_ids.numel()
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def embed_ours(
    store: PassageStore, embedder: PassageEmbedder, tokenizer, batch_size: int, max_length: int
) -> tuple[float, torch.Tensor, int]:
    """(seconds, (n, d) embeddings, token slots incl. padding) of our index refresh over the whole store."""
    index = DistributedIndex(store, embedder.retriever.dim, WORLD)
    counter = TokenCounter(embedder)
    started = time.perf_counter()
    embed_passages(index, counter, tokenizer, lambda p: format_passage(FORMAT, p), batch_size, max_length)
    seconds = time.perf_counter() - started
    return seconds, index.local_embeddings.clone(), counter.slots


def padded_slots(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    """Token slots (incl. padding) of embedding passages of token ``lengths`` in ``order``, padded per batch."""
    return sum(
        int(lengths[order[s : s + batch_size]].max()) * len(order[s : s + batch_size])
        for s in range(0, len(order), batch_size)
    )


@torch.no_grad()
def embed_file_order(
    texts: list[str], encoder, tokenizer, batch_size: int, max_length: int, padding: str
) -> tuple[float, torch.Tensor, int]:
    """(seconds, (n, d) embeddings, token slots) of ``texts`` in file order, ``padding`` "max_length"/"longest"."""
    encoder.eval()
    out, slots = [], 0
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(
            texts[start : start + batch_size],
            padding=padding,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append(encode(encoder, tokens["input_ids"], tokens["attention_mask"]))  # (b, d)
        slots += tokens["input_ids"].numel()
    return time.perf_counter() - started, torch.cat(out), slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(REPO_ROOT.parent / "shared" / "bench" / "corpus.jsonl"))
    parser.add_argument("--n", type=int, default=1000, help="first N passages of the corpus")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--text_maxlength", type=int, default=512)
    parser.add_argument("--peers", nargs="*", default=["max_length", "longest"], choices=["max_length", "longest"])
    parser.add_argument("--bf16_n", type=int, default=256, help="passages for the fp32 vs bf16 comparison; 0: skip")
    args = parser.parse_args()
    print(machine_info(), f"| torch threads {torch.get_num_threads()}")

    model_path = minilm_path()
    encoder = load_encoder(model_path)
    tokenizer = load_tokenizer(model_path)
    embedder = PassageEmbedder(Retriever(encoder))
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        store = PassageStore.build([args.corpus], f"{tmp}/store", max_passages=args.n)
        texts = [format_passage(FORMAT, store.get(i)) for i in range(len(store))]
        encoded = tokenizer(texts, truncation=True, max_length=args.text_maxlength)["input_ids"]
        lengths = np.array([len(ids) for ids in encoded])
        print(
            f"{len(texts)} passages: mean {lengths.mean():.0f} tokens, max {lengths.max()}, "
            f"{(lengths == args.text_maxlength).sum()} truncated at {args.text_maxlength}"
        )
        embed_file_order(texts[:8], encoder, tokenizer, 8, args.text_maxlength, "longest")  # warm-up

        t_ours, ours, s_ours = embed_ours(store, embedder, tokenizer, args.batch_size, args.text_maxlength)
        n, real = len(texts), int(lengths.sum())
        rows = [["ours: sorted by length, pad to batch longest", f"{t_ours:.1f}", f"{n / t_ours:.1f}", "1.0x"]]
        rows[0] += ["reference", f"{s_ours} ({s_ours / real:.2f})"]
        for padding in args.peers:
            t_peer, peer, slots = embed_file_order(
                texts, encoder, tokenizer, args.batch_size, args.text_maxlength, padding
            )
            diff = (peer - ours).abs().max().item()
            name = "file order, pad to max_length" if padding == "max_length" else "file order, pad to batch longest"
            rows.append(
                [name, f"{t_peer:.1f}", f"{n / t_peer:.1f}", f"{t_peer / t_ours:.1f}x", f"{diff:.1e}", f"{slots}"]
            )
            rows[-1][-1] += f" ({slots / real:.2f})"
            print(f"{name}: {t_peer:.1f} s, max |diff| vs ours {diff:.1e}", flush=True)
        ideal = padded_slots(lengths, np.argsort(-lengths, kind="stable"), args.batch_size)
        rows.append(["(not run) sorted by token count", "-", "-", "-", "-", f"{ideal} ({ideal / real:.2f})"])
        print_table(
            ["method", "seconds", "passages/s", "ours faster by", "max abs diff vs ours", "token slots (/ real)"],
            rows,
            title=f"MiniLM-L6 embedding, {n} passages, batch {args.batch_size}, max {args.text_maxlength}",
        )

        if args.bf16_n > 0:
            small = PassageStore.build([args.corpus], f"{tmp}/small", max_passages=args.bf16_n)
            t32, e32, _ = embed_ours(small, embedder, tokenizer, args.batch_size, args.text_maxlength)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t16, e16, _ = embed_ours(small, embedder, tokenizer, args.batch_size, args.text_maxlength)
            cosine = torch.nn.functional.cosine_similarity(e16.float(), e32, dim=1).min().item()
            rel = ((e16.float() - e32).norm(dim=1) / e32.norm(dim=1)).max().item()
            print_table(
                ["precision", "seconds", "passages/s", "min cosine vs fp32", "max relative error"],
                [
                    ["fp32", f"{t32:.1f}", f"{len(small) / t32:.1f}", "1", "0"],
                    ["bf16 autocast", f"{t16:.1f}", f"{len(small) / t16:.1f}", f"{cosine:.5f}", f"{rel:.3f}"],
                ],
                title=f"ours, fp32 vs bf16 autocast on CPU, {len(small)} passages",
            )
    print(f"at the end: {load_note()}")


if __name__ == "__main__":
    main()
