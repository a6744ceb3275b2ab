"""preprocessing/export_hf.py: an Atlas checkpoint -> plain Hugging Face directories, and `--model_path DIR` back."""

import json

import torch
from transformers import AutoModel, T5ForConditionalGeneration

from src.batching import collate
from src.checkpoint import read_checkpoint, save_checkpoint
from src.model_factory import build_model
from src.options import parse_settings
from src.retrieval import embed_queries
from src.retriever import encode
from src.tasks import Example
from tests.conftest import demo_args, run_script
from tests.test_released_checkpoint import QUERIES, write_released_checkpoint

CPU = torch.device("cpu")
EXAMPLE = Example("question: who is Ab? answer: <extra_id_0>", "<extra_id_0> Cd", ["Cd"])
PASSAGES = [{"id": "1", "title": "Ab", "text": "Ab lives in Cd."}, {"id": "2", "title": "Ef", "text": "Ef works."}]


def settings(demo, tmp_path, *extra, reader=True):
    base = demo_args(demo, tmp_path)
    if not reader:  # an export carries its reader: no --reader_model_type
        i = base.index("--reader_model_type")
        base = base[:i] + base[i + 2 :]
    return parse_settings([*base, "--name", "export", "--n_context", "2", *extra], "train")


def outputs(model, tokenizers) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate([EXAMPLE], [PASSAGES], tokenizers, model.config)
    return model.eval_loss(batch), embed_queries(model, tokenizers, QUERIES)


def export(path, out) -> str:
    result = run_script(["preprocessing/export_hf.py", "--model_path", str(path), "--output_directory", str(out)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_export_round_trip_tied(demo, tmp_path):
    """Our checkpoint of a tied retriever with the standard LayerNorm: plain transformers loads each part with equal
    outputs, and --model_path DIR (no --reader_model_type) rebuilds the same model. (The query-side, uncentered case
    runs in tests/test_release_mirror.py.)"""
    ours = settings(demo, tmp_path, "--train_retriever")
    model, tokenizers = build_model(ours.model, ours.atlas, CPU)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = save_checkpoint(ours.run_dir, 7, model, {}, {}, False, {**ours.options, "uncentered_layernorm": "off"})
    out = tmp_path / "hf"
    export(path, out)
    manifest = json.loads((out / "atlas_export.json").read_text())
    assert (manifest["reader"], manifest["retriever"], manifest.get("passage_retriever")) == ("reader", "retriever",
                                                                                                None)  # fmt: skip
    assert manifest["retriever_layernorm"] == "standard" and manifest["step"] == 7
    assert "standard LayerNorm" in (out / "README.md").read_text()

    # plain transformers
    plain_reader = T5ForConditionalGeneration.from_pretrained(out / "reader").eval()
    ids = tokenizers.reader(["question: who is Ab? title: Ab context: Ab lives in Cd."], return_tensors="pt")
    labels = tokenizers.reader(["<extra_id_0> Cd"], return_tensors="pt").input_ids
    with torch.no_grad():
        model.reader.eval()
        torch.testing.assert_close(plain_reader(**ids, labels=labels).logits, model.reader(**ids, labels=labels).logits)
    batch = tokenizers.retriever(QUERIES, padding=True, return_tensors="pt")
    plain = AutoModel.from_pretrained(out / "retriever", add_pooling_layer=False).eval()
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        torch.testing.assert_close(encode(plain, ids, mask), encode(model.retriever.contriever.eval(), ids, mask))

    # back in Atlas through --model_path DIR
    back_settings = settings(demo, tmp_path, "--model_path", str(out), "--train_retriever", reader=False)
    assert back_settings.model.reader_model_type == str(out / "reader")
    back, back_tokenizers = build_model(back_settings.model, back_settings.atlas, CPU, read_checkpoint(out))
    assert not back.retriever.query_side and not back.retriever.uncentered_layernorm
    for got, want in zip(outputs(back, back_tokenizers), outputs(model, tokenizers)):
        torch.testing.assert_close(got, want)


def test_export_refuses_an_existing_directory(demo, tmp_path):
    path = tmp_path / "model.pth.tar"
    write_released_checkpoint(demo, path)
    (tmp_path / "taken").mkdir()
    result = run_script(["preprocessing/export_hf.py", "--model_path", str(path), "--output_directory",
                         str(tmp_path / "taken")])  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --output_directory {tmp_path / 'taken'} already exists: choose a new directory"
    ]
