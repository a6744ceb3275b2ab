"""Passage RAM and index load time: our index (PassageStore + .npy shards) vs the original Atlas format.

    python benchmarks/passage_ram.py [--n 1000000] [--dim 768] [--shards 128] [--tmp /tmp] [--keep DIR]

Writes ``--n`` synthetic passages (id, title, section, ~100 words of Zipf-distributed random words) as jsonl and
seeded random embeddings, then saves them twice:
  ours:     PassageStore.build + save_index(n_shards=--shards), with fp32 shards (the default save on
            CPU) and with fp16 shards;
  original: ``--shards`` pickle files of lists of passage dicts (``passages.{i}.pt``) + torch.save'd fp16 (d, n_i)
            tensors (``embeddings.{i}.pt``), the original Atlas layout.
Each is loaded in a fresh subprocess (ours: ``load_index`` with its default shard-reading threads, and fp32 shards
again with one thread; original: pickle.load every file, a dict local index -> passage, torch.cat of the embeddings)
measuring load time and the VmRSS increase. Files are read once just before each load, so they are warm in the page
cache for both. Everything is written under a temporary directory in ``--tmp`` and deleted at the end, or with
``--keep DIR`` written to DIR once and reused by later runs with the same sizes (to compare two versions of the
loader on the same files).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_common import GIB, load_note, machine_info, print_table, rss_bytes, seeded_rows  # noqa: E402

CHUNK = 10_000  # passages generated at a time


def make_vocab(rng: np.random.Generator, size: int = 30_000) -> tuple[np.ndarray, np.ndarray]:
    """Random lowercase words (mean about 5 letters) and Zipf-like sampling probabilities."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    letter_p = 1.0 / np.arange(1, 27) ** 0.8
    lengths = np.clip(rng.poisson(4, size) + 1, 1, 14)
    spelled = rng.choice(26, size=(size, 14), p=letter_p / letter_p.sum())  # (size, 14) letter ids
    words = np.array(["".join(letters[row[:n]]) for row, n in zip(spelled, lengths)], dtype=object)
    p = 1.0 / (np.arange(size) + 10.0)
    return words, p / p.sum()


def write_corpus(path: str, n: int, seed: int = 0) -> int:
    """Write ``n`` synthetic passages as jsonl; return the total UTF-8 bytes of their id+title+section+text."""
    rng = np.random.default_rng(seed)
    words, p = make_vocab(rng)
    text_bytes = 0
    with open(path, "w", encoding="utf-8") as handle:
        for first in range(0, n, CHUNK):
            m = min(CHUNK, n - first)
            n_words = rng.integers(80, 121, m)
            picks = rng.choice(len(words), size=(m, 120), p=p)  # (m, 120) word ids
            title_picks = rng.choice(len(words), size=(m, 4), p=p)
            n_title = rng.integers(1, 5, m)
            n_section = rng.integers(0, 4, m) * (rng.random(m) < 0.5)
            lines = []
            for j in range(m):
                text = " ".join(words[picks[j, : n_words[j]]].tolist())
                title = " ".join(w.capitalize() for w in words[title_picks[j, : n_title[j]]].tolist())
                section = " ".join(words[picks[j, -n_section[j] :]].tolist()) if n_section[j] else ""
                passage = {"id": f"wiki-{first + j}", "title": title, "section": section, "text": text.capitalize()}
                text_bytes += sum(len(passage[f].encode()) for f in ("id", "title", "section", "text"))
                lines.append(json.dumps(passage, ensure_ascii=False))
            handle.write("\n".join(lines) + "\n")
    return text_bytes


def save_ours(store_dir: str, directory: str, embeddings: torch.Tensor, shards: int, dtype: str) -> float:
    """Save a flat index of ``shards`` ``dtype`` shards over the store at ``store_dir``; return seconds."""
    from src.distributed import World
    from src.index import DistributedIndex, save_index
    from src.passages import PassageStore

    started = time.perf_counter()
    index = DistributedIndex(PassageStore.open(store_dir), embeddings.shape[1], World(0, 0, 1, torch.device("cpu")))
    index.set_embeddings(embeddings)
    save_index(index, directory, n_shards=shards, dtype=dtype)
    return time.perf_counter() - started


