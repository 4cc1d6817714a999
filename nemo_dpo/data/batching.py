"""Deterministic pair ordering, data-parallel sharding and padding into microbatches.

Everything is counted in preference PAIRS; a pair's chosen and rejected
sequences always travel together (adjacent rows) because the DPO loss compares
them. A :class:`Microbatch` is the written-down contract between batching, the
model step, the reference and the losses.
"""

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from nemo_dpo.data.context_split import context_parallel_share
from nemo_dpo.data.preference_dataset import TokenizedPair
from nemo_dpo.ranges import Integer

RANGES = {
    "model.micro_batch_size": Integer(ge=1),
    "model.global_batch_size": Integer(ge=1),
}


@dataclass
class Microbatch:
    """Whole pairs as model input; sequences are chosen/rejected interleaved (2i chosen, 2i+1 rejected of pair i).

    Unpacked, each row is one sequence, right-padded. Packed (``packed``), the
    microbatch is ONE row of its sequences back to back (megatron's ``thd``
    format), described by ``segment_ids``, ``cu_seqlens`` and ``max_seqlen``.
    Under context parallelism the [rows, S] tensors hold this CP rank's share of
    every sequence (data/context_split.py); ``cu_seqlens`` and ``max_seqlen`` still
    describe the whole row, as megatron's packed-sequence parameters expect.

    With shared prompts (collate_shared_prompt_microbatches) the model's row holds each pair's
    prompt once: ``tokens`` and ``position_ids`` are that row, while ``labels``,
    ``loss_mask``, ``segment_ids``, ``cu_seqlens`` and ``max_seqlen`` describe the
    sequences whole, back to back, as a packed row without sharing would;
    ``sequence_index`` and ``row_index`` map between the two.
    """

    tokens: torch.Tensor  # [rows, S] int64 input ids
    labels: torch.Tensor  # [rows, S] the token each position predicts
    loss_mask: torch.Tensor  # [rows, S] float: 1 where the label is a response token (EOS included)
    position_ids: torch.Tensor  # [rows, S]; packed: restarting at 0 for every sequence
    gt_rewards: torch.Tensor  # [sequences] the data's rewards (RPO losses)
    packed: bool = False
    segment_ids: torch.Tensor | None = None  # packed: [1, S] the sequence of each token (padding: one more)
    cu_seqlens: torch.Tensor | None = None  # packed: [segments + 1] int32 start of each segment, then S
    max_seqlen: int = 0  # packed: the longest segment
    reference: dict | None = None  # {value: [sequences]} the reference's per-sequence values a loss asks for (set by the reference)
    # {value: [rows, S]} masks of per-sequence values summed over other tokens than the response's, made from the
    # whole sequences before a context-parallel split (set by the Microbatcher's ``value_masks``; None: not made)
    value_masks: dict | None = None
    sequence_index: torch.Tensor | None = None  # shared prompts: [sequence tokens] where each is in the model's row
    row_index: torch.Tensor | None = None  # shared prompts: [row tokens] where each first appears in the sequences

    @property
    def num_sequences(self) -> int:
        return self.gt_rewards.shape[0]

    def to(self, device) -> "Microbatch":
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        if self.value_masks is not None:
            moved["value_masks"] = {name: mask.to(device) for name, mask in self.value_masks.items()}
        return replace(self, **moved)


