"""Atlas as plain Hugging Face directories: write an export, and read one back as a checkpoint.

An export directory holds::

    atlas_export.json      what the directory is (written last: its presence means the export is complete)
    reader/                T5ForConditionalGeneration + the reader's tokenizer (save_pretrained)
    retriever/             the (query) Contriever as a BertModel-family directory + the retriever's tokenizer
    passage_retriever/     only for a query-side trained retriever: the frozen passage encoder
    README.md              the model card

Plain transformers loads each part with `from_pretrained`; `--model_path DIR` loads the whole export back here, with
the reader and retriever architectures taken from it (no `--reader_model_type` needed). A retriever trained with the
original's uncentered LayerNorm is saved with the same weights (the parameter names are nn.LayerNorm's) and
`"atlas_uncentered_layernorm": true` in its config.json; plain `BertModel` computes the standard LayerNorm with them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import T5ForConditionalGeneration

from src.errors import UserError
from src.retriever import load_encoder

EXPORT_FILE = "atlas_export.json"
FORMAT, VERSION = "atlas-hf-export", 1
READER_DIR, RETRIEVER_DIR, PASSAGE_RETRIEVER_DIR = "reader", "retriever", "passage_retriever"
LAYERNORM_FLAG = "atlas_uncentered_layernorm"  # the retriever config.json attribute naming the LayerNorm variant


def is_export(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a directory written by `write_export`."""
    return path is not None and os.path.isfile(os.path.join(path, EXPORT_FILE))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    manifest_path = os.path.join(path, EXPORT_FILE)
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"{manifest_path}: unreadable ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{manifest_path} is not a version-{VERSION} {FORMAT} manifest")
    return manifest


def part_paths(path: str | os.PathLike) -> dict[str, str]:
    """The part directories an export holds: "reader", "retriever", "passage_retriever" (absent parts left out)."""
    manifest = read_manifest(path)
    return {name: os.path.join(path, manifest[name]) for name in ("reader", "retriever", "passage_retriever")
            if manifest.get(name)}  # fmt: skip


def write_export(
    out_dir: str | os.PathLike,
    reader: torch.nn.Module | None,
    reader_tokenizer: Any,
    query_encoder: torch.nn.Module | None,
    passage_encoder: torch.nn.Module | None,
    retriever_tokenizer: Any,
    uncentered_layernorm: bool,
    card: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the export into a temporary sibling directory and rename it to `out_dir` (never half written).

    `passage_encoder` is given only for an untied (query-side trained) retriever.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserError(f"--output_directory {out_dir} already exists: choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        if reader is not None:
            if reader.lm_head.weight is not reader.shared.weight:  # say so: plain loaders then keep them apart
                reader.config.tie_word_embeddings = False
            reader.save_pretrained(tmp / READER_DIR)
            reader_tokenizer.save_pretrained(tmp / READER_DIR)
            manifest["reader"] = READER_DIR
        for name, encoder in ((RETRIEVER_DIR, query_encoder), (PASSAGE_RETRIEVER_DIR, passage_encoder)):
            if encoder is None:
                continue
            setattr(encoder.config, LAYERNORM_FLAG, uncentered_layernorm)
            try:
                encoder.save_pretrained(tmp / name)
            finally:
                delattr(encoder.config, LAYERNORM_FLAG)
            retriever_tokenizer.save_pretrained(tmp / name)
            manifest[name] = name
        manifest["retriever_layernorm"] = "uncentered" if uncentered_layernorm else "standard"
        manifest.update(extra or {})
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_export(path: str | os.PathLike) -> dict:
    """An export as a checkpoint dict {step, model, opt}: state-dict keys as Atlas's (`reader.*`,
    `retriever.contriever.*` or `retriever.{query,passage}_contriever.*`), `opt` recording the LayerNorm variant."""
    parts = part_paths(path)
    manifest = read_manifest(path)
    state: dict[str, torch.Tensor] = {}
    try:
        if "reader" in parts:
            reader = T5ForConditionalGeneration.from_pretrained(parts["reader"])
            state.update({f"reader.{k}": v for k, v in reader.state_dict().items()})
        untied = "passage_retriever" in parts
        for name, prefix in (("retriever", "query_contriever" if untied else "contriever"),
                             ("passage_retriever", "passage_contriever")):  # fmt: skip
            if name in parts:
                encoder = load_encoder(parts[name])  # plain transformers: the LayerNorm variant does not matter here
                state.update({f"retriever.{prefix}.{k}": v for k, v in encoder.state_dict().items()})
    except OSError as err:
        raise UserError(f"--model_path {path}: cannot load the export ({err})") from None
    uncentered = manifest.get("retriever_layernorm") == "uncentered"
    return {"step": 0, "model": state, "opt": {"uncentered_layernorm": "on" if uncentered else "off"}}
