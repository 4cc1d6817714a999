"""Packed microbatches: whole pairs per row, positions restarting, attention kept within each sequence.

(That a packed step equals an unpacked one, at PP=1 and PP=2, with RoPE and learned
positions, is in tests/test_parallel_equivalence.py.)
"""

import pytest
import torch

from nemo_dpo.data.batching import collate_packed_microbatches
from nemo_dpo.data.preference_dataset import TokenizedPair

PAIRS = [
    TokenizedPair([10, 11], [20, 2], [21, 22, 2], 1.0, 0.0),  # 2*2 + 2 + 3 = 9 tokens
    TokenizedPair([12], [23, 2], [24, 2], 0.5, 0.0),  # 1*2 + 2 + 2 = 6 tokens
    TokenizedPair([13, 14, 15], [25, 26, 2], [27, 2], 1.0, 0.2),  # 11 tokens
    TokenizedPair([16], [28, 2], [29, 2], 1.0, 0.0),  # 6 tokens
]


def test_pairs_are_packed_whole_with_restarting_positions_and_blocked_attention():
    first, second = collate_packed_microbatches(PAIRS, micro_batch_size=2, pad_id=0, pack_length=16)
    assert first["tokens"].shape == second["tokens"].shape == (2, 16)  # the same row count in every microbatch
    # Pairs 0 and 1 (9 + 6 tokens) share one row: c0 r0 c1 r1.
    assert first["tokens"][0].tolist() == [10, 11, 20, 2, 10, 11, 21, 22, 2, 12, 23, 2, 12, 24, 2, 0]
    assert first["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 0]
    assert first["segment_ids"][0, :15].tolist() == [0] * 4 + [1] * 5 + [2] * 3 + [3] * 3
    assert first["loss_mask"][0].tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0]
    assert first["labels"][0, :3].tolist() == [11, 20, 2] and first["loss_mask"][0, 3] == 0  # no cross-sequence target
    mask = first["attention_mask"][0, 0]
    assert not mask[5, 4] and not mask[5, 5] and mask[5, 6]  # causal inside the rejected sequence
    assert mask[5, 3] and mask[9, 0]  # nothing from another sequence
    assert first["tokens"][1].eq(0).all()  # an empty row, to match the second microbatch
    assert first["gt_rewards"].tolist() == [1.0, 0.0, 0.5, 0.0]
    # Pairs 2 (11 tokens) and 3 (6 tokens) do not fit one row of 16: one row each.
    assert second["segment_ids"][0, :11].tolist() == [0] * 6 + [1] * 5
    assert second["segment_ids"][1, :6].tolist() == [2, 2, 2, 3, 3, 3]


def test_a_pair_longer_than_a_pack_is_an_error():
    with pytest.raises(ValueError, match="a pair of 11 tokens does not fit a pack of 10"):
        collate_packed_microbatches(PAIRS[2:], micro_batch_size=2, pad_id=0, pack_length=10)