def save_original(corpus: str, directory: str, embeddings: torch.Tensor, shards: int) -> float:
    """Write the original Atlas layout: passages.{i}.pt (pickled list of dicts) + embeddings.{i}.pt (fp16 (d, n_i))."""
    started = time.perf_counter()
    n = len(embeddings)
    os.makedirs(directory)
    with open(corpus, encoding="utf-8") as handle:
        for i in range(shards):
            start, end = i * n // shards, (i + 1) * n // shards
            passages = [json.loads(handle.readline()) for _ in range(end - start)]
            with open(f"{directory}/passages.{i}.pt", "wb") as out:
                pickle.dump(passages, out)
            emb = embeddings[start:end].half().T.contiguous()  # (d, n_i) fp16, as the original saved
            torch.save(emb, f"{directory}/embeddings.{i}.pt")
    return time.perf_counter() - started


def child(kind: str, directory: str, shards: int) -> None:
    """Load one index in this fresh process and print a JSON line of measurements."""
    import gc

    if kind.startswith("ours"):
        from src.distributed import World
        from src.index import load_index

        try:
            from src.index import files  # the shard reader (src.index.io before it was split out)
        except ImportError:
            from src.index import io as files
        world = World(0, 0, 1, torch.device("cpu"))
        if kind == "ours-1-thread" and hasattr(files, "LOAD_THREADS"):
            files.LOAD_THREADS = 1
    gc.collect()
    rss0, _ = rss_bytes()
    started = time.perf_counter()
    if kind.startswith("ours"):
        index = load_index(directory, world)
        blocks = index.embedding_blocks if hasattr(index, "embedding_blocks") else [index.local_embeddings]
        embedding_bytes = sum(block.nelement() * block.element_size() for block in blocks)  # mapped or in memory
        lookup, n_passages = index.store.get, len(index)
    else:  # the original's load_index: every pickle, a dict local id -> passage, torch.cat of fp16 (d, n_i) tensors
        passages, embeddings = [], []
        for i in range(shards):
            with open(f"{directory}/passages.{i}.pt", "rb") as handle:
                passages.extend(pickle.load(handle))
            embeddings.append(torch.load(f"{directory}/embeddings.{i}.pt", map_location="cpu"))
        doc_map = dict(enumerate(passages))
        del passages
        all_embeddings = torch.cat(embeddings, dim=1)  # (d, N) fp16
        del embeddings
        embedding_bytes = all_embeddings.nelement() * all_embeddings.element_size()
        lookup, n_passages = doc_map.__getitem__, len(doc_map)
    seconds = time.perf_counter() - started
    first_search = float("nan")
    if kind.startswith("ours"):  # a memory-mapped index must not hide its cost in the first search
        started = time.perf_counter()
        index.search(torch.randn(1, index.dim), 100)
        first_search = time.perf_counter() - started
    gc.collect()
    rss1, hwm = rss_bytes()
    rows = random.Random(0).sample(range(n_passages), 1000)
    started = time.perf_counter()
    fetched = [lookup(r) for r in rows]
    fetch_us = (time.perf_counter() - started) / len(rows) * 1e6
    assert all("text" in p for p in fetched)
    rss2, _ = rss_bytes()
    report = dict(seconds=seconds, rss_increase=rss1 - rss0, hwm_increase=hwm - rss0, embedding_bytes=embedding_bytes,
                  first_search=first_search)  # fmt: skip
    print(json.dumps({**report, "fetch_us": fetch_us, "rss_after_fetch": rss2 - rss0}))


def warm_page_cache(directory: str) -> None:
    """Read every file under ``directory`` once, so a load never waits for the disk (other jobs may have evicted
    pages since the last load)."""
    buffer = bytearray(8 << 20)
    for path in Path(directory).rglob("*"):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


