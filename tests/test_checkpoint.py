"""Checkpoints: save -> load gives the same model; resume restores optimizers; tied -> untied conversion."""

import torch

from src.checkpoint import build_model, read_checkpoint, save_checkpoint
from src.options import parse_options
from src.tasks import Example
from src.training import build_optimizers
from tests.conftest import demo_args


def options(demo, tmp_path, *extra: str):
    flags = ["--name", "ckpt", "--train_retriever", "--n_context", "2", "--retriever_n_context", "2"]
    return parse_options([*demo_args(demo, tmp_path), *flags, "--generation_max_length", "6", *extra], "train")


EXAMPLES = [Example("question: who is Ab? answer: <extra_id_0>", "<extra_id_0> Cd", ["Cd"])]
PASSAGES = [[{"id": "1", "title": "Ab", "text": "Ab lives in Cd."}, {"id": "2", "title": "Ef", "text": "Ef works."}]]


def perturb(model: torch.nn.Module) -> None:
    """Move every weight away from its initial value so a load that silently skipped keys would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))


def test_save_then_load_gives_identical_outputs(demo, tmp_path):
    opt = options(demo, tmp_path, "--save_optimizer")
    model = build_model(opt, torch.device("cpu")).model
    perturb(model)
    optimizers, schedulers = build_optimizers(model, opt)
    path = save_checkpoint(opt, 7, model, optimizers, schedulers, with_optimizer=True)
    assert read_checkpoint(path)["step"] == 7

    loaded = build_model(options(demo, tmp_path, "--model_path", str(path.parent)), torch.device("cpu"))
    assert loaded.step == 0  # --model_path starts a new run from the weights
    torch.testing.assert_close(loaded.model.eval_loss(EXAMPLES, PASSAGES), model.eval_loss(EXAMPLES, PASSAGES))
    assert loaded.model.generate(EXAMPLES, PASSAGES) == model.generate(EXAMPLES, PASSAGES)
    queries = ["who is Ab?", "where?"]
    torch.testing.assert_close(loaded.model.embed_queries(queries), model.embed_queries(queries))
    assert not torch.equal(loaded.model.reader.lm_head.weight, loaded.model.reader.shared.weight)

    resumed = build_model(opt, torch.device("cpu"))  # --model_path none and a `latest` link: resume
    assert resumed.step == 7 and resumed.state["optimizer"] is not None and resumed.state["retr_optimizer"] is not None


def test_tied_checkpoint_loads_into_query_side_training(demo, tmp_path):
    opt = options(demo, tmp_path)
    model = build_model(opt, torch.device("cpu")).model
    perturb(model)
    path = save_checkpoint(opt, 1, model, {}, {}, with_optimizer=False)
    untied = build_model(
        options(demo, tmp_path, "--model_path", str(path), "--query_side_retriever_training"), torch.device("cpu")
    ).model
    queries = ["who is Ab?"]
    torch.testing.assert_close(untied.embed_queries(queries), model.embed_queries(queries))
    query_params = dict(untied.retriever.query_contriever.named_parameters())
    for name, p in untied.retriever.passage_contriever.named_parameters():
        assert torch.equal(p, query_params[name]) and p.data_ptr() != query_params[name].data_ptr()


def test_reader_only_checkpoint_pairs_with_the_pretrained_retriever(demo, tmp_path):
    """A closed-book run saves no retriever; loading it for retrieval keeps --retriever_model_path's weights."""
    closed = parse_options([*demo_args(demo, tmp_path), "--name", "closed", "--closed_book"], "train")
    reader_only = build_model(closed, torch.device("cpu")).model
    assert reader_only.retriever is None
    perturb(reader_only)
    path = save_checkpoint(closed, 3, reader_only, {}, {}, with_optimizer=False)

    fresh = build_model(options(demo, tmp_path), torch.device("cpu")).model
    loaded = build_model(options(demo, tmp_path, "--model_path", str(path)), torch.device("cpu")).model
    for name, p in loaded.reader.state_dict().items():
        assert torch.equal(p, reader_only.reader.state_dict()[name]), name
    queries = ["who is Ab?"]
    torch.testing.assert_close(loaded.embed_queries(queries), fresh.embed_queries(queries))
