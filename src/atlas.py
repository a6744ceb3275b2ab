"""Atlas: retrieve passages for a batch of queries, read them with FiD, and return losses or generations."""

import logging
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from src import reader as fid
from src.gold_scores import eval_mode, evalnormsum_scores, retriever_loss
from src.passages import passage_title
from src.retriever import Retriever
from src.tasks import Example

logger = logging.getLogger(__name__)

EMPTY_PASSAGE = {"id": "", "title": "", "text": ""}


@dataclass(frozen=True)
class AtlasConfig:
    """What the model needs from the options (field names are the flags')."""

    n_context: int = 1
    retriever_n_context: int = 5
    text_maxlength: int = 200
    target_maxlength: int | None = None
    encoder_format: str = "{query} title: {title} context: {text}"
    retriever_format: str = "{title} {text}"
    train_retriever: bool = False
    gold_score_mode: str = "ppmean"
    temperature_gold: float = 0.01
    temperature_score: float = 0.01
    kl_reduction: str = "mean"
    emdr_mixture: str = "token"
    compute_crossattention_stats: bool = False
    filtering_overretrieve_ratio: int = 2
    retrieve_with_rerank: bool = False
    n_to_rerank_with_retrieve_with_rerank: int = 128
    generation_max_length: int = 128
    generation_min_length: int | None = None
    generation_num_beams: int = 1
    generation_length_penalty: float = 1.0

    @classmethod
    def from_options(cls, opt) -> "AtlasConfig":
        return cls(**{f.name: getattr(opt, f.name) for f in fields(cls) if hasattr(opt, f.name)})


@dataclass
class Batch:
    """Tensors of one batch of examples with their K passages."""

    reader_ids: torch.Tensor  # (B, K, L)
    reader_mask: torch.Tensor  # (B, K, L)
    labels: torch.Tensor  # (B, T)


