"""Contriever: a transformers BERT-family encoder with masked mean pooling, tied or untied for queries/passages."""

import copy
import logging

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class UncenteredLayerNorm(nn.Module):
    """The original Atlas retriever's LayerNorm: divides by sqrt(E[x^2] + eps) instead of sqrt(Var[x] + eps).

    Released Atlas retrievers and indices were computed with it; keeps the `weight`/`bias` names of nn.LayerNorm.
    """

    def __init__(self, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = layer_norm.weight
        self.bias = layer_norm.bias
        self.eps = layer_norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean = x32.mean(dim=-1, keepdim=True)
        second_moment = x32.pow(2).mean(dim=-1, keepdim=True)  # not centred: this is the original's formula
        out = (x32 - mean) * torch.rsqrt(second_moment + self.eps)
        return (out * self.weight.float() + self.bias.float()).type_as(x)


def use_uncentered_layernorm(model: nn.Module) -> int:
    """Swap every nn.LayerNorm of `model` for UncenteredLayerNorm (sharing parameters); returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    count = 0
    for parent, name, child in swaps:
        if isinstance(child, nn.LayerNorm):
            setattr(parent, name, UncenteredLayerNorm(child))
            count += 1
    return count


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: (n, L, D), (n, L) -> (n, D). Padding contributes nothing."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (n, L, 1)
    summed = (hidden * mask).sum(dim=1)  # (n, D)
    return summed / mask.sum(dim=1).clamp(min=1.0)


def encode(encoder: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Contriever embedding (unnormalised): (n, L) token ids -> (n, D)."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, L, D)
    return mean_pool(hidden, attention_mask)


def load_encoder(name_or_path: str, uncentered_layernorm: bool = False) -> PreTrainedModel:
    """A BERT-family encoder from a hub name (when cached) or a local HF directory, without pooling layer."""
    try:
        encoder = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False)
    except TypeError:  # encoder families whose constructor has no pooling switch
        encoder = AutoModel.from_pretrained(name_or_path)
    if uncentered_layernorm:
        logger.info("retriever: %d LayerNorms use the original's uncentered formula", use_uncentered_layernorm(encoder))
    return encoder


def compile_layers(encoder: PreTrainedModel) -> int:
    """torch.compile each transformer layer of a BERT-family encoder in place (`Module.compile`: names and state-dict
    keys unchanged); returns how many (0 for a family without `encoder.layer`)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None) or []
    for layer in layers:
        layer.compile()
    return len(layers)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(name_or_path)


class Retriever(nn.Module):
    """Dual encoder. Tied: one `contriever` embeds queries and passages (checkpoint keys `contriever.*`).

    Untied (query-side training): `query_contriever` trains, `passage_contriever` is a frozen copy kept in eval mode
    (keys `query_contriever.*` / `passage_contriever.*`), so stored passage embeddings stay valid.
    """

    def __init__(self, encoder: PreTrainedModel, query_side: bool = False) -> None:
        super().__init__()
        self.query_side = query_side
        if query_side:
            self.query_contriever = encoder
            self.passage_contriever = copy.deepcopy(encoder)  # a real copy: the original shared one module here
            self.passage_contriever.requires_grad_(False)
        else:
            self.contriever = encoder

    @property
    def query_encoder(self) -> PreTrainedModel:
        return self.query_contriever if self.query_side else self.contriever

    @property
    def passage_encoder(self) -> PreTrainedModel:
        return self.passage_contriever if self.query_side else self.contriever

    @property
    def dim(self) -> int:
        return self.query_encoder.config.hidden_size

    @property
    def uncentered_layernorm(self) -> bool:
        """Whether the encoders use the original's uncentered LayerNorm (what a saved index records)."""
        return any(isinstance(m, UncenteredLayerNorm) for m in self.query_encoder.modules())

    def train(self, mode: bool = True) -> "Retriever":
        super().train(mode)
        if self.query_side:
            self.passage_contriever.eval()  # frozen: no dropout, ever
        return self

    def embed_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encode(self.query_encoder, input_ids, attention_mask)

    def embed_passages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.query_side:
            with torch.no_grad():
                return encode(self.passage_contriever, input_ids, attention_mask)
        return encode(self.contriever, input_ids, attention_mask)


class PassageEmbedder(nn.Module):
    """`forward(input_ids, attention_mask) -> (n, D)` with the retriever's passage encoder, for index building.

    Not registered inside Atlas, so it adds no checkpoint keys.
    """

    def __init__(self, retriever: Retriever) -> None:
        super().__init__()
        self.retriever = retriever

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.retriever.embed_passages(input_ids, attention_mask)
