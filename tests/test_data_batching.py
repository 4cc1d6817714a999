import pytest
import torch

from nemo_dpo.data.batching import collate_microbatches, dp_shard, epoch_order, global_batches
from nemo_dpo.data.preference_dataset import TokenizedPair

PAD, EOS = 0, 1


def test_epoch_order_is_deterministic_and_differs_across_epochs_and_seeds():
    order = epoch_order(100, seed=3, epoch=0)
    assert sorted(order) == list(range(100))
    assert order == epoch_order(100, seed=3, epoch=0)
    assert order != epoch_order(100, seed=3, epoch=1)
    assert order != epoch_order(100, seed=4, epoch=0)


def test_global_batches_chunk_the_epoch_order_and_drop_the_remainder():
    batches = global_batches(10, 4, seed=1, epoch=2)
    assert batches == [epoch_order(10, 1, 2)[:4], epoch_order(10, 1, 2)[4:8]]
    with pytest.raises(ValueError, match="global_batch_size"):
        global_batches(3, 4, seed=1, epoch=0)


def test_dp_shard_covers_the_batch_exactly_once():
    batch = [9, 4, 7, 1, 0, 3, 8, 2]
    shards = [dp_shard(batch, rank, 4) for rank in range(4)]
    assert shards == [[9, 4], [7, 1], [0, 3], [8, 2]]
    assert sum(shards, []) == batch
    with pytest.raises(ValueError, match="not divisible by data-parallel size 3"):
        dp_shard(batch, 0, 3)
    with pytest.raises(ValueError, match="dp_rank"):
        dp_shard(batch, 4, 4)


def _pair(prompt, chosen, rejected, rewards=(1.0, 0.0)):
    return TokenizedPair(prompt, chosen + [EOS], rejected + [EOS], *rewards)


def test_collate_interleaves_shifts_labels_masks_responses_and_pads():
    pairs = [_pair([10, 11], [20, 21], [30], (2.0, -1.0)), _pair([12], [22], [31, 32, 33], (0.5, 0.25))]
    (mb,) = collate_microbatches(pairs, micro_batch_size=2, pad_id=PAD, pad_multiple=4)
    assert mb.tokens.tolist() == [
        [10, 11, 20, 21, EOS, PAD, PAD, PAD],
        [10, 11, 30, EOS, PAD, PAD, PAD, PAD],
        [12, 22, EOS, PAD, PAD, PAD, PAD, PAD],
        [12, 31, 32, 33, EOS, PAD, PAD, PAD],
    ]
    assert mb.labels.tolist() == [
        [11, 20, 21, EOS, PAD, PAD, PAD, PAD],
        [11, 30, EOS, PAD, PAD, PAD, PAD, PAD],
        [22, EOS, PAD, PAD, PAD, PAD, PAD, PAD],
        [31, 32, 33, EOS, PAD, PAD, PAD, PAD],
    ]
    assert mb.loss_mask.tolist() == [
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
    ]
    assert mb.position_ids.tolist() == [list(range(8))] * 4
    assert mb.gt_rewards.tolist() == [2.0, -1.0, 0.5, 0.25]
    assert mb.tokens.dtype == mb.labels.dtype == mb.position_ids.dtype == torch.long
    assert mb.loss_mask.dtype == mb.gt_rewards.dtype == torch.float


def test_one_sequence_length_for_all_microbatches():
    pairs = [_pair([10], [20], [30]), _pair([10] * 5, [20] * 6, [30])]
    microbatches = collate_microbatches(pairs, micro_batch_size=1, pad_id=PAD)
    assert [mb.tokens.shape for mb in microbatches] == [torch.Size([2, 16])] * 2
    assert microbatches[1].tokens[0].tolist()[:12] == [10] * 5 + [20] * 6 + [EOS]
    padded = collate_microbatches(pairs, micro_batch_size=2, pad_id=PAD, pad_to=20)
    assert padded[0].tokens.shape == (4, 20)


def test_collate_rejects_bad_sizes():
    pairs = [_pair([10], [20], [30])] * 3
    with pytest.raises(ValueError, match=r"number of pairs \(3\) must be a positive multiple of micro_batch_size \(2\)"):
        collate_microbatches(pairs, micro_batch_size=2, pad_id=PAD)
    with pytest.raises(ValueError, match="3 tokens does not fit pad_to=2"):
        collate_microbatches(pairs, micro_batch_size=1, pad_id=PAD, pad_to=2)
