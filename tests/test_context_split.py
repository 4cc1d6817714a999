"""A context-parallel rank's share of a microbatch (data/context_split.py), and what the shares add up to.

Each CP rank keeps chunks i and 2·CP-1-i of every sequence; the per-sequence
values of the loss, computed on each share and summed over the ranks, must be
those of the whole microbatch: for the response sums, and for the values whose
masks depend on where a response starts and ends (LD-DPO's shared length,
ORPO's whole sequence), which the batcher makes before the cut.
"""

import pytest
import torch

from nemo_dpo.data.batching import Microbatcher
from nemo_dpo.data.context_split import share_indices
from nemo_dpo.data.preference_dataset import TokenizedPair
from nemo_dpo.losses.sequences import LOGPS, SEQUENCE_LOGPS, SEQUENCE_TOKENS, SHARED_LOGPS
from nemo_dpo.training.dpo_step import response_values, whole_sequence_masks

PAIRS = [
    TokenizedPair([10, 11], [20, 2], [21, 22, 23, 2], 1.0, 0.0),
    TokenizedPair([12], [23, 24, 25, 2], [24, 2], 0.5, 0.0),
    TokenizedPair([13, 14, 15], [25, 26, 2], [27, 2], 1.0, 0.2),
    TokenizedPair([16, 17, 18, 19, 16], [28, 29, 30, 31, 28, 29, 2], [29, 30, 2], 1.0, 0.0),  # over 3 chunks
]
NAMES = (LOGPS, SHARED_LOGPS, SEQUENCE_LOGPS, SEQUENCE_TOKENS)


def test_a_rank_keeps_a_chunk_and_its_mirror_of_every_sequence():
    assert share_indices([0, 8], 0, 2).tolist() == [0, 1, 6, 7]
    assert share_indices([0, 8], 1, 2).tolist() == [2, 3, 4, 5]
    assert share_indices([0, 4, 12], 1, 2).tolist() == [1, 2, 6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"a sequence of 6 tokens cannot be cut into 2 x model.context_parallel_size"):
        share_indices([0, 6], 0, 2)


def _values(microbatches, precomputed: bool) -> dict:
    """Each value over every sequence of the microbatches; the token values are the labels (a stand-in for log-probs)."""
    rows = []
    for mb in microbatches:
        if not precomputed:
            mb.value_masks = None  # made from the rows at hand, as without the batcher's masks
        rows.append(response_values(NAMES, mb.labels.float(), mb))
    return {name: torch.cat([r[name] for r in rows]) for name in NAMES}


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("cp", [2, 3])
def test_the_shares_values_add_up_to_the_whole_microbatch(cp, packing):
    def batcher(cp_rank, cp):
        return Microbatcher(2, packing, 0, 0, 1, "cpu", cp_rank, cp, value_masks=whole_sequence_masks(NAMES))

    whole = _values(batcher(0, 1)(PAIRS), precomputed=True)
    shares = [batcher(rank, cp)(PAIRS) for rank in range(cp)]
    for mb in shares[0]:
        assert mb.tokens.shape[1] % 2 == 0  # two chunks of each sequence
        if packing:  # every sequence padded to a multiple of 2 x CP; cu_seqlens describe the whole row
            assert all(length % (2 * cp) == 0 for length in mb.cu_seqlens.diff().tolist())
            assert int(mb.cu_seqlens[-1]) == cp * mb.tokens.shape[1]
    summed = [_values(share, precomputed=True) for share in shares]
    for name in NAMES:
        torch.testing.assert_close(sum(s[name] for s in summed), whole[name], atol=0, rtol=0)
    # Masks made from a share alone miss the parts of a response held by the other ranks.
    alone = [_values(batcher(rank, cp)(PAIRS), precomputed=False) for rank in range(cp)]
    assert any(not torch.equal(sum(s[name] for s in alone), whole[name]) for name in (SHARED_LOGPS, SEQUENCE_LOGPS))