class Microbatcher:
    """A global batch of pairs -> this data-parallel rank's microbatches on the compute device.

    With context parallelism (``cp`` > 1) each microbatch is cut to this CP rank's
    share (data/context_split.py): rows are padded to a multiple of 2·CP, and in a
    packed row every sequence is. ``pad_multiple``: what row lengths are rounded up to.
    ``value_masks``: Microbatch -> ``{value: mask}``, the masks the loss's per-sequence
    values need, made from each whole microbatch before it is cut (None: none).
    ``share_prompts``: packed rows hold each pair's prompt once (collate_shared_prompt_microbatches).
    """

    def __init__(self, micro_batch_size: int, packing: bool, pad_id: int, dp_rank: int, dp: int, device,
                 cp_rank: int = 0, cp: int = 1, pad_multiple: int = 8, value_masks=None, share_prompts: bool = False):
        if share_prompts and cp > 1:
            raise ValueError("shared prompts need whole sequences on each rank: not with context parallelism")
        self.micro_batch_size, self.packing, self.pad_id = micro_batch_size, packing, pad_id
        self.share_prompts = share_prompts
        self.dp_rank, self.dp, self.device = dp_rank, dp, device
        self.value_masks = value_masks
        self.cp_rank, self.cp = cp_rank, cp
        self.sequence_multiple = 2 * cp if cp > 1 else 1
        self.pad_multiple = math.lcm(pad_multiple, self.sequence_multiple)

    def local(self, items: list) -> list:
        """This DP rank's share of a global batch (of pairs, indices, or per-pair rows)."""
        return dp_shard(items, self.dp_rank, self.dp)

    def __call__(self, global_pairs: list) -> list:
        pairs = self.local(global_pairs)
        if self.packing and self.share_prompts:
            microbatches = collate_shared_prompt_microbatches(pairs, self.micro_batch_size, self.pad_id,
                                                              self.pad_multiple)
        elif self.packing:
            microbatches = collate_packed_microbatches(pairs, self.micro_batch_size, self.pad_id, self.pad_multiple,
                                                       self.sequence_multiple)
        else:
            microbatches = collate_microbatches(pairs, self.micro_batch_size, self.pad_id,
                                                pad_multiple=self.pad_multiple)
        if self.value_masks is not None:
            microbatches = [replace(mb, value_masks=self.value_masks(mb)) for mb in microbatches]
        return [context_parallel_share(mb, self.cp_rank, self.cp).to(self.device) for mb in microbatches]


def check_batch_sizes(micro_batch_size: int, global_batch_size: int, dp: int) -> None:
    """A global batch must split into whole microbatches on every DP rank (ValueError naming the keys)."""
    per_step = micro_batch_size * dp
    if global_batch_size % per_step != 0:
        raise ValueError(
            f"model.global_batch_size ({global_batch_size}) is not divisible by "
            f"model.micro_batch_size ({micro_batch_size}) x data-parallel size ({dp}) = {per_step}"
        )


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_pairs) that depends only on (seed, epoch), identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_pairs).tolist()


def global_batches(num_pairs: int, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Consecutive chunks of the epoch order; the incomplete last batch is dropped."""
    if not 1 <= global_batch_size <= num_pairs:
        raise ValueError(
            f"global_batch_size must be between 1 and the number of pairs ({num_pairs}), got {global_batch_size}"
        )
    order = epoch_order(num_pairs, seed, epoch)
    num_batches = num_pairs // global_batch_size
    return [order[i * global_batch_size : (i + 1) * global_batch_size] for i in range(num_batches)]


def dp_shard(batch: list[int], dp_rank: int, dp_size: int) -> list[int]:
    """The contiguous block `dp_rank` of `dp_size` equal parts of a global batch."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if len(batch) % dp_size:
        raise ValueError(f"batch of {len(batch)} pairs is not divisible by data-parallel size {dp_size}")
    shard = len(batch) // dp_size
    return batch[dp_rank * shard : (dp_rank + 1) * shard]


def round_up(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def collate_microbatches(
    pairs: list[TokenizedPair],
    micro_batch_size: int,
    pad_id: int,
    pad_to: int | None = None,
    pad_multiple: int = 8,
) -> list[Microbatch]:
    """Pad `pairs` to one common length S and split them into microbatches of `micro_batch_size` pairs.

    Rows are interleaved (2i = chosen of pair i, 2i+1 = rejected). One S for
    the whole call keeps tensor shapes identical across the microbatches of a
    step, which pipeline parallelism requires.
    """
    if micro_batch_size < 1 or not pairs or len(pairs) % micro_batch_size:
        raise ValueError(
            f"number of pairs ({len(pairs)}) must be a positive multiple of micro_batch_size ({micro_batch_size})"
        )
    rows = [(p.prompt, side) for p in pairs for side in (p.chosen, p.rejected)]
    longest = max(len(prompt) + len(response) for prompt, response in rows)
    if pad_to is None:
        seq_len = round_up(longest, pad_multiple)
    elif longest > pad_to:
        raise ValueError(f"a sequence of {longest} tokens does not fit pad_to={pad_to}")
    else:
        seq_len = pad_to

    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), seq_len), dtype=torch.float)
    for row, (prompt, response) in enumerate(rows):
        _place(tokens, labels, loss_mask, row, 0, prompt, response)
    position_ids = torch.arange(seq_len, dtype=torch.long).repeat(len(rows), 1)
    gt_rewards = torch.tensor([r for p in pairs for r in (p.chosen_reward, p.rejected_reward)], dtype=torch.float)

    rows_per_micro = 2 * micro_batch_size
    return [
        Microbatch(
            tokens=tokens[start : start + rows_per_micro],
            labels=labels[start : start + rows_per_micro],
            loss_mask=loss_mask[start : start + rows_per_micro],
            position_ids=position_ids[start : start + rows_per_micro],
            gt_rewards=gt_rewards[start : start + rows_per_micro],
        )
        for start in range(0, len(rows), rows_per_micro)
    ]


