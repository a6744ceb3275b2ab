"""Retriever training: query-side updates, rerank, filtering by id, and index refresh, on the tiny demo world."""

import copy

import pytest
import torch

from src.batching import collate, reader_tokens, retriever_passage_tokens, retriever_tokens
from src.data import TrainingBatches, load_instances
from src.distributed import World
from src.gold_scores import emdr_loss
from src.index.refresh import build_index, refresh_index
from src.model_factory import build_model
from src.options import parse_settings
from src.retrieval import embed_queries, retrieve, retrieve_with_rows
from src.tasks import Example, build_task
from src.training import Trainer
from tests.conftest import demo_args

CPU = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def options(demo, tmp_path, *extra: str):
    flags = ["--name", "rt", "--train_retriever", "--n_context", "2", "--retriever_n_context", "3"]
    flags += ["--per_gpu_batch_size", "2", "--lr_retriever", "1e-3", "--warmup_steps", "0", "--total_steps", "10"]
    return parse_settings([*demo_args(demo, tmp_path), *flags, *extra], "train")


def fresh_passage_embeddings(model, tokenizers, store) -> torch.Tensor:
    """Every passage embedded alone (no padding) with the current passage encoder: (N, D)."""
    rows = []
    with torch.no_grad():
        model.retriever.eval()
        for passage in store.get_many(range(len(store))):
            ids, mask = retriever_passage_tokens(tokenizers, [[passage]], model.config)
            rows.append(model.retriever.embed_passages(ids, mask)[0])
    return torch.stack(rows)


@pytest.fixture
def setup(demo, tmp_path):
    def make(*extra: str):
        settings = options(demo, tmp_path, *extra)
        model, tokenizers = build_model(settings.model, settings.atlas, CPU.device)
        return settings, model, tokenizers, build_index(settings.index, model, tokenizers, CPU)

    return make


def test_query_side_training_moves_only_the_query_encoder(setup):
    settings, model, tokenizers, index = setup("--query_side_retriever_training")
    task = build_task("qa", settings.options)
    before = {k: v.clone() for k, v in model.retriever.state_dict().items()}
    batches = TrainingBatches(load_instances(list(settings.train_data), task), task, 2, False, 0)
    trainer = Trainer(model, tokenizers, index, task, settings, CPU)
    for step in range(1, 4):
        trainer.train_step(batches, step)
    after = model.retriever.state_dict()
    passage_keys = [k for k in before if k.startswith("passage_contriever.")]
    query_keys = [k for k in before if k.startswith("query_contriever.")]
    assert passage_keys and all(torch.equal(before[k], after[k]) for k in passage_keys)
    assert any(not torch.equal(before[k], after[k]) for k in query_keys)


