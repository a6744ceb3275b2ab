"""When does each retriever loss start to teach? Dev recall@5 every few steps of query-side retriever training.

    python benchmarks/retriever_dynamics.py [--out DIR] [--losses ppmean emdr emdr-sequence ...] [--steps 500]

Needs the world, data and teacher of `benchmarks/retriever_learning.py` (run it first, same --out). A lean loop
around the library's own losses (`src.gold_scores.retriever_loss`): the teacher reader is frozen, the passage
encoder is frozen, so the corpus is embedded once and every step searches it exactly; only the query encoder trains
(AdamW, linear warm-up and decay, no gradient clipping), on the same questions in the same order for every loss.
What train.py adds (reader training, clipping, checkpoints, the distributed index) is left out so that a run of
500 steps takes ~10 minutes and prints where recall takes off, which a before/after figure cannot show.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_common import machine_info
from retriever_learning import read_jsonl as rows
from transformers import T5Config

from src import reader as fid
from src import retriever as contriever
from src.batching import Tokenizers, reader_tokens, target_tokens
from src.config import AtlasConfig
from src.gold_scores import retriever_loss
from src.passages import format_passage
from src.tasks import Example
from src.tasks.qa import Task as QATask
from src.training import lr_lambda

LOSSES = {  # name: (gold score mode, tau_gold, emdr mixture)
    "ppmean": ("ppmean", 0.1, "token"),
    "loop": ("loop", 0.1, "token"),
    "evalnormsum": ("evalnormsum", 0.001, "token"),
    "emdr": ("emdr", 1.0, "token"),
    "emdr-sequence": ("emdr", 1.0, "sequence"),
}
QUERY = QATask().prompt_format  # the flags' defaults, as retriever_learning.py runs train.py
RETRIEVER = AtlasConfig.retriever_format


class Setup:
    """The teacher, the initial retriever and the corpus embedded once by the frozen passage encoder."""

    def __init__(self, out: Path, teacher: Path | None = None) -> None:
        models = out / "world/models"
        self.reader_tok = fid.load_reader_tokenizer(str(models / "reader"))
        self.reader = fid.reader_from_config(T5Config.from_pretrained(models / "reader", dropout_rate=0.0))
        teacher = teacher or out / "runs/teacher/checkpoint/latest"
        state = torch.load(teacher / "model.pth.tar", weights_only=True)["model"]
        self.reader.load_state_dict({k[len("reader.") :]: v for k, v in state.items() if k.startswith("reader.")})
        self.reader.eval()
        self.retriever_path = str(models / "retriever")
        self.retriever_tok = contriever.load_tokenizer(self.retriever_path)
        self.corpus = rows(out / "data/corpus.jsonl")
        self.position = {p["id"]: i for i, p in enumerate(self.corpus)}
        self.train, self.dev = rows(out / "data/train.jsonl"), rows(out / "data/dev.jsonl")
        self.passage_emb = self.embed(contriever.load_encoder(self.retriever_path),
                                      [format_passage(RETRIEVER, p) for p in self.corpus])  # fmt: skip

    def reader_inputs(self, batch: list[dict], passages: list[list[dict]]) -> tuple[torch.Tensor, ...]:
        """The teacher's (ids, mask, labels) for questions and their passages, formatted as train.py does."""
        tokenizers, cfg = Tokenizers(self.reader_tok, None), AtlasConfig(text_maxlength=64)
        examples = [Example(QUERY.format(question=e["question"]), f"<extra_id_0> {e['answers'][0]}", []) for e in batch]
        ids, mask = reader_tokens(tokenizers, examples, passages, len(passages[0]), cfg)
        return ids, mask, target_tokens(tokenizers, [ex.target for ex in examples], 16)

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.retriever_tok(texts, truncation=True, padding="longest", return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def embed(self, encoder, texts: list[str], batch: int = 256) -> torch.Tensor:
        encoder.eval()
        return torch.cat([contriever.encode(encoder, *self.tokens(texts[i : i + batch]))
                          for i in range(0, len(texts), batch)])  # fmt: skip

    def recall_at_5(self, encoder) -> float:
        queries = self.embed(encoder, [QUERY.format(question=e["question"]) for e in self.dev])
        top = (queries @ self.passage_emb.T).topk(5, dim=1).indices.tolist()
        hits = [self.position[e["gold_ids"][0]] in ids for e, ids in zip(self.dev, top)]
        return 100.0 * sum(hits) / len(hits)


def run(setup: Setup, name: str, opts: argparse.Namespace) -> None:
    mode, tau_gold, mixture = LOSSES[name]
    if mode == "evalnormsum":  # attention probabilities: as the model factory builds the reader for this mode
        setup.reader.set_attn_implementation("eager")
    torch.manual_seed(0)
    encoder = contriever.load_encoder(setup.retriever_path)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=opts.lr_retriever, weight_decay=0.1, eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("linear", 20, opts.steps))
    dim = setup.passage_emb.shape[1]
    print(f"{name}: step 0 recall@5 {setup.recall_at_5(encoder):.1f}", flush=True)
    start = time.perf_counter()
    for step in range(1, opts.steps + 1):
        batch = [setup.train[((step - 1) * opts.batch_size + i) % len(setup.train)] for i in range(opts.batch_size)]
        queries = [QUERY.format(question=e["question"]) for e in batch]
        with torch.no_grad():  # search in eval mode, as Atlas.retrieve
            top = (setup.embed(encoder, queries) @ setup.passage_emb.T).topk(opts.k, dim=1).indices  # (B, K)
        encoder.train()
        scores = torch.einsum("bd,bkd->bk", contriever.encode(encoder, *setup.tokens(queries)), setup.passage_emb[top])
        inputs = setup.reader_inputs(batch, [[setup.corpus[j] for j in ids] for ids in top.tolist()])
        loss, _ = retriever_loss(mode, setup.reader, inputs, scores, dim, opts.temperature_score, tau_gold, "mean",
                                 mixture)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % opts.every == 0:
            elapsed = time.perf_counter() - start
            print(f"{name}: step {step} recall@5 {setup.recall_at_5(encoder):.1f} ({elapsed:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/atlas_bench/retriever_learning"))
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=["ppmean", "emdr", "emdr-sequence"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=25, help="evaluate dev recall@5 every N steps")
    parser.add_argument("--k", type=int, default=50, help="passages per question (--retriever_n_context)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr_retriever", type=float, default=3e-4)
    parser.add_argument("--temperature_score", type=float, default=0.1)
    opts = parser.parse_args()
    if not (opts.out / "runs/teacher/checkpoint/latest").exists():
        raise SystemExit(f"no teacher in {opts.out}: run benchmarks/retriever_learning.py --out {opts.out} first")
    print(machine_info())
    setup = Setup(opts.out)
    for name in opts.losses:
        run(setup, name, opts)


if __name__ == "__main__":
    main()
