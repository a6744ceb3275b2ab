"""Fusion-in-Decoder over a stock `T5ForConditionalGeneration`.

The encoder reads each (query, passage) pair alone as a (B*K, L) batch; the decoder cross-attends over all of them at
once as (B, K*L). Shapes are read from the tensors on every call: nothing is stored between calls.
"""

import logging

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from src.errors import UserError

logger = logging.getLogger(__name__)

# --reader_attention: transformers' attention implementations for T5; auto keeps the model's default (sdpa in
# transformers 5.x; 4.x T5 has eager only).
ATTENTION = ("auto", "sdpa", "eager")


def load_reader(name_or_path: str, dropout: float | None = None) -> T5ForConditionalGeneration:
    """A T5 reader from a hub name (when cached) or a local HF directory, with untied lm_head where the config says."""
    kwargs = {} if dropout is None else {"dropout_rate": dropout}
    model = T5ForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
    return untie_lm_head(model)


def reader_from_config(config: T5Config) -> T5ForConditionalGeneration:
    """A randomly initialised reader built from a config (tests, checkpoint loading without hub weights)."""
    return untie_lm_head(T5ForConditionalGeneration(config))


def untie_lm_head(model: T5ForConditionalGeneration) -> T5ForConditionalGeneration:
    """Give lm_head its own Parameter for untied-embedding configs (T5 v1.1 / lm-adapt, as Atlas checkpoints are).

    transformers 5.x always ties lm_head to `shared` when building from a config (it keeps the v1.1 marker as
    `scale_decoder_outputs=False`), so a later load_state_dict of an untied checkpoint would silently overwrite
    `shared` with the lm_head values. 4.x keeps the marker in `tie_word_embeddings`.
    """
    config = model.config
    untied = not getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
    if untied:
        if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def set_attention(model: T5ForConditionalGeneration, implementation: str) -> None:
    """Run every attention layer of the reader with transformers' ``implementation`` (one of ATTENTION)."""
    if implementation in ("auto", model.config._attn_implementation):
        return
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as err:  # e.g. transformers 4.x T5, which has no sdpa path
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--reader_attention {implementation}: {reason}") from None


def compile_encoder(model: T5ForConditionalGeneration) -> None:
    """torch.compile each encoder block in place (`Module.compile`: module names, state-dict keys and checkpoints do
    not change). The encoder reads B*K passages and does most of a FiD step's work; the decoder stays eager, as
    generation calls it with another shape at every step."""
    for block in model.encoder.block:
        block.compile()


def load_reader_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(name_or_path)


def encode(model: T5ForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the encoder on every passage alone: (B, K, L) -> encoder outputs (B, K*L, D) and mask (B, K*L)."""
    B, K, L = input_ids.shape
    hidden = model.encoder(
        input_ids=input_ids.reshape(B * K, L), attention_mask=attention_mask.reshape(B * K, L), return_dict=True
    ).last_hidden_state  # (B*K, L, D)
    return BaseModelOutput(last_hidden_state=hidden.reshape(B, K * L, -1)), attention_mask.reshape(B, K * L)


def forward(
    model: T5ForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
):
    """FiD forward with teacher forcing; returns the transformers output (`.loss` is the mean token cross-entropy)."""
    encoder_outputs, mask = encode(model, input_ids, attention_mask)
    return model(encoder_outputs=encoder_outputs, attention_mask=mask, labels=labels, return_dict=True)


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log p(label): (n, T, V), (n, T) -> (n, T), zero where the label is -100."""
    logprobs = -F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return logprobs  # (n, T)


@torch.no_grad()
def generate(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_length: int = 128,
    min_length: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    prefix_allowed_tokens_fn=None,
) -> torch.Tensor:
    """Generated token ids (B, T) from the FiD encoding of (B, K, L) inputs."""
    encoder_outputs, mask = encode(model, input_ids, attention_mask)
    return model.generate(
        encoder_outputs=encoder_outputs,
        attention_mask=mask,
        max_length=max_length,
        min_length=min_length or 0,
        num_beams=num_beams,
        length_penalty=length_penalty,
        do_sample=False,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
    )
