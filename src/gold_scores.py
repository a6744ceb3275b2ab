"""How the reader teaches the retriever (`--gold_score_mode`): target scores over the K passages and the loss.

Every target is computed with the reader in eval mode and without gradients. Modes (after alias mapping):
- ppmean (PDist): mean log-likelihood of the target given each passage alone;
- evalnormsum (ADist): decoder cross-attention probability x value norm, summed over layers, target tokens and the
  passage's tokens (the original crashed here with a KeyError; this is the score it meant to use);
- loop (LOOP): the reader's loss on the target when the passage is masked out of the cross-attention;
- emdr (EMDR): not a KL target: the mixture likelihood over the passages. The original mixes per target token,
  sum_k p(d_k|q) p_k(token) (`--emdr_mixture token`, the default); EMDR^2 in the papers mixes whole targets,
  sum_k p(d_k|q) prod_t p_k(token_t) (`sequence`). The default --temperature_gold 0.01 sharpens the reader's
  logits x100 in this mode; use 1.0 to match EMDR's maths.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache, T5ForConditionalGeneration

from src import reader as fid

ADIST_SCALE = 256.0  # the original divides the attention sum by this constant (kept so temperatures carry over)


class eval_mode:
    """Context manager: the module in eval mode under no_grad, its previous mode restored afterwards."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.module.train(self.was_training)


def _single_passage_token_ll(model, input_ids, attention_mask, labels, temperature: float = 1.0) -> torch.Tensor:
    """log p(target token | query, passage k alone): (B, K, L), (B, T) -> (B, K, T), 0 at padded labels."""
    B, K, L = input_ids.shape
    labels_k = labels.repeat_interleave(K, dim=0)  # (B*K, T)
    logits = fid.forward(model, input_ids.reshape(B * K, 1, L), attention_mask.reshape(B * K, 1, L), labels_k).logits
    return fid.token_log_likelihoods(logits / temperature, labels_k).view(B, K, -1)  # (B, K, T)


def ppmean_scores(model: T5ForConditionalGeneration, input_ids, attention_mask, labels) -> torch.Tensor:
    """PDist: mean log-likelihood of the target given each passage alone. (B, K, L), (B, T) -> (B, K)."""
    with eval_mode(model):
        token_ll = _single_passage_token_ll(model, input_ids, attention_mask, labels)  # (B, K, T)
        n_tokens = (labels != -100).sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
        return token_ll.sum(dim=-1) / n_tokens


def loop_scores(model: T5ForConditionalGeneration, input_ids, attention_mask, labels) -> torch.Tensor:
    """LOOP: mean token loss of the full FiD reader with passage k masked out of the cross-attention: (B, K).

    The passages are encoded once and the decoder's cross-attention keys/values are projected once: every masked
    run reuses them from a cache (without it, K runs re-project all K*L encoder states: at K=50 a training step of
    benchmarks/retriever_learning.py took 6.1 s instead of 2.4 s).
    """
    B, K, L = input_ids.shape
    with eval_mode(model):
        encoder_outputs, mask = fid.encode(model, input_ids, attention_mask)  # (B, K*L, D), (B, K*L); encoded once
        n_tokens = (labels != -100).sum(dim=1).clamp(min=1)  # (B,)
        cross_attention = DynamicCache()  # filled by the first run, read by the others
        scores = []
        for k in range(K):
            without_k = mask.view(B, K, L).clone()
            without_k[:, k] = 0
            cache = EncoderDecoderCache(DynamicCache(), cross_attention)  # fresh self-attention cache per run
            logits = model(
                encoder_outputs=encoder_outputs,
                attention_mask=without_k.view(B, K * L),
                labels=labels,
                past_key_values=cache,
                use_cache=True,
            ).logits
            scores.append(-fid.token_log_likelihoods(logits, labels).sum(dim=1) / n_tokens)  # (B,)
        return torch.stack(scores, dim=1)  # (B, K)