def format_passage(template: str, passage: dict, query: str = "") -> str:
    """Render a passage with `--encoder_format` / `--retriever_format`; the title becomes "title: section"."""
    return template.format(query=query, title=passage_title(passage), text=passage.get("text", ""))


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Pearson correlation between two (B, K) score tensors (0 where constant)."""
    x = x.float() - x.float().mean(dim=1, keepdim=True)
    y = y.float() - y.float().mean(dim=1, keepdim=True)
    denominator = (x.norm(dim=1) * y.norm(dim=1)).clamp(min=1e-12)
    return ((x * y).sum(dim=1) / denominator).mean()


def filter_own_passage(
    examples: list[Example], passages: list[list[dict]], scores: torch.Tensor, k: int
) -> tuple[list[list[dict]], torch.Tensor]:
    """Move passages whose `id` equals the instance's `metadata["id"]` behind the others (dropped when k others exist).

    When fewer than k others remain, the filtered ones refill the list at the end, with a warning, as the original.
    """
    kept_passages, kept_scores = [], []
    for ex, ps, sc in zip(examples, passages, scores.tolist()):
        own = str(ex.metadata.get("id", "\0no id"))
        order = [i for i, p in enumerate(ps) if str(p.get("id")) != own]
        if len(order) < min(k, len(ps)):
            logger.warning("filtering: fewer than %d other passages for instance %s; refilling", k, own)
        order += [i for i, p in enumerate(ps) if str(p.get("id")) == own]
        kept_passages.append([ps[i] for i in order])
        kept_scores.append([sc[i] for i in order])
    return kept_passages, torch.tensor(kept_scores, dtype=scores.dtype).reshape(scores.shape)


class Atlas(nn.Module):
    """A T5 reader (`reader.*`, stock HF names) and a Contriever retriever (`retriever.*`).

    `reader` is None in retrieve-only mode; `retriever` is None for closed-book or file-passage runs.
    """

    def __init__(
        self,
        reader: T5ForConditionalGeneration | None,
        retriever: Retriever | None,
        reader_tokenizer: PreTrainedTokenizerBase | None,
        retriever_tokenizer: PreTrainedTokenizerBase | None,
        config: AtlasConfig,
    ) -> None:
        super().__init__()
        self.reader, self.retriever = reader, retriever
        self.reader_tokenizer, self.retriever_tokenizer = reader_tokenizer, retriever_tokenizer
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def retriever_maxlength(self) -> int:
        return min(self.config.text_maxlength, self.retriever_tokenizer.model_max_length, 512)

    def _retriever_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.retriever_tokenizer(
            texts, max_length=self.retriever_maxlength, truncation=True, padding="longest", return_tensors="pt"
        )
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)  # (n, L)

    @torch.no_grad()
    def embed_queries(self, queries: list[str]) -> torch.Tensor:
        """Query embeddings for search, in eval mode: (B, D). B may be 0 (a rank with no query still searches)."""
        if not queries:
            return torch.zeros(0, self.retriever.dim, device=self.device)
        with eval_mode(self.retriever):
            return self.retriever.embed_queries(*self._retriever_tokens(queries))

    def retrieve(
        self, index, examples: list[Example], k: int, filter_by_id: bool = False
    ) -> tuple[list[list[dict]], torch.Tensor]:
        """Top-k passages and their scores (B, k) for each example's query.

        Collective: every rank calls it equally often, with an empty list when it has no example left. With
        `filter_by_id` (tasks whose data is the corpus itself), over-retrieve and drop the instance's own passage.
        With --retrieve_with_rerank, retrieve n_to_rerank and keep the k best under the current passage encoder.
        """
        query_emb = self.embed_queries([ex.query for ex in examples])  # (B, D)
        n = k * self.config.filtering_overretrieve_ratio if filter_by_id else k
        if self.config.retrieve_with_rerank:
            n = max(n, self.config.n_to_rerank_with_retrieve_with_rerank)
        scores, rows = index.search(query_emb, n)  # (B, n), (B, n)
        passages = index.passages(rows)
        if self.config.retrieve_with_rerank and examples:
            scores = self.rescore(query_emb, passages)  # (B, n) with fresh passage embeddings
            order = scores.argsort(dim=1, descending=True, stable=True)  # (B, n)
            scores = scores.gather(1, order)
            passages = [[ps[j] for j in row] for ps, row in zip(passages, order.tolist())]
        if filter_by_id:
            passages, scores = filter_own_passage(examples, passages, scores, k)
        return [ps[:k] for ps in passages], scores[:, :k]

    def passages_for(
        self, index, examples: list[Example], k: int, filter_by_id: bool = False
    ) -> tuple[list[list[dict]], torch.Tensor | None]:
        """The instances' own passages when there is no index (closed book, --use_file_passages), else retrieve."""
        if index is None:
            return [ex.passages or [] for ex in examples], None
        return self.retrieve(index, examples, k, filter_by_id)

    @torch.no_grad()
    def rescore(self, query_emb: torch.Tensor, passages: list[list[dict]]) -> torch.Tensor:
        """q.d with the passages re-embedded by the current passage encoder (eval mode): (B, n)."""
        B, n = len(passages), len(passages[0])
        texts = [format_passage(self.config.retriever_format, p) for ps in passages for p in ps]
        with eval_mode(self.retriever):
            passage_emb = self.retriever.embed_passages(*self._retriever_tokens(texts)).view(B, n, -1)  # (B, n, D)
        return torch.einsum("bd,bnd->bn", query_emb, passage_emb).float()  # (B, n)

    @staticmethod
    def _passage_lists(passages: list[list[dict]], k: int) -> list[list[dict]]:
        """Exactly k passages per example: truncate, or pad with empty passages when fewer are available."""
        return [(list(ps) + [EMPTY_PASSAGE] * k)[:k] for ps in passages]

    def _reader_tokens(self, examples: list[Example], passages: list[list[dict]], k: int):
        """Reader input ids and mask (B, k, L) of each query with its first k passages, on the model's device."""
        texts = [
            [format_passage(self.config.encoder_format, p, ex.query) for p in ps]
            for ex, ps in zip(examples, self._passage_lists(passages, k))
        ]
        ids, mask = fid.tokenize_passages(self.reader_tokenizer, texts, self.config.text_maxlength)
        return ids.to(self.device), mask.to(self.device)

    def batch(self, examples: list[Example], passages: list[list[dict]], with_targets: bool = True) -> Batch:
        """Tokenise queries with their first n_context passages for the reader, and the targets."""
        ids, mask = self._reader_tokens(examples, passages, self.config.n_context)
        labels = (
            fid.tokenize_targets(self.reader_tokenizer, [ex.target for ex in examples], self.config.target_maxlength)
            if with_targets
            else torch.zeros(len(examples), 0, dtype=torch.long)
        )
        return Batch(ids, mask, labels.to(self.device))

    def forward(
        self, examples: list[Example], passages: list[list[dict]], train_retriever: bool = True
    ) -> dict[str, torch.Tensor]:
        """Training losses: `reader_loss`, and `retriever_loss` when the retriever trains (then `loss` sums both).

        `train_retriever=False` skips the retriever loss (while it is frozen by --freeze_retriever_steps).
        With --compute_crossattention_stats, `corr/<mode>` holds the Pearson correlation of the gold scores with the
        attention-derived (evalnormsum) scores.
        """
        batch = self.batch(examples, passages)
        reader_loss = fid.forward(self.reader, batch.reader_ids, batch.reader_mask, batch.labels).loss
        losses = {"reader_loss": reader_loss, "loss": reader_loss}
        if train_retriever and self.config.train_retriever and self.retriever is not None:
            losses.update(self.retriever_loss(examples, passages, batch))
            losses["loss"] = reader_loss + losses["retriever_loss"]
        return losses

    def retriever_loss(
        self, examples: list[Example], passages: list[list[dict]], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """Distil the reader's gold scores over all retriever_n_context passages into the retriever's scores."""
        k = self.config.retriever_n_context
        passage_lists = self._passage_lists(passages, k)
        query_emb = self.retriever.embed_queries(*self._retriever_tokens([ex.query for ex in examples]))  # (B, D)
        retriever_texts = [format_passage(self.config.retriever_format, p) for ps in passage_lists for p in ps]
        passage_emb = self.retriever.embed_passages(*self._retriever_tokens(retriever_texts))  # (B*K, D)
        passage_emb = passage_emb.view(len(examples), k, -1)  # (B, K, D)
        retriever_scores = torch.einsum("bd,bkd->bk", query_emb, passage_emb)  # (B, K)
        if k == self.config.n_context:  # the reader's batch already holds these passages: tokenise them once
            ids, mask = batch.reader_ids, batch.reader_mask
        else:
            ids, mask = self._reader_tokens(examples, passages, k)
        reader_inputs = (ids, mask, batch.labels)
        loss, gold = retriever_loss(
            self.config.gold_score_mode,
            self.reader,
            reader_inputs,
            retriever_scores,
            self.retriever.dim,
            self.config.temperature_score,
            self.config.temperature_gold,
            self.config.kl_reduction,
            self.config.emdr_mixture,
        )
        out = {"retriever_loss": loss}
        if self.config.compute_crossattention_stats:
            reference = retriever_scores.detach() if gold is None else gold  # emdr has no gold: use the retriever
            attention = evalnormsum_scores(self.reader, *reader_inputs)  # (B, K)
            out[f"corr/{self.config.gold_score_mode}"] = pearson(reference, attention)
        return out

    @torch.no_grad()
    def eval_loss(self, examples: list[Example], passages: list[list[dict]]) -> torch.Tensor:
        """Reader loss on the batch in eval mode (the `eval_loss` metric)."""
        batch = self.batch(examples, passages)
        with eval_mode(self.reader):
            return fid.forward(self.reader, batch.reader_ids, batch.reader_mask, batch.labels).loss

    @torch.no_grad()
    def generate(self, examples: list[Example], passages: list[list[dict]]) -> list[str]:
        """Decoded generations, one per example (special tokens such as <extra_id_0> stripped)."""
        batch = self.batch(examples, passages, with_targets=False)
        with eval_mode(self.reader):
            tokens = fid.generate(
                self.reader,
                batch.reader_ids,
                batch.reader_mask,
                max_length=self.config.generation_max_length,
                min_length=self.config.generation_min_length,
                num_beams=self.config.generation_num_beams,
                length_penalty=self.config.generation_length_penalty,
            )
        return [text.strip() for text in self.reader_tokenizer.batch_decode(tokens, skip_special_tokens=True)]
