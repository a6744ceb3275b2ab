"""Atlas: a T5 reader and a Contriever retriever, mapping token tensors (a `Batch`) to losses and generations.

The model holds no tokenizers and no options object: `src.batching.collate` makes its inputs, `src.retrieval`
finds the passages, and an `AtlasConfig` says which retriever loss to use and how to generate.
"""

import logging

import torch
from torch import nn
from transformers import T5ForConditionalGeneration

from src import reader as fid
from src.batching import Batch
from src.config import AtlasConfig
from src.gold_scores import eval_mode, evalnormsum_scores, retriever_loss
from src.retriever import Retriever

logger = logging.getLogger(__name__)


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Pearson correlation between two (B, K) score tensors (0 where constant)."""
    x = x.float() - x.float().mean(dim=1, keepdim=True)
    y = y.float() - y.float().mean(dim=1, keepdim=True)
    denominator = (x.norm(dim=1) * y.norm(dim=1)).clamp(min=1e-12)
    return ((x * y).sum(dim=1) / denominator).clamp(-1.0, 1.0).mean()  # rounding can pass ±1 by an ulp


class Atlas(nn.Module):
    """A T5 reader (`reader.*`, stock HF names) and a Contriever retriever (`retriever.*`).

    `reader` is None in retrieve-only mode; `retriever` is None for closed-book or file-passage runs.
    """

    def __init__(self, reader: T5ForConditionalGeneration | None, retriever: Retriever | None, config: AtlasConfig):
        super().__init__()
        self.reader, self.retriever = reader, retriever
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def embed_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query embeddings for search, in eval mode: (B, Lq) -> (B, D)."""
        with eval_mode(self.retriever):
            return self.retriever.embed_queries(input_ids.to(self.device), attention_mask.to(self.device))

    @torch.no_grad()
    def rescore(self, query_emb: torch.Tensor, passage_ids: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        """q.d with B*n passages re-embedded by the current passage encoder (eval mode): (B, D) -> (B, n)."""
        with eval_mode(self.retriever):
            passage_emb = self.retriever.embed_passages(passage_ids.to(self.device), passage_mask.to(self.device))
        passage_emb = passage_emb.view(query_emb.shape[0], -1, passage_emb.shape[-1])  # (B, n, D)
        return torch.einsum("bd,bnd->bn", query_emb, passage_emb).float()  # (B, n)

    def forward(self, batch: Batch, train_retriever: bool = True) -> dict[str, torch.Tensor]:
        """Training losses: `reader_loss`, and `retriever_loss` when the retriever trains (then `loss` sums both).

        `train_retriever=False` skips the retriever loss (while it is frozen by --freeze_retriever_steps).
        With --compute_crossattention_stats, `corr/<mode>` holds the Pearson correlation of the gold scores with the
        attention-derived (evalnormsum) scores.
        """
        reader_loss = fid.forward(self.reader, batch.reader_ids, batch.reader_mask, batch.labels).loss
        losses = {"reader_loss": reader_loss, "loss": reader_loss}
        if train_retriever and self.config.train_retriever and self.retriever is not None:
            losses.update(self.retriever_loss(batch))
            losses["loss"] = reader_loss + losses["retriever_loss"]
        return losses

    def retriever_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Distil the reader's gold scores over all retriever_n_context passages into the retriever's scores."""
        query_emb = self.retriever.embed_queries(batch.query_ids, batch.query_mask)  # (B, D)
        if batch.passage_vectors is not None:  # query side: the frozen passage encoder's vectors, read from the index
            passage_emb = batch.passage_vectors.to(query_emb.dtype)  # (B, K, D)
        else:
            passage_emb = self.retriever.embed_passages(batch.passage_ids, batch.passage_mask)  # (B*K, D)
            passage_emb = passage_emb.view(query_emb.shape[0], -1, passage_emb.shape[-1])  # (B, K, D)
        retriever_scores = torch.einsum("bd,bkd->bk", query_emb, passage_emb)  # (B, K)
        reader_inputs = (batch.teacher_ids, batch.teacher_mask, batch.labels)
        cfg = self.config
        loss, gold = retriever_loss(
            cfg.gold_score_mode,
            self.reader,
            reader_inputs,
            retriever_scores,
            self.retriever.dim,
            cfg.temperature_score,
            cfg.temperature_gold,
            cfg.kl_reduction,
            cfg.emdr_mixture,
        )
        out = {"retriever_loss": loss}
        if cfg.compute_crossattention_stats:
            reference = retriever_scores.detach() if gold is None else gold  # emdr has no gold: use the retriever
            attention = evalnormsum_scores(self.reader, *reader_inputs)  # (B, K)
            out[f"corr/{cfg.gold_score_mode}"] = pearson(reference, attention)
        return out

    @torch.no_grad()
    def eval_outputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each example's reader loss (B,) in eval mode (the `eval_loss` metric: mean over its target tokens) and, for
        multiple choice, the options' scores (B, C) (see src/batching.py choice_tokens)."""
        with eval_mode(self.reader):
            encoder_outputs, mask = fid.encode(self.reader, batch.reader_ids, batch.reader_mask)  # encoded once
            out = self.reader(encoder_outputs=encoder_outputs, attention_mask=mask, labels=batch.labels)
            token_ll = fid.token_log_likelihoods(out.logits, batch.labels)  # (B, T), 0 at padding
            losses = -token_ll.sum(dim=1) / (batch.labels != -100).sum(dim=1).clamp(min=1)  # (B,)
            if batch.choice_labels is not None:  # options not told apart by one token: whole-target log-likelihoods
                scores = []
                for option in batch.choice_labels.transpose(0, 1).contiguous():  # (B, T) each
                    logits = self.reader(encoder_outputs=encoder_outputs, attention_mask=mask, labels=option).logits
                    scores.append(fid.token_log_likelihoods(logits, option).sum(dim=1))  # (B,)
                return losses, torch.stack(scores, dim=1)  # (B, C)
        if batch.choice_ids is None:
            return losses, None
        at_position = out.logits[torch.arange(len(batch.choice_position)), batch.choice_position]  # (B, V)
        return losses, at_position.gather(1, batch.choice_ids).float()  # (B, C)

    def eval_loss(self, batch: Batch) -> torch.Tensor:
        """The batch's mean per-example reader loss in eval mode."""
        return self.eval_outputs(batch)[0].mean()

    @torch.no_grad()
    def generate(self, batch: Batch) -> torch.Tensor:
        """Generated token ids (B, T) for the batch's reader inputs; with decoder prompts, each generation starts with
        its prompt's tokens (forced), as the original's prompt-constrained generation."""
        cfg = self.config
        allowed = None
        if batch.decoder_prompts is not None:
            prompts, everything = batch.decoder_prompts, list(range(self.reader.config.vocab_size))

            def allowed(example: int, generated: torch.Tensor) -> list[int]:
                position = generated.shape[-1] - 1  # tokens after the decoder start token
                prompt = prompts[example]
                return [prompt[position]] if position < len(prompt) else everything

        with eval_mode(self.reader):
            return fid.generate(
                self.reader,
                batch.reader_ids,
                batch.reader_mask,
                max_length=cfg.generation_max_length,
                min_length=cfg.generation_min_length,
                num_beams=cfg.generation_num_beams,
                length_penalty=cfg.generation_length_penalty,
                prefix_allowed_tokens_fn=allowed,
            )