def _place(tokens, labels, loss_mask, row: int, start: int, prompt: list, response: list) -> int:
    """Write one sequence at ``start`` of ``row``; returns where it ends.

    Position t predicts token t+1, so the response's tokens (and EOS) are the
    targets at positions len(prompt)-1 ... end-2; the last position predicts nothing.
    """
    sequence = torch.tensor(prompt + response, dtype=torch.long)
    end = start + len(sequence)
    tokens[row, start:end] = sequence
    labels[row, start : end - 1] = sequence[1:]
    loss_mask[row, start + max(len(prompt) - 1, 0) : end - 1] = 1.0
    return end


def collate_packed_microbatches(pairs: list, micro_batch_size: int, pad_id: int, pad_multiple: int = 8,
                                sequence_multiple: int = 1) -> list:
    """Microbatches of ``micro_batch_size`` pairs, each packed into ONE row with no padding between sequences.

    The row holds chosen 0, rejected 0, chosen 1, rejected 1, ... back to back
    (megatron's ``thd`` format): ``cu_seqlens`` [sequences + 1] (int32) marks where
    each sequence starts, so attention stays inside a sequence (models/attention.py,
    or transformer-engine's kernels); ``position_ids`` restart at 0 for every
    sequence; ``segment_ids`` give each token's sequence (2i chosen, 2i+1 rejected
    of pair i) for per-sequence sums (losses/preference.py); a sequence's last token
    predicts nothing (its label is masked). Every microbatch of a call has the same
    length (pipeline stages exchange fixed shapes): the longest, rounded up to
    ``pad_multiple``; the padding is one more segment at the end, masked out of the loss.
    Each sequence's length is rounded up to ``sequence_multiple`` (2·CP under
    context parallelism, which cuts every sequence into 2·CP chunks) with padding
    tokens at its end: no loss, and no real token attends to them (they come last).
    """
    groups = microbatch_groups(pairs, micro_batch_size)
    longest = max(
        sum(round_up(len(pair.prompt) + len(side), sequence_multiple) for pair in group
            for side in (pair.chosen, pair.rejected))
        for group in groups
    )
    length = round_up(longest, pad_multiple)
    return [packed_row(group, pad_id, length, sequence_multiple) for group in groups]


def microbatch_groups(pairs: list, micro_batch_size: int) -> list:
    """``pairs`` in consecutive groups of ``micro_batch_size`` (ValueError unless they divide evenly)."""
    if micro_batch_size < 1 or not pairs or len(pairs) % micro_batch_size:
        raise ValueError(
            f"number of pairs ({len(pairs)}) must be a positive multiple of micro_batch_size ({micro_batch_size})"
        )
    return [pairs[i : i + micro_batch_size] for i in range(0, len(pairs), micro_batch_size)]