def run_child(kind: str, directory: str, shards: int) -> dict:
    warm_page_cache(directory)
    script = os.path.abspath(__file__)
    out = subprocess.run(
        [sys.executable, script, "--child", kind, directory, "--shards", str(shards)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_all(tmp: str, args: argparse.Namespace) -> int:
    """Write the corpus, our store and indices and the original layout into ``tmp`` (unless a previous ``--keep`` run
    with the same sizes did); return the corpus's text bytes."""
    done = f"{tmp}/done.json"
    sizes = {"n": args.n, "dim": args.dim, "shards": args.shards}
    if os.path.exists(done):
        with open(done) as handle:
            meta = json.load(handle)
        if meta["sizes"] != sizes:
            raise SystemExit(f"{tmp} holds files for {meta['sizes']}, not {sizes}: delete it or pass another --keep")
        print(f"reusing the files in {tmp}")
        return meta["text_bytes"]
    if os.listdir(tmp):
        raise SystemExit(f"{tmp} is not empty and holds no finished benchmark files: delete it first")
    started = time.perf_counter()
    corpus = f"{tmp}/corpus.jsonl"
    text_bytes = write_corpus(corpus, args.n)
    print(
        f"wrote {args.n} passages ({os.path.getsize(corpus) / GIB:.2f} GiB jsonl, {text_bytes / args.n:.0f} text "
        f"bytes per passage) in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    from src.passages import PassageStore

    started = time.perf_counter()
    PassageStore.build([corpus], f"{tmp}/store")
    print(f"built our passage store in {time.perf_counter() - started:.0f} s")
    embeddings = seeded_rows(0, args.n, args.dim)  # (N, d) fp32
    for dtype in ("float32", "float16"):
        seconds = save_ours(f"{tmp}/store", f"{tmp}/ours-{dtype}", embeddings, args.shards, dtype)
        print(f"saved our {dtype} index in {seconds:.0f} s")
    seconds = save_original(corpus, f"{tmp}/original", embeddings, args.shards)
    print(f"saved the original format in {seconds:.0f} s", flush=True)
    with open(done, "w") as handle:
        json.dump({"sizes": sizes, "text_bytes": text_bytes}, handle)
    return text_bytes


def dir_bytes(directory: str) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--tmp", default=None, help="parent of the temporary directory (default: the system's)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process loads of each (best time is kept)")
    parser.add_argument("--keep", default=None, help="write the files to this directory once and reuse them")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.shards)
        return

    print(machine_info())
    if args.keep:
        tmp = os.path.abspath(args.keep)
        os.makedirs(tmp, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_passage_ram_", dir=args.tmp)
    try:
        text_bytes = write_all(tmp, args)
        variants = {  # name -> (child kind, directory)
            "ours, fp32 shards (the default save)": ("ours", f"{tmp}/ours-float32"),
            "ours, fp32 shards, 1 load thread": ("ours-1-thread", f"{tmp}/ours-float32"),
            "ours, fp16 shards": ("ours", f"{tmp}/ours-float16"),
            "original (pickles + fp16 .pt)": ("original", f"{tmp}/original"),
        }
        results: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, so every variant sees the same background load
            for name, (kind, directory) in variants.items():
                run = run_child(kind, directory, args.shards)
                print(name, json.dumps(run), flush=True)
                if name not in results or run["seconds"] < results[name]["seconds"]:
                    results[name] = run
        disk = {name: dir_bytes(directory) for name, (_, directory) in variants.items()}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    n = args.n
    text = text_bytes / n
    rows = []
    for name, r in results.items():
        emb = r["embedding_bytes"] / n
        rows.append(
            [
                name,
                f"{r['seconds']:.2f}",
                "-" if r.get("first_search", float("nan")) != r.get("first_search") else f"{r['first_search']:.2f}",
                f"{r['rss_increase'] / n:.0f}",
                f"{r['hwm_increase'] / n:.0f}",
                f"{emb:.0f} ({'fp32' if emb >= 4 * args.dim else 'fp16'})",
                f"{r['rss_increase'] / n / (emb + text):.2f}",
                f"{r['fetch_us']:.1f}",
                f"{disk[name] / n:.0f}",
            ]
        )
    print_table(
        [
            "format",
            "load s",
            "first search s (B=1, k=100)",
            "RSS B/passage",
            "peak RSS B/passage",
            "embedding B/passage in RAM",
            "RSS / (embedding + text)",
            "fetch µs/passage",
            "disk B/passage",
        ],
        rows,
        title=f"{n} passages, d={args.dim}, {args.shards} shards, text {text:.0f} B/passage (fresh processes)",
    )
    orig = results["original (pickles + fp16 .pt)"]
    for name, ours in results.items():
        if name.startswith("ours"):
            print(
                f"{name}: load-time speed-up {orig['seconds'] / ours['seconds']:.2f}x, RAM / original's "
                f"{ours['rss_increase'] / orig['rss_increase']:.2f}, RAM beyond the embeddings "
                f"{(ours['rss_increase'] - ours['embedding_bytes']) / n:.0f} B/passage"
            )
    print(f"original: RAM beyond the embeddings {(orig['rss_increase'] - orig['embedding_bytes']) / n:.0f} B/passage")
    print(f"at the end: {load_note()}")


if __name__ == "__main__":
    main()