def evalnormsum_scores(model: T5ForConditionalGeneration, input_ids, attention_mask, labels) -> torch.Tensor:
    """ADist: sum over layers, target tokens and passage tokens of head-averaged attn * ||v||: (B, K)."""
    B, K, L = input_ids.shape
    value_norms: list[torch.Tensor] = []

    def keep_value_norm(module, inputs, output):  # output: (B, K*L, H * d_kv)
        H = model.config.num_heads
        value_norms.append(output.view(B, K * L, H, -1).float().norm(dim=-1).transpose(1, 2))  # (B, H, K*L)

    if model.config._attn_implementation != "eager":  # sdpa and flash kernels return no attention probabilities
        raise ValueError("evalnormsum needs a reader built with eager attention (ModelConfig.eager_attention)")
    hooks = [block.layer[1].EncDecAttention.v.register_forward_hook(keep_value_norm) for block in model.decoder.block]
    try:
        with eval_mode(model):
            encoder_outputs, mask = fid.encode(model, input_ids, attention_mask)
            out = model(encoder_outputs=encoder_outputs, attention_mask=mask, labels=labels, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    total = 0.0
    for probs, norms in zip(out.cross_attentions, value_norms):  # probs (B, H, T, K*L), norms (B, H, K*L)
        total = total + (probs.float() * norms.unsqueeze(2)).mean(dim=1)  # (B, T, K*L), averaged over heads
    target_mask = (labels != -100).float()  # (B, T)
    per_token = (total * target_mask.unsqueeze(-1)).sum(dim=1) * mask  # (B, K*L), padded passage tokens dropped
    n_tokens = target_mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    scores = per_token.view(B, K, L).sum(dim=-1)  # (B, K)
    return scores / (ADIST_SCALE * len(value_norms) * n_tokens)


# The registry of --gold_score_mode: KL targets by name, and emdr (a mixture likelihood, not a target).
GOLD_SCORE_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "evalnormsum": evalnormsum_scores,
    "loop": loop_scores,
    "ppmean": ppmean_scores,
}
GOLD_SCORE_MODES = (*GOLD_SCORE_FNS, "emdr")
GOLD_SCORE_ALIASES = {"pdist": "ppmean", "adist": "evalnormsum"}  # the paper's names -> the code's


def kl_retriever_loss(
    retriever_scores: torch.Tensor,
    gold: torch.Tensor,
    dim: int,
    temperature_score: float,
    temperature_gold: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(softmax(gold / tau_gold) || softmax(q.d / sqrt(dim) / tau_score)) over the K passages, in fp32.

    reduction "mean" divides by B*K as the original (nn.KLDivLoss default); "batchmean" divides by B.
    """
    student = F.log_softmax(retriever_scores.float() / math.sqrt(dim) / temperature_score, dim=-1)  # (B, K)
    target = F.softmax(gold.float() / temperature_gold, dim=-1)  # (B, K)
    total = F.kl_div(student, target, reduction="sum")
    return total / (student.numel() if reduction == "mean" else student.shape[0])


def emdr_loss(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    retriever_scores: torch.Tensor,
    dim: int,
    temperature_score: float,
    temperature_gold: float,
    mixture: str = "token",
) -> torch.Tensor:
    """Negative log mixture likelihood of the target, with p_k from each passage alone (no reader gradient).

    token:    -sum_t log sum_k p(d_k|q) p_k(y_t) / #tokens (the original);
    sequence: -sum_b log sum_k p(d_k|q) prod_t p_k(y_t) / B (EMDR^2).
    """
    with eval_mode(model):
        token_ll = _single_passage_token_ll(model, input_ids, attention_mask, labels, temperature_gold)  # (B, K, T)
    log_prior = F.log_softmax(retriever_scores.float() / math.sqrt(dim) / temperature_score, dim=-1)  # (B, K)
    if mixture == "sequence":  # padded labels contribute 0 to the sum
        return -torch.logsumexp(token_ll.sum(dim=-1) + log_prior, dim=1).mean()
    per_token = torch.logsumexp(token_ll + log_prior.unsqueeze(-1), dim=1)  # (B, T)
    target_mask = (labels != -100).float()
    return -(per_token * target_mask).sum() / target_mask.sum().clamp(min=1)


def retriever_loss(
    mode: str,
    model: T5ForConditionalGeneration,
    reader_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    retriever_scores: torch.Tensor,
    dim: int,
    temperature_score: float,
    temperature_gold: float,
    reduction: str = "mean",
    emdr_mixture: str = "token",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, gold scores or None for emdr) for the mode; reader_inputs = (ids (B,K,L), mask (B,K,L), labels (B,T))."""
    if mode == "emdr":
        loss = emdr_loss(
            model, *reader_inputs, retriever_scores, dim, temperature_score, temperature_gold, emdr_mixture
        )
        return loss, None
    gold = GOLD_SCORE_FNS[mode](model, *reader_inputs)  # (B, K)
    loss = kl_retriever_loss(retriever_scores, gold, dim, temperature_score, temperature_gold, reduction)
    return loss, gold
