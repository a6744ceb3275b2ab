"""Checkpoints: save -> load gives the same model; resume restores optimizers; tied -> untied conversion."""

import logging

import pytest
import torch

from src.batching import collate, decode
from src.checkpoint import (
    prune_resume_states,
    read_checkpoint,
    read_resume_state,
    resume_state,
    save_checkpoint,
    write_resume_state,
)
from src.errors import UserError
from src.model_factory import build_model, record_layernorm
from src.options import parse_settings
from src.retrieval import embed_queries
from src.tasks import Example
from src.training import build_optimizers
from tests.conftest import demo_args

CPU = torch.device("cpu")


def options(demo, tmp_path, *extra: str):
    flags = ["--name", "ckpt", "--train_retriever", "--n_context", "2", "--retriever_n_context", "2"]
    return parse_settings([*demo_args(demo, tmp_path), *flags, "--generation_max_length", "6", *extra], "train")


def build(settings, checkpoint=None):
    return build_model(settings.model, settings.atlas, CPU, checkpoint)


def load(settings):
    """What setup() builds: the model with the --model_path checkpoint's weights."""
    return build(settings, read_checkpoint(settings.model.model_path))


def save(settings, step, model, optimizers=None, schedulers=None, with_optimizer=False):
    return save_checkpoint(
        settings.run_dir, step, model, optimizers or {}, schedulers or {}, with_optimizer, settings.options
    )


EXAMPLES = [Example("question: who is Ab? answer: <extra_id_0>", "<extra_id_0> Cd", ["Cd"])]
PASSAGES = [[{"id": "1", "title": "Ab", "text": "Ab lives in Cd."}, {"id": "2", "title": "Ef", "text": "Ef works."}]]


def eval_loss(model, tokenizers):
    return model.eval_loss(collate(EXAMPLES, PASSAGES, tokenizers, model.config))


def generate(model, tokenizers):
    return decode(tokenizers, model.generate(collate(EXAMPLES, PASSAGES, tokenizers, model.config, targets=False)))


def perturb(model: torch.nn.Module) -> None:
    """Move every weight away from its initial value so a load that silently skipped keys would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))


def test_save_then_load_gives_identical_outputs(demo, tmp_path):
    settings = options(demo, tmp_path, "--save_optimizer")
    model, tokenizers = build(settings)
    perturb(model)
    optimizers, schedulers = build_optimizers(model, settings.train)
    path = save(settings, 7, model, optimizers, schedulers, with_optimizer=True)
    assert read_checkpoint(path)["step"] == 7

    loaded, _ = load(options(demo, tmp_path, "--model_path", str(path.parent)))
    torch.testing.assert_close(eval_loss(loaded, tokenizers), eval_loss(model, tokenizers))
    assert generate(loaded, tokenizers) == generate(model, tokenizers)
    queries = ["who is Ab?", "where?"]
    torch.testing.assert_close(embed_queries(loaded, tokenizers, queries), embed_queries(model, tokenizers, queries))
    assert not torch.equal(loaded.reader.lm_head.weight, loaded.reader.shared.weight)

    resumed = resume_state(settings.run_dir)  # --model_path none and a `latest` link: resume
    assert resumed["step"] == 7 and resumed["optimizer"] is not None and resumed["retr_optimizer"] is not None


def test_tied_checkpoint_loads_into_query_side_training(demo, tmp_path):
    settings = options(demo, tmp_path)
    model, tokenizers = build(settings)
    perturb(model)
    path = save(settings, 1, model)
    untied, _ = load(options(demo, tmp_path, "--model_path", str(path), "--query_side_retriever_training"))
    queries = ["who is Ab?"]
    torch.testing.assert_close(embed_queries(untied, tokenizers, queries), embed_queries(model, tokenizers, queries))
    query_params = dict(untied.retriever.query_contriever.named_parameters())
    for name, p in untied.retriever.passage_contriever.named_parameters():
        assert torch.equal(p, query_params[name]) and p.data_ptr() != query_params[name].data_ptr()


def test_reader_only_checkpoint_pairs_with_the_pretrained_retriever(demo, tmp_path):
    """A closed-book run saves no retriever; loading it for retrieval keeps --retriever_model_path's weights."""
    closed = parse_settings([*demo_args(demo, tmp_path), "--name", "closed", "--closed_book"], "train")
    reader_only, _ = build(closed)
    assert reader_only.retriever is None
    perturb(reader_only)
    path = save(closed, 3, reader_only)

    fresh, tokenizers = build(options(demo, tmp_path))
    loaded, _ = load(options(demo, tmp_path, "--model_path", str(path)))
    for name, p in loaded.reader.state_dict().items():
        assert torch.equal(p, reader_only.reader.state_dict()[name]), name
    queries = ["who is Ab?"]
    torch.testing.assert_close(embed_queries(loaded, tokenizers, queries), embed_queries(fresh, tokenizers, queries))


def test_resume_refuses_a_dangling_latest_and_another_task_and_cleans_killed_saves(demo, tmp_path, caplog):
    settings = options(demo, tmp_path)
    model, _ = build(settings)
    recorded = record_layernorm(settings, model)  # what a run saves: auto resolved to on/off
    save(recorded, 3, model)
    directory = settings.run_dir / "checkpoint"
    (directory / "step-3" / "tmpabc.tmp").write_bytes(b"half a checkpoint")  # a save killed before its rename
    with caplog.at_level(logging.INFO):
        assert resume_state(settings.run_dir, {**settings.options, "lr": 0.5})["step"] == 3
    assert not (directory / "step-3" / "tmpabc.tmp").exists()
    assert f"--lr {settings.options['lr']!r} -> 0.5" in caplog.text
    assert recorded.options["uncentered_layernorm"] == "off" and settings.options["uncentered_layernorm"] == "auto"
    assert "--uncentered_layernorm" not in caplog.text  # auto resolves to what was recorded: not a change
    with pytest.raises(UserError, match="was trained with --task qa, not mlm"):
        resume_state(settings.run_dir, {**settings.options, "task": "mlm"})
    (directory / "latest").unlink()
    (directory / "latest").symlink_to("step-7")
    with pytest.raises(UserError, match=r"latest points to step-7, which does not exist"):
        resume_state(settings.run_dir, settings.options)


def test_resume_states_are_per_rank_when_sharded_never_resplit_and_pruned(tmp_path, caplog):
    """Sharded optimizer states: one file per rank, read back by the same rank on the same number of processes; on
    another number they cannot be re-split (logged, the optimizers start afresh). A whole state loads anywhere."""
    for rank in range(2):
        content = {"layout": "zero1", "optimizers": {"reader": {"state": {0: {"step": torch.tensor(rank)}}}}}
        write_resume_state(tmp_path, 2, content, rank, 2, sharded=True)
    write_resume_state(tmp_path, 4, {"layout": "single", "optimizers": {}}, 0, 1, sharded=False)
    state, local = read_resume_state(tmp_path, 2, 1, 2)
    assert local and state["world_size"] == 2 and state["optimizers"]["reader"]["state"][0]["step"] == 1
    with caplog.at_level(logging.WARNING):
        assert read_resume_state(tmp_path, 2, 0, 4) == (None, False)
    assert "sharded over 2 processes, not 4" in caplog.text
    state, local = read_resume_state(tmp_path, 4, 3, 8)
    assert not local and state["layout"] == "single"
    prune_resume_states(tmp_path, 4)
    assert not (tmp_path / "checkpoint/step-2/resume").exists() and (tmp_path / "checkpoint/step-4/resume").is_dir()