def packed_row(group: list, pad_id: int, length: int, sequence_multiple: int) -> Microbatch:
    """One microbatch of the pairs ``group`` packed into a row of ``length`` tokens (see the function above)."""
    tokens = torch.full((1, length), pad_id, dtype=torch.long)
    labels = torch.full((1, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((1, length), dtype=torch.float)
    position_ids = torch.zeros((1, length), dtype=torch.long)
    segment_ids = torch.zeros((1, length), dtype=torch.long)
    bounds = [0]
    for index, pair in enumerate(group):
        for side, response in enumerate((pair.chosen, pair.rejected)):
            start = bounds[-1]
            end = start + round_up(_place(tokens, labels, loss_mask, 0, start, pair.prompt, response) - start,
                                    sequence_multiple)
            position_ids[0, start:end] = torch.arange(end - start)
            segment_ids[0, start:end] = 2 * index + side
            bounds.append(end)
    if bounds[-1] < length:
        bounds.append(length)  # the padding: a segment of its own, position 0, no loss
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    gt_rewards = torch.tensor([r for p in group for r in (p.chosen_reward, p.rejected_reward)], dtype=torch.float)
    return Microbatch(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=position_ids,
        gt_rewards=gt_rewards,
        packed=True,
        segment_ids=segment_ids,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=longest,
    )


def collate_shared_prompt_microbatches(pairs: list, micro_batch_size: int, pad_id: int,
                                       pad_multiple: int = 8) -> list:
    """Packed microbatches whose row holds each pair's prompt once: prompt, chosen response, rejected response.

    A pair's two sequences begin with the same prompt, so a packed row need not
    compute it twice: the chosen response attends to the prompt as it follows it,
    and the rejected response attends to the same prompt tokens and to itself,
    at the positions it has in its own sequence (models/attention.py, and RoPE at
    each token's ``position_ids``, models/gpt.py). Every layer then computes
    ``P + C + R`` tokens for a pair instead of ``2P + C + R``; the output is the
    same as that of the unshared packed row to rounding. Before the log-probs the
    model's output is gathered back into the whole sequences (``sequence_index``),
    so labels, masks and per-sequence values are those of the packed row without
    sharing; ``row_index`` is the inverse, each row token's first place in the
    sequences. Every microbatch's row has the length of the longest, rounded up
    to ``pad_multiple``; the padding is one more segment, masked out of the loss.
    """
    groups = microbatch_groups(pairs, micro_batch_size)
    computed = [sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in group) for group in groups]
    length = round_up(max(computed), pad_multiple)
    return [_shared_prompt_row(group, pad_id, length, real) for group, real in zip(groups, computed)]


def _shared_prompt_row(group: list, pad_id: int, length: int, real: int) -> Microbatch:
    whole = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in group)
    sequences = packed_row(group, pad_id, whole + length - real, 1)  # labels, masks and segments of whole sequences
    tokens = torch.full((1, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((1, length), dtype=torch.long)
    index, start = [], 0
    for pair in group:
        prompt, chosen, rejected = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        end = start + prompt + chosen + rejected
        tokens[0, start:end] = torch.tensor(pair.prompt + pair.chosen + pair.rejected, dtype=torch.long)
        position_ids[0, start:end] = torch.cat([torch.arange(prompt + chosen), torch.arange(prompt, prompt + rejected)])
        index += [*range(start, start + prompt + chosen), *range(start, start + prompt),
                  *range(start + prompt + chosen, end)]
        start = end
    index += range(start, length)  # the padding, its own segment in both
    sequence_index = torch.tensor(index, dtype=torch.long)
    row_index = torch.full((length,), len(index), dtype=torch.long).scatter_reduce(
        0, sequence_index, torch.arange(len(index)), reduce="amin")
    return replace(sequences, tokens=tokens, position_ids=position_ids, sequence_index=sequence_index,
                   row_index=row_index)
