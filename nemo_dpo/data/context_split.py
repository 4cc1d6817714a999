"""A microbatch's share for one context-parallel rank: two mirrored chunks of every sequence.

Context parallelism (CP) spreads each sequence over the CP ranks. Under a causal
mask a token's attention costs grow with its position, so cutting a sequence
into CP consecutive pieces would give the last rank most of the work. Instead
the sequence is cut into 2·CP equal chunks and CP rank i keeps chunks i and
2·CP-1-i: an early and the mirrored late chunk, the same work on every rank.
This is the split megatron's and transformer-engine's context parallelism
assume (and what models/ring_attention.py computes attention for).

Every per-token tensor is cut alike: tokens, labels, the loss mask, the position
ids (so learned positions see each token's true position; megatron's RoPE
applies the same split to its own table), packed, the segment ids, and the masks
of per-sequence values made from the whole sequences (``value_masks``). A packed
row (megatron's ``thd`` format) is cut sequence by sequence, so each sequence's
length must be a multiple of 2·CP (batching pads it to one); ``cu_seqlens`` and
``max_seqlen`` keep describing the whole row, as megatron's packed-sequence
parameters do under CP. Per-sequence sums over a share are partial: the training
step sums them over the CP group.
"""

from dataclasses import replace

import torch

_PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


def share_indices(bounds: list, cp_rank: int, cp: int) -> torch.Tensor:
    """Positions of CP rank ``cp_rank``'s tokens in a row whose sequences span ``bounds`` ([start, ..., end])."""
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if (end - start) % (2 * cp):
            raise ValueError(
                f"a sequence of {end - start} tokens cannot be cut into 2 x model.context_parallel_size ({cp}) "
                f"equal chunks"
            )
        chunk = (end - start) // (2 * cp)
        for index in (cp_rank, 2 * cp - 1 - cp_rank):
            pieces.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
    return torch.cat(pieces)


def context_parallel_share(mb, cp_rank: int, cp: int):
    """The microbatch ``mb`` (a data.batching.Microbatch) as CP rank ``cp_rank`` of ``cp`` holds it."""
    if cp == 1:
        return mb
    bounds = mb.cu_seqlens.tolist() if mb.packed else [0, mb.tokens.shape[1]]
    index = share_indices(bounds, cp_rank, cp).to(mb.tokens.device)
    cut = {name: getattr(mb, name).index_select(1, index) for name in _PER_TOKEN if getattr(mb, name) is not None}
    if mb.value_masks is not None:
        cut["value_masks"] = {name: mask.index_select(1, index) for name, mask in mb.value_masks.items()}
    return replace(mb, **cut)
