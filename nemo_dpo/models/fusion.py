"""RMSNorm, SwiGLU and RoPE of the local layer spec as fused kernels (``torch.compile``), when they pay.

Without transformer-engine, megatron's local spec runs its norms, its MLP
activation and its rotary embedding as chains of eager PyTorch operations:
RMSNorm alone is a square, a mean, an rsqrt and two products, each a pass over
the activations in forward and more in backward; RoPE takes a cosine and a sine
of the table, a negation, two concatenations, two products and a sum, for the
query and again for the key, and in a packed row first rebuilds the table
sequence by sequence. That elementwise work is most of what is not a matmul or
attention in a step. ``torch.compile`` (inductor: C++ kernels on CPU, built with
the machine's compiler; Triton on GPU) turns each chain into one kernel per
direction, computing the same function (to rounding: inductor may sum in
another order). Compiling costs time once per process and shape family
(seconds to tens of seconds; inductor caches its kernels on disk, so later runs
on the machine mostly load them), and pays back on models whose activations are
large. ``model.fused_elementwise``: ``auto`` (the default) fuses when the
hidden size is at least :data:`AUTO_MIN_HIDDEN` and leaves tiny models eager,
where compiling would cost more than it saves; ``true`` or ``false`` decide.
With transformer-engine (GPU) its own fused layers are used instead.

RoPE is fused by :class:`FusedRotarySelfAttention`, megatron's ``SelfAttention``
that rotates the query and key in one compiled kernel as soon as they are
computed, and hands megatron no table to rotate them again. It does so where
megatron's own rotation is that same formula row by row: a rotary table with a
row per token (unpacked rows, and packed rows at their position ids,
models/gpt.py). Anything else (context parallelism, whose ranks hold parts of
sequences) keeps megatron's path.

The same setting decides the chunked output layer's log-softmax tail
(:func:`fuses_log_probs`, computed in losses/logprobs.py), which does not depend
on the layer spec.
"""

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule

from nemo_dpo.compiled import compiled
from nemo_dpo.ranges import Either, Flag, OneOf

RANGES = {
    "model.fused_elementwise": Either(first=OneOf(choices=("auto",)), first_is="by model size",
                                      second=Flag(), second_is="always or never"),
}
AUTO_MIN_HIDDEN = 512


def wanted(model_cfg) -> bool:
    """Whether ``model.fused_elementwise`` asks for the fused norms, SwiGLU and RoPE for this model."""
    setting = model_cfg.fused_elementwise
    if setting == "auto":
        return model_cfg.hidden_size >= AUTO_MIN_HIDDEN
    return setting


def fused_parts(model_cfg) -> list:
    """What :func:`wanted` fuses in this model: its RMSNorm, its SwiGLU and its RoPE, where it has them."""
    if not wanted(model_cfg):
        return []
    return [part for part, present in (("RMSNorm", model_cfg.normalization == "RMSNorm"),
                                       ("SwiGLU", model_cfg.activation == "swiglu"),
                                       ("RoPE", fuses_rope(model_cfg))) if present]


def fuses_log_probs(model_cfg, precision: str) -> bool:
    """Whether the chunked output layer computes its log-softmax tail fused (losses/logprobs.py): asked for
    (:func:`wanted`), bf16 logits (in fp32 the eager tail is as fast: it makes no fp32 copies), and the whole
    vocabulary on each rank (tensor parallel size 1)."""
    return (wanted(model_cfg) and precision == "bf16" and model_cfg.tensor_model_parallel_size == 1
            and model_cfg.log_prob_chunk_size > 0)


def fuses_rope(model_cfg) -> bool:
    """Whether the layers rotate their queries and keys with :class:`FusedRotarySelfAttention`: RoPE fused
    (:func:`wanted`), and no context parallelism (its rows hold parts of sequences; megatron rotates those)."""
    return wanted(model_cfg) and model_cfg.position_embedding_type == "rope" and model_cfg.context_parallel_size == 1


def _rms_norm(x, normalized_shape, weight, eps):
    return F.rms_norm(x, normalized_shape, weight, eps)


def _swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate(x, cos, sin):
    """x cos + rotate_half(x) sin: megatron's RoPE (its halves layout; the table covers the whole head)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _rope(query, key, freqs, mscale: float):
    cos, sin = torch.cos(freqs) * mscale, torch.sin(freqs) * mscale
    return (_rotate(query.float(), cos, sin).to(query.dtype),  # in fp32, rounded once
            _rotate(key.float(), cos, sin).to(key.dtype))


class FusedRMSNorm(torch.nn.RMSNorm):
    """PyTorch's RMSNorm (same parameters, same state dict) computed by one compiled kernel per direction."""

    def forward(self, x):
        return compiled(_rms_norm)(x, self.normalized_shape, self.weight, self.eps)


class FusedSwiGLU(MegatronModule):
    """silu(first half) * second half of the last dimension (fc1's [gate, up] layout), compiled; no parameters."""

    def __init__(self, config):
        super().__init__(config=config)

    def forward(self, x):
        return compiled(_swiglu)(x)


class FusedRotarySelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` (same constructor, parameters and state dict) with the query and key rotated by
    one compiled kernel per direction, right after the q/k/v projection (and the q/k norms, where the model has
    them), where megatron would rotate them. ``forward`` keeps the table for that and passes megatron none; a
    table megatron would apply otherwise (not a row per token) goes to megatron as it is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mscale = _yarn_get_concentration_factor_from_config(self.config)
        self.freqs = None  # the rotary table, during forward only

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        tokens = hidden_states.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel
                                           else 1)  # the q/k/v projection gathers the sequence under SP
        if not isinstance(rotary_pos_emb, torch.Tensor) or rotary_pos_emb.shape[0] != tokens:
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        self.freqs = rotary_pos_emb
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self.freqs = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, *rest = super().get_query_key_value_tensors(*args, **kwargs)
        if self.freqs is not None:  # [s, b, heads, dim] each; the table [s, 1, 1, dim]
            query, key = compiled(_rope)(query, key, self.freqs, self.mscale)
        return (query, key, *rest)
