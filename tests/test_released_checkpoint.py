"""A checkpoint in the original Atlas's exact format (ATLAS_REFERENCE 6.1) loads through --model_path and computes what
the original computed: the retriever against an independent implementation of its encoder formula (uncentered
LayerNorm, fp32, masked mean), the reader against plain T5 given the same weights."""

import argparse
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, T5ForConditionalGeneration

from src.batching import collate
from src.checkpoint import read_checkpoint
from src.distributed import World
from src.errors import UserError
from src.index.files import read_manifest
from src.index.refresh import build_index
from src.model_factory import build_model
from src.model_factory import uncentered_layernorm as resolve_layernorm
from src.options import parse_settings
from src.retrieval import embed_queries
from src.tasks import Example
from tests.conftest import demo_args

CPU = torch.device("cpu")


def write_released_checkpoint(demo, path, query_side: bool = False) -> dict:
    """model.pth.tar as the original wrote it: fp16 weights named `reader.*` / `retriever.contriever.*` (with the
    persistent position_ids of transformers 4.18), no optimizer, and `opt` an argparse Namespace."""
    torch.manual_seed(3)
    reader = T5ForConditionalGeneration.from_pretrained(demo / "models/reader")
    bert = AutoModel.from_pretrained(demo / "models/retriever", add_pooling_layer=False)
    state = {}
    with torch.no_grad():
        for module, prefix in ((reader, "reader."), (bert, "retriever.contriever.")):
            for key, value in module.state_dict().items():  # moved off their init, so a skipped key would show
                state[prefix + key] = (value + 0.05 * torch.randn_like(value)).half() if value.is_floating_point() \
                    else value  # fmt: skip
    state["retriever.contriever.embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    opt = argparse.Namespace(
        reader_model_type=str(demo / "models/reader"),
        retriever_model_path=str(demo / "models/retriever"),
        task="qa",
        n_context=1,
        text_maxlength=64,
        query_side_retriever_training=query_side,
        gold_score_mode="ppmean",
    )
    content = {"step": 4000, "model": state, "optimizer": None, "retr_optimizer": None,
               "scheduler": {"last_epoch": 4000}, "retr_scheduler": None, "opt": opt}  # fmt: skip
    torch.save(content, path)
    return state


def uncentered_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The original's BertLayerNorm: centred numerator, uncentred second moment in the denominator, in fp32."""
    return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


def original_contriever(state: dict, config, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original encoder written out from the weights alone (eval mode): BERT with the uncentered LayerNorm and the
    masked mean of the last hidden states. (n, L) -> (n, d)."""
    w = {k.removeprefix("retriever.contriever."): v.float() for k, v in state.items() if "contriever" in k}
    eps, heads = config.layer_norm_eps, config.num_attention_heads

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def norm(x, name):
        return uncentered_layernorm(x, w[f"{name}.weight"], w[f"{name}.bias"], eps)

    n, length = input_ids.shape
    x = w["embeddings.word_embeddings.weight"][input_ids] + w["embeddings.position_embeddings.weight"][:length]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")  # (n, L, d)
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # padded keys get no attention
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(x, f"{p}.attention.self.{m}").view(n, length, heads, -1).transpose(1, 2)
                   for m in ("query", "key", "value"))  # fmt: skip
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(n, length, -1)
        x = norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        hidden = F.gelu(linear(x, f"{p}.intermediate.dense"))
        x = norm(linear(hidden, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    m = mask[..., None].float()
    return (x * m).sum(1) / m.sum(1)


def settings_for(demo, tmp_path, path, *extra):
    flags = ["--name", "released", "--model_path", str(path), "--n_context", "1", *extra]
    return parse_settings([*demo_args(demo, tmp_path), *flags], "train")


QUERIES = ["who is Ab?", "where does a long-named person of the world live these days?"]


@pytest.mark.parametrize("query_side", [False, True])
def test_released_checkpoint_computes_what_the_original_computed(demo, tmp_path, caplog, query_side):
    path = tmp_path / "model.pth.tar"
    state = write_released_checkpoint(demo, path)
    extra = ["--train_retriever", "--query_side_retriever_training"] if query_side else []
    settings = settings_for(demo, tmp_path, path, *extra)
    assert settings.model.uncentered_layernorm == "auto"
    with caplog.at_level(logging.INFO, logger="src.model_factory"):
        model, tokenizers = build_model(settings.model, settings.atlas, CPU, read_checkpoint(path))  # weights_only
    assert "released Atlas checkpoint" in caplog.text and model.retriever.uncentered_layernorm
    assert model.retriever.query_side == query_side

    config = model.retriever.query_encoder.config
    batch = tokenizers.retriever(QUERIES, padding=True, return_tensors="pt")
    expected = original_contriever(state, config, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(embed_queries(model, tokenizers, QUERIES), expected, atol=2e-5, rtol=1e-4)
    # the standard LayerNorm would not match: the test can tell the two formulas apart
    standard, _ = build_model(settings_for(demo, tmp_path, path, "--uncentered_layernorm", "off").model,
                              settings.atlas, CPU, read_checkpoint(path))  # fmt: skip
    assert not torch.allclose(embed_queries(standard, tokenizers, QUERIES), expected, atol=1e-3)

    # reader: FiD over one passage == plain T5 given the checkpoint's reader weights
    plain = T5ForConditionalGeneration.from_pretrained(demo / "models/reader").eval()
    plain.load_state_dict({k.removeprefix("reader."): v.float() for k, v in state.items() if k.startswith("reader.")})
    example = Example("question: who is Ab? answer: <extra_id_0>", "<extra_id_0> Cd", ["Cd"])
    passage = {"id": "1", "title": "Ab", "text": "Ab lives in Cd."}
    ours = model.eval_loss(collate([example], [[passage]], tokenizers, model.config))
    tok = AutoTokenizer.from_pretrained(demo / "models/reader")
    inputs = tok([f"{example.query} title: Ab context: Ab lives in Cd."], return_tensors="pt")
    labels = tok(["<extra_id_0> Cd</s>"], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = plain(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_variants_are_recorded_and_an_index_of_the_other_variant_is_refused(demo, tmp_path):
    """Our checkpoints record the resolved variant; a saved index records the one it was embedded with."""
    released = tmp_path / "model.pth.tar"
    write_released_checkpoint(demo, released)
    settings = settings_for(demo, tmp_path, released, "--save_index_path", str(tmp_path / "index"))
    model, tokenizers = build_model(settings.model, settings.atlas, CPU, read_checkpoint(released))
    world = World(rank=0, world_size=1, local_rank=0, device=CPU)
    build_index(settings.index, model, tokenizers, world)
    assert read_manifest(str(tmp_path / "index"))["retriever_layernorm"] == "uncentered"

    standard = settings_for(demo, tmp_path, "none", "--load_index_path", str(tmp_path / "index"))
    assert resolve_layernorm(standard.model, None) is False
    fresh, _ = build_model(standard.model, standard.atlas, CPU)
    with pytest.raises(UserError, match="uncentered LayerNorm.*--uncentered_layernorm on"):
        build_index(standard.index, fresh, tokenizers, world)
    # our own checkpoint dicts: what they record wins under auto
    assert resolve_layernorm(standard.model, {"model": {}, "opt": {"uncentered_layernorm": "on"}}) is True
    assert resolve_layernorm(standard.model, {"model": {}, "opt": {"uncentered_layernorm": "off"}}) is False
    assert resolve_layernorm(standard.model, {"model": {}, "opt": {}}) is False  # saved before the flag was recorded
