"""Core attention for the local (no transformer-engine) layer spec: PyTorch's fused SDPA.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s]
scores and probabilities and keeps both for backward; it also refuses packed
sequences. This module computes the same causal softmax attention with
``torch.nn.functional.scaled_dot_product_attention`` (flash kernels on CPU and
GPU: O(s) memory, nothing quadratic saved) and takes megatron's ``thd`` packed
format: a microbatch as one row of concatenated sequences, ``cu_seqlens`` marking
where each starts, attention never crossing a boundary. transformer-engine's
``TEDotProductAttention`` takes the same ``packed_seq_params`` on GPU. Under
context parallelism the sequences are spread over the CP group and attention is
ring attention (models/ring_attention.py), packed or not.

A packed row with shared prompts (data/batching.py) holds each pair's prompt
once, followed by both responses: :class:`SharedPromptParams` says where each
whole sequence's tokens are in the row. Attention gathers every sequence's
queries, keys and values from the row, attends within each sequence, and gives
each row token the output of its first sequence (the prompt's, in the chosen
sequence, is the same as in the rejected one). That row-order output is a copy
of what the fused kernels keep for backward, and the output projection would keep
it too: :func:`release_after_projection` frees it once the projection has run and
gathers it again from the kernels' outputs when the gradient comes back.
"""

import contextlib
import itertools
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from nemo_dpo.distributed import layout
from nemo_dpo.models.released_output import ReleasesOutput, release_after
from nemo_dpo.models.ring_attention import Ring, ring_attention


@dataclass
class SharedPromptParams(PackedSeqParams):
    """A packed row with shared prompts: ``cu_seqlens_q``/``_kv`` span the whole row (RoPE takes each token's
    position from the model's position ids there, models/gpt.py); the sequences are ``sequence_index`` [sequence
    tokens] (where each token is in the row) cut at ``sequence_bounds``, and ``row_index`` [row tokens] is where each
    row token first appears in them."""

    sequence_index: torch.Tensor = None
    sequence_bounds: list = None
    row_index: torch.Tensor = None


class SDPAttention(ReleasesOutput, MegatronModule):
    """Drop-in for megatron's ``DotProductAttention`` (same constructor and forward signature)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float = None,
        softmax_scale: float = None,
        cp_comm_type: str = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.ring = None
        if config.context_parallel_size > 1:
            if self.dropout > 0:
                raise ValueError("ring attention (context parallelism without transformer-engine) has no attention "
                                 "dropout: set model.attention_dropout=0")
            self.ring = Ring(layout.current())
        self.releases_shared_output = False  # set by release_after_projection

    def _sdpa(self, query, key, value):
        """Causal attention over [s, b, heads, dim] inputs; returns the kernel's own [b, heads, s, dim] output (the
        tensor it keeps for backward)."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, dim]
        dropout = self.dropout if self.training else 0.0
        # Dropout draws from the model-parallel RNG stream (different per TP rank), as megatron's does.
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                enable_gqa=self.groups != self.heads,
            )

    def _attend(self, query, key, value):
        """Causal attention over [s, b, heads, dim] inputs; returns [s, b, heads * dim]."""
        return _hidden(self._sdpa(query, key, value))

    def _ring_attend(self, query, key, value, packed_seq_params):
        """This rank's share of the sequences, attending across the CP group; returns [s, b, heads * dim]."""
        if packed_seq_params is None:
            bounds = [0, query.shape[0]]
        else:  # one row of sequences, each cut alike over the CP ranks; cu_seqlens count whole sequences
            bounds = [start // self.ring.size for start in packed_seq_params.cu_seqlens_q.tolist()]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        out = ring_attention(query, key, value, bounds, self.softmax_scale, self.ring).flatten(2)
        return out if packed_seq_params is None else out.squeeze(1)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: PackedSeqParams = None,
    ):
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("SDPAttention is causal; pass packed_seq_params, not an attention mask or bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention packs in 'thd' format, got {packed_seq_params.qkv_format!r}")
        if isinstance(packed_seq_params, SharedPromptParams):  # the sequences gathered from the row: copies
            index, bounds = packed_seq_params.sequence_index, packed_seq_params.sequence_bounds
            query, key, value = (x.index_select(0, index) for x in (query, key, value))
            outs = self._sequence_outputs(query, key, value, bounds)
            rows = partial(_row_order, row_index=packed_seq_params.row_index)
            return self.releasable(rows, *outs) if self.releases_shared_output else rows(*outs)
        # Attention keeps its inputs for backward. megatron hands over key and value as views into the
        # linear_qkv output (query is a copy; RoPE makes key one too): keeping a view would keep the
        # whole [s, b, (heads + 2 groups) x dim] tensor alive until backward. A copy keeps only its own part.
        query, key, value = (x.contiguous() for x in (query, key, value))
        if self.ring is not None:
            return self._ring_attend(query, key, value, packed_seq_params)
        if packed_seq_params is None:
            return self._attend(query, key, value)
        return self._attend_packed(query, key, value, packed_seq_params.cu_seqlens_q.tolist())

    def _sequence_outputs(self, query, key, value, bounds) -> list:
        """Causal attention within each sequence of a row; query/key/value: [tokens, heads, dim], ``bounds``: where
        each sequence starts, then the end. Returns the kernel's output per sequence, [1, heads, s_i, dim].

        Consecutive sequences of one length (full-length or truncated pairs) run as one batch of the kernel, one
        call instead of one per sequence: 8 sequences of 512 tokens took 5-10% less time here on CPU, forward and
        backward, in bf16 and fp32."""
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        runs = [(length, len(list(run))) for length, run in itertools.groupby(lengths)]
        # Split, not sliced: the pieces' gradients then join in one concatenation, where each slice's would be
        # written into a zero tensor of the whole row and those summed (work growing with the sequences per row).
        sizes = [bounds[0], *(length * count for length, count in runs), query.shape[0] - bounds[-1]]
        pieces = list(zip(*(x.split(sizes) for x in (query, key, value))))[1:-1]
        outs = []
        for (length, count), (q, k, v) in zip(runs, pieces):
            if length > 0:  # [count x length, heads, dim] -> [length, count, heads, dim]
                batch = self._sdpa(*(x.view(count, length, *x.shape[1:]).transpose(0, 1) for x in (q, k, v)))
                outs += batch.split(1)
        return outs

    def _attend_packed(self, query, key, value, bounds):
        """:meth:`_sequence_outputs` as the row's [tokens, heads * dim]."""
        return _joined(self._sequence_outputs(query, key, value, bounds))


def _hidden(out):
    """An attention output [b, heads, s, dim] as megatron's [s, b, heads * dim]."""
    return out.permute(2, 0, 1, 3).flatten(2)


def _joined(outs):
    """The sequences' outputs ([1, heads, s_i, dim] each) back to back, [tokens, heads * dim]."""
    return torch.cat([_hidden(out) for out in outs]).squeeze(1)


def _row_order(*outs, row_index):
    """The sequences' outputs as the shared-prompt row's tokens [row tokens, heads * dim]."""
    return _joined(outs).index_select(0, row_index)


def release_after_projection(self_attention) -> None:
    """Let ``self_attention``'s :class:`SDPAttention` free a shared-prompt row's output once the output projection
    (and a LoRA adapter beside it) has read it: recomputed from the fused kernels' own outputs, kept anyway, when
    the gradient reaches the attention's output. Not where megatron recomputes core attention or whole layers in
    backward (its recomputation would not come back through this hook)."""
    self_attention.core_attention.releases_shared_output = True
    release_after(self_attention, self_attention.core_attention)
