"""Packed microbatches: a microbatch per row, sequences back to back, positions restarting; and rows that hold each
pair's prompt once.

(That a packed step equals an unpacked one, at PP=1 and PP=2, with RoPE and learned
positions, is in tests/test_parallel_equivalence.py.)
"""

import pytest
import torch

from nemo_dpo.data.batching import Microbatcher, collate_packed_microbatches, collate_shared_prompt_microbatches
from nemo_dpo.data.preference_dataset import TokenizedPair

PAIRS = [
    TokenizedPair([10, 11], [20, 2], [21, 22, 2], 1.0, 0.0),  # 2*2 + 2 + 3 = 9 tokens
    TokenizedPair([12], [23, 2], [24, 2], 0.5, 0.0),  # 1*2 + 2 + 2 = 6 tokens
    TokenizedPair([13, 14, 15], [25, 26, 2], [27, 2], 1.0, 0.2),  # 11 tokens
    TokenizedPair([16], [28, 2], [29, 2], 1.0, 0.0),  # 6 tokens
]


def test_a_microbatch_is_one_row_of_sequences_with_restarting_positions():
    first, second = collate_packed_microbatches(PAIRS, micro_batch_size=2, pad_id=0)
    # Pairs 0+1 take 15 tokens, pairs 2+3 take 17: both rows are 24 long (17 rounded up to 8).
    assert first.tokens.shape == second.tokens.shape == (1, 24)
    assert first.tokens[0, :15].tolist() == [10, 11, 20, 2, 10, 11, 21, 22, 2, 12, 23, 2, 12, 24, 2]
    assert first.tokens[0, 15:].eq(0).all()
    assert first.position_ids[0, :15].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2]
    assert first.segment_ids[0, :15].tolist() == [0] * 4 + [1] * 5 + [2] * 3 + [3] * 3
    assert first.loss_mask[0].tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0] + [0] * 9
    assert first.labels[0, :3].tolist() == [11, 20, 2] and first.loss_mask[0, 3] == 0  # no cross-sequence target
    # Sequence starts (the padding is a last segment of its own); the longest segment is the padding.
    assert first.cu_seqlens.tolist() == [0, 4, 9, 12, 15, 24] and first.cu_seqlens.dtype == torch.int32
    assert int(first.max_seqlen) == 9
    assert second.cu_seqlens.tolist() == [0, 6, 11, 14, 17, 24] and int(second.max_seqlen) == 7
    assert first.gt_rewards.tolist() == [1.0, 0.0, 0.5, 0.0]


def test_rows_without_padding_have_no_padding_segment():
    (only,) = collate_packed_microbatches(PAIRS[:2], micro_batch_size=2, pad_id=0, pad_multiple=1)
    assert only.tokens.shape == (1, 15) and only.cu_seqlens.tolist() == [0, 4, 9, 12, 15]


def test_micro_batch_size_must_divide_the_pairs():
    with pytest.raises(ValueError, match=r"number of pairs \(3\) must be a positive multiple of micro_batch_size \(2\)"):
        collate_packed_microbatches(PAIRS[:3], micro_batch_size=2, pad_id=0)


def test_a_shared_prompt_row_holds_each_prompt_once_and_maps_to_the_whole_sequences():
    first, second = collate_shared_prompt_microbatches(PAIRS, micro_batch_size=2, pad_id=0)
    # Pairs 0+1 compute 2+2+3 + 1+2+2 = 12 tokens, pairs 2+3 compute 3+3+2 + 1+2+2 = 13: both rows are 16 long.
    assert first.tokens.shape == second.tokens.shape == (1, 16)
    assert first.tokens[0, :12].tolist() == [10, 11, 20, 2, 21, 22, 2, 12, 23, 2, 24, 2]
    # The rejected response continues from its prompt: the positions it has in its own sequence.
    assert first.position_ids[0, :12].tolist() == [0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 1, 2]
    # Labels, masks, segments and bounds are the unshared packed row's (its padding segment is as long as this one's).
    (unshared,) = collate_packed_microbatches(PAIRS[:2], micro_batch_size=2, pad_id=0, pad_multiple=1)
    whole = unshared.tokens.shape[1]
    for name in ("labels", "loss_mask", "segment_ids"):
        assert torch.equal(getattr(first, name)[:, :whole], getattr(unshared, name)), name
    assert first.cu_seqlens.tolist() == [0, 4, 9, 12, 15, 19] and first.labels.shape == (1, 19)
    # sequence_index gathers the whole sequences (tokens and positions) from the row; row_index is its inverse.
    for name in ("tokens", "position_ids"):
        assert torch.equal(getattr(first, name)[0, first.sequence_index][:whole], getattr(unshared, name)[0]), name
    assert torch.equal(first.sequence_index[first.row_index], torch.arange(16))
    assert first.row_index[:7].tolist() == [0, 1, 2, 3, 6, 7, 8]  # the prompt's first place: the chosen sequence
    assert first.gt_rewards.tolist() == [1.0, 0.0, 0.5, 0.0]


def test_the_microbatcher_shares_prompts_only_when_packing_and_never_under_context_parallelism():
    packed = Microbatcher(2, True, 0, 0, 1, "cpu", share_prompts=True)(PAIRS)
    padded = Microbatcher(2, False, 0, 0, 1, "cpu", share_prompts=True)(PAIRS)
    assert all(mb.sequence_index is not None for mb in packed) and all(mb.sequence_index is None for mb in padded)
    with pytest.raises(ValueError, match="shared prompts need whole sequences on each rank"):
        Microbatcher(2, True, 0, 0, 1, "cpu", cp_rank=0, cp=2, share_prompts=True)
