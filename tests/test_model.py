"""FiD reader, Contriever pooling, PDist gold scores and the retriever loss on tiny random models."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, T5Config

from src import reader as fid
from src.gold_scores import emdr_loss, evalnormsum_scores, kl_retriever_loss, loop_scores, ppmean_scores
from src.retriever import Retriever, UncenteredLayerNorm, encode, use_uncentered_layernorm

VOCAB = 64


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    return fid.reader_from_config(config).eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertModel(config, add_pooling_layer=False).eval()


def random_batch(B: int, K: int, L: int, T: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, K, L), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(3, VOCAB, (B, T), generator=g)
    return ids, mask, labels


def test_fid_with_one_passage_equals_plain_t5(t5):
    ids, mask, labels = random_batch(B=3, K=1, L=7)
    ours = fid.forward(t5, ids, mask, labels)
    plain = t5(input_ids=ids[:, 0], attention_mask=mask[:, 0], labels=labels)
    torch.testing.assert_close(ours.logits, plain.logits)
    torch.testing.assert_close(ours.loss, plain.loss)


def test_fid_decoder_sees_all_passages_concatenated(t5):
    """The decoder's cross-attention input is the concatenation of the K separately encoded passages."""
    ids, mask, labels = random_batch(B=2, K=3, L=5)
    encoder_outputs, flat_mask = fid.encode(t5, ids, mask)
    for k in range(3):
        alone = t5.encoder(input_ids=ids[:, k], attention_mask=mask[:, k]).last_hidden_state
        torch.testing.assert_close(encoder_outputs.last_hidden_state[:, k * 5 : (k + 1) * 5], alone)
    assert flat_mask.shape == (2, 15)


def test_fid_output_independent_of_padding(t5):
    ids, mask, labels = random_batch(B=2, K=3, L=6)
    mask[0, 1, 4:] = 0  # a shorter passage in the batch
    ids[0, 1, 4:] = 0
    padded_ids = F.pad(ids, (0, 5), value=0)
    padded_mask = F.pad(mask, (0, 5), value=0)
    short = fid.forward(t5, ids, mask, labels)
    long = fid.forward(t5, padded_ids, padded_mask, labels)
    torch.testing.assert_close(short.loss, long.loss)
    torch.testing.assert_close(short.logits, long.logits)


def test_generate_runs_on_fid_encoding(t5):
    ids, mask, _ = random_batch(B=2, K=3, L=5)
    out = fid.generate(t5, ids, mask, max_length=6)
    assert out.shape[0] == 2 and out.shape[1] <= 6


def test_untied_lm_head_is_its_own_parameter(t5):
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()
    state = {k: v.clone() for k, v in t5.state_dict().items()}
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    clone = fid.reader_from_config(t5.config)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.shared.weight, state["shared.weight"])
    torch.testing.assert_close(clone.lm_head.weight, state["lm_head.weight"])


def test_mean_pooling_ignores_padding(bert):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    emb = encode(bert, ids, mask)
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(encode(bert, padded, padded_mask), emb)
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(emb, hidden.mean(dim=1))


def test_uncentered_layernorm_formula():
    ln = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(3, 8) + 2.0
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt((x**2).mean(-1, keepdim=True) + ln.eps) * ln.weight + ln.bias
    torch.testing.assert_close(UncenteredLayerNorm(ln)(x), expected)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    assert use_uncentered_layernorm(model) == 1 and isinstance(model[1], UncenteredLayerNorm)


def test_query_side_retriever_has_a_frozen_passage_copy(bert):
    retriever = Retriever(bert, query_side=True)
    assert retriever.passage_contriever is not retriever.query_contriever
    assert not any(p.requires_grad for p in retriever.passage_contriever.parameters())
    retriever.train()
    assert not retriever.passage_contriever.training and retriever.query_contriever.training