def test_query_side_loss_reads_the_index_vectors_and_equals_re_embedding(setup, monkeypatch):
    # Query-side training reads the retrieved passages' vectors from the index instead of re-embedding them with the
    # frozen passage encoder: same loss and query-encoder gradients (fp32 here), and no passage is tokenised or
    # embedded for the retriever.
    settings, model, tokenizers, index = setup("--query_side_retriever_training")
    model.eval()  # no dropout: the two runs see the same query embedding
    examples = [
        Example("question: where was he born? answer: <extra_id_0>", "<extra_id_0> Paris", ["Paris"]),
        Example("question: who founded the academy? answer: <extra_id_0>", "<extra_id_0> Ab", ["Ab"]),
    ]
    passages, _, rows = retrieve_with_rows(model, tokenizers, index, examples, 3)
    vectors = index.vectors(rows)  # (B, 3, D)
    assert torch.equal(vectors, index.local_embeddings[rows])
    results = []
    for given in (None, vectors):
        model.zero_grad()
        batch = collate(examples, passages, tokenizers, model.config, retriever=True, passage_vectors=given)
        assert (batch.passage_ids is None) == (given is not None)
        loss = model.retriever_loss(batch)["retriever_loss"]
        loss.backward()
        grads = [p.grad.clone() for p in model.retriever.query_encoder.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The trainer takes this path: the passage encoder never runs during its steps.
    task = build_task("qa", settings.options)
    batches = TrainingBatches(load_instances(list(settings.train_data), task), task, 2, False, 0)
    trainer = Trainer(model, tokenizers, index, task, settings, CPU)
    assert trainer.reads_index_vectors
    calls = []
    monkeypatch.setattr(model.retriever, "embed_passages", lambda *a: calls.append(a))
    losses = trainer.train_step(batches, 1)
    assert not calls and losses["retriever_loss"] > 0


def test_refresh_makes_the_index_match_fresh_embeddings(setup):
    settings, model, tokenizers, index = setup()
    with torch.no_grad():
        for p in model.retriever.parameters():
            p.add_(0.05 * torch.randn_like(p))
    refresh_index(index, model, tokenizers, settings.index)
    fresh = fresh_passage_embeddings(model, tokenizers, index.store)  # (N, D)
    queries = embed_queries(model, tokenizers, ["who founded the academy?", "where was he born?"])
    scores, rows = index.search(queries, 5)
    expected = (queries @ fresh.T).topk(5, dim=1)
    torch.testing.assert_close(scores, expected.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(rows, expected.indices)


def test_rerank_equals_brute_force_over_candidates_with_fresh_embeddings(setup):
    settings, model, tokenizers, index = setup("--retrieve_with_rerank", "--n_to_rerank_with_retrieve_with_rerank", "6")
    with torch.no_grad():  # the index is now stale
        for p in model.retriever.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale_rows = index.search(embed_queries(model, tokenizers, ["where was he born?"]), 6)[1][0].tolist()
    example = Example("where was he born?", "x", ["x"])
    passages, scores = retrieve(model, tokenizers, index, [example], 3)
    fresh = fresh_passage_embeddings(model, tokenizers, index.store)[stale_rows]  # (6, D) candidates, fresh
    candidate_scores = embed_queries(model, tokenizers, [example.query])[0] @ fresh.T  # (6,)
    best = candidate_scores.topk(3)
    assert [p["id"] for p in passages[0]] == [index.store.get(stale_rows[i])["id"] for i in best.indices.tolist()]
    torch.testing.assert_close(scores[0], best.values, rtol=1e-4, atol=1e-4)


def test_filtering_drops_the_instances_own_passage(setup):
    settings, model, tokenizers, index = setup()
    query = "where was he born?"
    unfiltered, _ = retrieve(model, tokenizers, index, [Example(query, "x", ["x"])], 3)
    own = unfiltered[0][0]["id"]  # pretend the instance is the top passage itself (as mlm/lm/section data are)
    example = Example(query, "x", ["x"], metadata={"id": own})
    filtered, scores = retrieve(model, tokenizers, index, [example], 3, filter_by_id=True)
    ids = [p["id"] for p in filtered[0]]
    assert len(ids) == 3 and own not in ids
    assert ids[:2] == [p["id"] for p in unfiltered[0][1:]]  # the others keep their order
    assert scores.shape == (1, 3)


@pytest.mark.parametrize("mode", ["ppmean", "evalnormsum", "loop", "emdr"])
def test_each_gold_mode_trains_and_logs_attention_correlation(setup, mode):
    settings, model, tokenizers, index = setup("--gold_score_mode", mode, "--compute_crossattention_stats")
    examples = [Example("question: where was he born? answer: <extra_id_0>", "<extra_id_0> Paris", ["Paris"])] * 2
    passages, _ = retrieve(model, tokenizers, index, examples, 3)
    losses = model(collate(examples, passages, tokenizers, model.config, retriever=True))
    assert losses["retriever_loss"].requires_grad and torch.isfinite(losses["loss"])
    assert -1.0 <= losses[f"corr/{mode}"].item() <= 1.0
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.retriever.parameters())
    frozen = model(collate(examples, passages, tokenizers, model.config), train_retriever=False)
    assert set(frozen) == {"reader_loss", "loss"}


def test_emdr_mixture_flag_reaches_the_loss(setup):
    examples = [Example("question: where was he born? answer: <extra_id_0>", "<extra_id_0> Paris", ["Paris"])] * 2
    losses = {}
    for mixture in ("token", "sequence"):
        _, model, tokenizers, index = setup(
            "--gold_score_mode", "emdr", "--temperature_gold", "1", "--emdr_mixture", mixture
        )
        model.eval()  # no dropout: the same retriever scores for both runs
        passages, _ = retrieve(model, tokenizers, index, examples, 3)
        batch = collate(examples, passages, tokenizers, model.config, retriever=True)
        losses[mixture] = model.retriever_loss(batch)["retriever_loss"]
        query_emb = model.embed_queries(*retriever_tokens(tokenizers, [ex.query for ex in examples], model.config))
        scores = model.rescore(query_emb, *retriever_passage_tokens(tokenizers, passages, model.config))  # (B, K=3)
        ids, mask = reader_tokens(tokenizers, examples, passages, 3, model.config)
        expected = emdr_loss(model.reader, ids, mask, batch.labels, scores, model.retriever.dim,
                             model.config.temperature_score, 1.0, mixture)  # fmt: skip
        torch.testing.assert_close(losses[mixture], expected)
    assert not torch.isclose(losses["token"], losses["sequence"])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_fp16_non_finite_retriever_gradient_skips_both_optimizers(setup, bad):
    settings, model, tokenizers, index = setup("--precision", "fp16", "--query_side_retriever_training")
    task = build_task("qa", settings.options)
    batches = TrainingBatches(load_instances(list(settings.train_data), task), task, 2, False, 0)
    trainer = Trainer(model, tokenizers, index, task, settings, CPU)
    trainer.train_step(batches, 1)  # a normal step first, so both optimizers hold Adam state
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    states = {n: copy.deepcopy(o.state_dict()) for n, o in trainer.optimizers.items()}
    scale = trainer.scaler.get_scale()
    param = next(p for p in model.retriever.query_contriever.parameters() if p.requires_grad)
    hook = param.register_hook(lambda grad: grad * bad)
    trainer.train_step(batches, 2)
    hook.remove()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the reader did not step either
    for name, optimizer in trainer.optimizers.items():
        after = optimizer.state_dict()
        assert after["param_groups"] == states[name]["param_groups"]
        for key, state in states[name]["state"].items():
            assert all(
                torch.equal(value, after["state"][key][k]) for k, value in state.items() if torch.is_tensor(value)
            )
    assert trainer.scaler.get_scale() < scale
    trainer.train_step(batches, 3)  # and training goes on
    assert any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())
