"""Export an Atlas checkpoint as plain Hugging Face directories with a model card.

    python preprocessing/export_hf.py --model_path CKPT --output_directory DIR
        [--reader_model_type NAME_OR_DIR] [--retriever_model_path NAME_OR_DIR] [--uncentered_layernorm auto|on|off]
        [--sample_passages PASSAGES.jsonl]

CKPT is a released Atlas `model.pth.tar`, one of ours (a file or a step-N directory). The architectures come from the
checkpoint's options (a released checkpoint names hub models, e.g. google/t5-base-lm-adapt and facebook/contriever,
which must then be cached or given as local directories); the flags override them. DIR gets `reader/` (a
T5ForConditionalGeneration), `retriever/` (and `passage_retriever/` for a query-side trained retriever), tokenizers,
`atlas_export.json` and `README.md` (see src/hf_export.py). `train.py` / `evaluate.py --model_path DIR` load it back.

Plain transformers' BERT computes the standard LayerNorm. For a retriever trained with the original's uncentered one
(every released Atlas retriever), the card states how far plain BERT's embeddings are from the exact formula on a
sample: `--sample_passages` (the first 256 passages of a jsonl file), else a few built-in sentences.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402  (the repository root must be on sys.path before src is imported)

from src import retriever as contriever  # noqa: E402
from src.checkpoint import read_checkpoint  # noqa: E402
from src.config import AtlasConfig, ModelConfig  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.hf_export import LAYERNORM_FLAG, write_export  # noqa: E402
from src.model_factory import build_model  # noqa: E402
from src.passages import format_passage  # noqa: E402

SAMPLE_SENTENCES = (
    "Paris is the capital and most populous city of France.",
    "The mitochondrion is an organelle found in the cells of most eukaryotes.",
    "The Treaty of Westphalia ended the Thirty Years' War in 1648.",
    "Mount Kilimanjaro is a dormant volcano in Tanzania.",
    "Johann Sebastian Bach was a German composer of the Baroque period.",
    "The Pacific Ocean is the largest and deepest of Earth's oceanic divisions.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Great Wall of China was built over many centuries by several dynasties.",
    "Marie Curie was the first woman to win a Nobel Prize.",
    "The Amazon River flows through Brazil, Peru and Colombia.",
    "A prime number has exactly two distinct positive divisors.",
    "The Rosetta Stone helped scholars decipher Egyptian hieroglyphs.",
    "Jupiter is the fifth planet from the Sun and the largest in the Solar System.",
    "The printing press was introduced in Europe by Johannes Gutenberg.",
    "Insulin is a hormone produced by the beta cells of the pancreas.",
    "The Magna Carta was sealed by King John of England in 1215.",
)
N_SAMPLE_PASSAGES = 256


def checkpoint_options(checkpoint: dict) -> dict:
    """The checkpoint's options as a dict (a released checkpoint keeps the original's argparse Namespace)."""
    opt = checkpoint.get("opt")
    return vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})


def sample_texts(path: str | None) -> list[str]:
    if not path:
        return list(SAMPLE_SENTENCES)
    texts = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if len(texts) == N_SAMPLE_PASSAGES:
                    break
                if line.strip():
                    try:
                        texts.append(format_passage("{title} {text}", json.loads(line)))
                    except (ValueError, KeyError) as err:
                        raise UserError(f"--sample_passages {path}:{number}: not a passage ({err})") from None
    except OSError as err:
        raise UserError(f"--sample_passages {path}: {err.strerror or err}") from None
    return texts


@torch.no_grad()
def layernorm_difference(encoder: torch.nn.Module, plain: torch.nn.Module, tokenizer, texts: list[str]) -> dict:
    """How plain BERT (standard LayerNorm) differs from the exact uncentered formula on `texts`: the cosine of the two
    embeddings of each text, and whether each text's nearest other text (inner product) stays the same."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    exact = contriever.encode(encoder.eval(), batch["input_ids"], batch["attention_mask"])  # (n, d)
    approx = contriever.encode(plain.eval(), batch["input_ids"], batch["attention_mask"])  # (n, d)
    cosine = torch.nn.functional.cosine_similarity(exact, approx, dim=-1)  # (n,)

    def nearest(emb: torch.Tensor) -> torch.Tensor:
        scores = emb @ emb.T
        scores.fill_diagonal_(float("-inf"))
        return scores.argmax(dim=-1)

    same = (nearest(exact) == nearest(approx)).float().mean()
    return {"n": len(texts), "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "nearest_neighbour_agreement": float(same)}  # fmt: skip


def model_card(source: str, step: int, opt: dict, parts: list[str], uncentered: bool, difference: dict | None) -> str:
    trained = ", ".join(f"--{k} {opt[k]}" for k in ("task", "n_context", "gold_score_mode", "total_steps") if k in opt)
    lines = [
        "# Atlas (exported)",
        "",
        "A retrieval-augmented language model in the Atlas architecture (Izacard et al., 2022): a Fusion-in-Decoder",
        "T5 reader and a Contriever dense retriever (BERT encoder, masked mean pooling, inner-product search).",
        f"Exported from `{source}` (step {step}) by `preprocessing/export_hf.py`. Parts: {', '.join(parts)}.",
        "",
        "## How it was trained",
        "",
        f"Options recorded in the checkpoint: {trained or 'none recorded'}.",
        "",
        "## Load it with plain transformers",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoTokenizer, T5ForConditionalGeneration",
        'reader = T5ForConditionalGeneration.from_pretrained("DIR/reader")',
        'retriever = AutoModel.from_pretrained("DIR/retriever", add_pooling_layer=False)',
        'tokenizer = AutoTokenizer.from_pretrained("DIR/retriever")',
        'batch = tokenizer(["a query"], return_tensors="pt")',
        "hidden = retriever(**batch).last_hidden_state",
        'mask = batch["attention_mask"].unsqueeze(-1)',
        "embedding = (hidden * mask).sum(1) / mask.sum(1)  # Contriever: masked mean, unnormalised",
        "```",
        "",
        "The reader reads each (query, passage) pair on its own through the encoder; the decoder attends over all",
        "encoded passages concatenated (Fusion-in-Decoder). With one passage it is plain T5.",
        "",
        "## Use it with this project",
        "",
        "`python train.py --model_path DIR ...` or `python evaluate.py --model_path DIR ...`: the reader and retriever",
        "architectures come from DIR (no `--reader_model_type` needed).",
        "",
        "## Retriever LayerNorm",
        "",
    ]
    if not uncentered:
        lines.append("The retriever uses the standard LayerNorm: plain `BertModel` computes it exactly.")
    else:
        lines += [
            "This retriever was trained with the original Atlas's *uncentered* LayerNorm (divides by",
            "sqrt(E[x^2] + eps) instead of sqrt(Var[x] + eps)); its config.json says so with",
            f"`{LAYERNORM_FLAG}: true`. Plain `BertModel` ignores that flag and computes the standard LayerNorm with",
            "the same weights, so its embeddings differ from the ones this retriever (and any index built with it)",
            "was trained with. This project applies the exact formula when it loads DIR",
            "(`--uncentered_layernorm auto`).",
        ]
        if difference:
            lines += [
                "",
                f"Measured on {difference['n']} sample texts: cosine between plain-BERT and exact embeddings mean "
                f"{difference['mean_cosine']:.4f}, min {difference['min_cosine']:.4f}; each text's nearest other "
                f"text is the same for {100 * difference['nearest_neighbour_agreement']:.1f}% of them.",
            ]
    return "\n".join(lines) + "\n"


def export(args: argparse.Namespace) -> Path:
    if os.path.exists(args.output_directory):  # before minutes of loading an 11B checkpoint
        raise UserError(f"--output_directory {args.output_directory} already exists: choose a new directory")
    checkpoint = read_checkpoint(args.model_path)
    opt = checkpoint_options(checkpoint)
    state = checkpoint["model"]
    has_reader = any(k.startswith("reader.") for k in state)
    has_retriever = any(k.startswith("retriever.") for k in state)
    reader_type = args.reader_model_type or opt.get("reader_model_type")
    retriever_path = args.retriever_model_path or opt.get("retriever_model_path") or "facebook/contriever"
    if has_reader and not reader_type:
        raise UserError(f"--model_path {args.model_path} records no reader architecture: give --reader_model_type")
    cfg = ModelConfig(
        reader_model_type=reader_type,
        retriever_model_path=retriever_path,
        model_path=args.model_path,
        dropout=float(opt.get("dropout", 0.1)),
        uncentered_layernorm=args.uncentered_layernorm,
        with_reader=has_reader,
        with_retriever=has_retriever,
    )
    model, tokenizers = build_model(cfg, AtlasConfig(), torch.device("cpu"), checkpoint)
    retriever = model.retriever
    uncentered = bool(retriever is not None and retriever.uncentered_layernorm)
    difference = None
    if uncentered:
        plain = contriever.load_encoder(retriever_path)  # the same weights under the standard LayerNorm
        plain.load_state_dict(retriever.query_encoder.state_dict())
        difference = layernorm_difference(retriever.query_encoder, plain, tokenizers.retriever,
                                          sample_texts(args.sample_passages))  # fmt: skip
    parts = (["reader"] if has_reader else []) + (["retriever"] if has_retriever else [])
    if retriever is not None and retriever.query_side:
        parts.append("passage_retriever")
    card = model_card(str(args.model_path), int(checkpoint.get("step", 0)), opt, parts, uncentered, difference)
    return write_export(
        args.output_directory,
        model.reader,
        tokenizers.reader,
        retriever.query_encoder if retriever is not None else None,
        retriever.passage_encoder if retriever is not None and retriever.query_side else None,
        tokenizers.retriever,
        uncentered,
        card,
        extra={
            "source": str(args.model_path),
            "step": int(checkpoint.get("step", 0)),
            **({"layernorm_difference": difference} if difference else {}),
        },  # fmt: skip
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export an Atlas checkpoint as Hugging Face directories.")
    parser.add_argument("--model_path", required=True, help="model.pth.tar (released or ours) or a step-N directory")
    parser.add_argument("--output_directory", required=True, help="new directory to write the export to")
    parser.add_argument("--reader_model_type", help="reader architecture (default: the checkpoint's)")
    parser.add_argument("--retriever_model_path", help="retriever architecture (default: the checkpoint's)")
    parser.add_argument("--uncentered_layernorm", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                        help="the retriever's LayerNorm (auto: what the checkpoint was trained with)")  # fmt: skip
    parser.add_argument("--sample_passages", help="jsonl passages to measure the LayerNorm difference on")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    args = build_parser().parse_args(argv)
    try:
        out = export(args)
    except (UserError, OSError) as err:  # OSError: a hub name that is not cached, an unwritable directory
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.model_path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