def test_ppmean_equals_per_passage_mean_token_log_likelihood(t5):
    ids, mask, labels = random_batch(B=2, K=3, L=5, T=4)
    labels[1, 3] = -100  # a shorter target
    scores = ppmean_scores(t5, ids, mask, labels)
    for b in range(2):
        for k in range(3):
            logits = t5(input_ids=ids[b : b + 1, k], attention_mask=mask[b : b + 1, k], labels=labels[b : b + 1]).logits
            logprobs = torch.log_softmax(logits[0], dim=-1)
            valid = [t for t in range(4) if labels[b, t] != -100]
            expected = sum(logprobs[t, labels[b, t]] for t in valid) / len(valid)
            assert math.isclose(scores[b, k].item(), expected.item(), rel_tol=1e-5, abs_tol=1e-5)


def test_kl_loss_matches_the_formula():
    retriever_scores = torch.randn(2, 4)
    gold = torch.randn(2, 4)
    loss = kl_retriever_loss(retriever_scores, gold, dim=16, temperature_score=0.5, temperature_gold=0.2)
    p = torch.softmax(gold / 0.2, -1)
    log_q = torch.log_softmax(retriever_scores / 4.0 / 0.5, -1)
    expected = (p * (p.log() - log_q)).sum() / 8  # the original's reduction: mean over B*K
    torch.testing.assert_close(loss, expected)
    batchmean = kl_retriever_loss(retriever_scores, gold, 16, 0.5, 0.2, reduction="batchmean")
    torch.testing.assert_close(batchmean, expected * 4)


def test_loop_equals_rerunning_the_reader_without_the_passage(t5):
    ids, mask, labels = random_batch(B=2, K=3, L=5, T=4)
    scores = loop_scores(t5, ids, mask, labels)
    for b in range(2):
        for k in range(3):
            keep = [j for j in range(3) if j != k]
            loss = fid.forward(t5, ids[b : b + 1, keep], mask[b : b + 1, keep], labels[b : b + 1]).loss
            assert math.isclose(scores[b, k].item(), loss.item(), rel_tol=1e-5)


def test_evalnormsum_equals_attention_times_value_norm(t5):
    ids, mask, labels = random_batch(B=2, K=3, L=5, T=4)
    mask[1, 2, 3:] = 0
    labels[0, 3] = -100
    if t5.config._attn_implementation != "eager":  # fused kernels return no attention probabilities: say so
        with pytest.raises(ValueError, match="eager"):
            evalnormsum_scores(t5, ids, mask, labels)
    t5.set_attn_implementation("eager")  # as the model factory builds a reader for evalnormsum
    scores = evalnormsum_scores(t5, ids, mask, labels)
    encoder_outputs, flat_mask = fid.encode(t5, ids, mask)
    out = t5(encoder_outputs=encoder_outputs, attention_mask=flat_mask, labels=labels, output_attentions=True)
    hidden = encoder_outputs.last_hidden_state  # (B, K*L, D)
    H = t5.config.num_heads
    expected = torch.zeros(2, 3)
    n_layers = len(t5.decoder.block)
    for layer, probs in enumerate(out.cross_attentions):  # (B, H, T, K*L)
        v = t5.decoder.block[layer].layer[1].EncDecAttention.v(hidden).view(2, 15, H, -1)
        norms = v.norm(dim=-1).permute(0, 2, 1)  # (B, H, K*L)
        for b in range(2):
            for t in range(4):
                if labels[b, t] == -100:
                    continue
                weighted = (probs[b, :, t] * norms[b]).mean(dim=0) * flat_mask[b]  # (K*L,)
                expected[b] += weighted.view(3, 5).sum(dim=1)
    n_tokens = (labels != -100).sum(dim=1, keepdim=True)
    torch.testing.assert_close(scores, expected / (256.0 * n_layers * n_tokens), rtol=1e-4, atol=1e-6)


def test_emdr_loss_is_the_per_token_mixture(t5):
    ids, mask, labels = random_batch(B=2, K=3, L=5, T=4)
    retriever_scores = torch.randn(2, 3)
    loss = emdr_loss(t5, ids, mask, labels, retriever_scores, dim=16, temperature_score=0.5, temperature_gold=2.0)
    prior = torch.softmax(retriever_scores / 4.0 / 0.5, dim=-1)  # (B, K)
    total = 0.0
    for b in range(2):
        for t in range(4):
            p = 0.0
            for k in range(3):
                logits = t5(input_ids=ids[b : b + 1, k], attention_mask=mask[b : b + 1, k], labels=labels[b : b + 1])
                p += prior[b, k] * torch.softmax(logits.logits[0, t] / 2.0, -1)[labels[b, t]]
            total += -torch.log(p)
    assert math.isclose(loss.item(), (total / 8).item(), rel_tol=1e-5)


def test_emdr_sequence_mixture_mixes_whole_targets(t5):
    ids, mask, labels = random_batch(B=2, K=3, L=5, T=4)
    labels[1, 3] = -100  # a padded target position takes no part
    retriever_scores = torch.randn(2, 3)
    loss = emdr_loss(t5, ids, mask, labels, retriever_scores, 16, 0.5, 2.0, mixture="sequence")
    prior = torch.softmax(retriever_scores / 4.0 / 0.5, dim=-1)  # (B, K)
    total = 0.0
    for b in range(2):
        likelihood = 0.0
        for k in range(3):
            logits = t5(input_ids=ids[b : b + 1, k], attention_mask=mask[b : b + 1, k], labels=labels[b : b + 1])
            p_target = 1.0
            for t in range(4):
                if labels[b, t] != -100:
                    p_target = p_target * torch.softmax(logits.logits[0, t] / 2.0, -1)[labels[b, t]]
            likelihood += prior[b, k] * p_target
        total += -torch.log(likelihood)
    assert math.isclose(loss.item(), (total / 2).item(), rel_tol=1e-5)


def test_compiled_model_equals_eager_and_keeps_its_names(t5, bert):
    # --compile: the reader's encoder blocks and the retriever's layers run compiled (inductor's C++ backend here), with
    # the eager model's losses and gradients (a query-side pdist step, padded passages), the same state-dict keys and
    # the same checkpoint contents; the decoder stays eager (generation still runs).
    import copy

    from src.atlas import Atlas
    from src.batching import Batch
    from src.config import AtlasConfig
    from src.model_factory import compile_model

    torch.manual_seed(1)
    cfg = AtlasConfig(n_context=3, retriever_n_context=3, train_retriever=True, gold_score_mode="ppmean")
    eager = Atlas(copy.deepcopy(t5), Retriever(copy.deepcopy(bert), query_side=True), cfg).train()
    compiled = copy.deepcopy(eager)
    compile_model(compiled.reader, compiled.retriever)
    assert all(block._compiled_call_impl is not None for block in compiled.reader.encoder.block)
    assert all(layer._compiled_call_impl is not None for layer in compiled.retriever.query_encoder.encoder.layer)
    ids, mask, labels = random_batch(B=2, K=3, L=9, T=4, seed=5)
    mask[0, 1, 6:] = 0  # a padded passage
    g = torch.Generator().manual_seed(6)
    query_ids, query_mask = torch.randint(3, VOCAB, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.long)
    batch = Batch(ids, mask, labels, query_ids=query_ids, query_mask=query_mask, passage_ids=ids.view(6, 9),
                  passage_mask=mask.view(6, 9), teacher_ids=ids, teacher_mask=mask)  # fmt: skip
    results = []
    for model in (eager, compiled):
        losses = model(batch)
        losses["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = results
    for name in ("reader_loss", "retriever_loss"):
        torch.testing.assert_close(compiled_losses[name], eager_losses[name], rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())  # a checkpoint of the eager model loads as it is
    assert compiled.generate(batch).shape[0] == 2


def test_reader_attention_implementations_agree(t5):
    # --reader_attention: transformers' eager and sdpa kernels give the same FiD loss (padding included); auto keeps
    # the model's default.
    import copy

    ids, mask, labels = random_batch(B=2, K=3, L=8, seed=7)
    mask[1, 2, 5:] = 0
    losses = {}
    for implementation in fid.ATTENTION:
        model = copy.deepcopy(t5)
        default = model.config._attn_implementation
        fid.set_attention(model, implementation)
        assert model.config._attn_implementation == (default if implementation == "auto" else implementation)
        losses[implementation] = fid.forward(model, ids, mask, labels).loss
    torch.testing.assert_close(losses["sdpa"], losses["eager"], rtol=1e-5, atol=1e-6)
