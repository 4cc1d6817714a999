"""model.data.packing=auto: the token counts behind the choice are the collate functions' own, and the choice follows
them (data/packing.py)."""

import random

import pytest

from nemo_dpo.config import ConfigError, load_config, validate
from nemo_dpo.data.batching import (collate_microbatches, collate_packed_microbatches,
                                    collate_shared_prompt_microbatches, dp_shard, global_batches)
from nemo_dpo.data.packing import choose_packing, packed_tokens, padded_tokens, shares_prompts
from nemo_dpo.data.preference_dataset import TokenizedPair


def _pairs(lengths: list, seed: int = 0) -> list:
    """Pairs whose (prompt + chosen, prompt + rejected) lengths are ``lengths``."""
    rng = random.Random(seed)
    pairs = []
    for chosen, rejected in lengths:
        prompt = rng.randint(1, min(chosen, rejected) - 1)
        pairs.append(TokenizedPair([5] * prompt, [6] * (chosen - prompt), [7] * (rejected - prompt), 1.0, 0.0))
    return pairs


def _lengths(pairs: list) -> list:
    return [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs]


@pytest.mark.parametrize("sequence_multiple, pad_multiple", [(1, 8), (4, 8), (6, 24)])
def test_the_counts_are_what_the_collate_functions_compute(sequence_multiple, pad_multiple):
    rng = random.Random(sequence_multiple)
    pairs = _pairs([(rng.randint(3, 60), rng.randint(3, 60)) for _ in range(12)])
    padded = collate_microbatches(pairs, 3, pad_id=0, pad_multiple=pad_multiple)
    packed = collate_packed_microbatches(pairs, 3, pad_id=0, pad_multiple=pad_multiple,
                                         sequence_multiple=sequence_multiple)
    assert padded_tokens(_lengths(pairs), pad_multiple) == sum(mb.tokens.numel() for mb in padded)
    assert packed_tokens(_lengths(pairs), 3, pad_multiple, sequence_multiple) == sum(mb.tokens.numel() for mb in packed)
    shared = collate_shared_prompt_microbatches(pairs, 3, pad_id=0, pad_multiple=pad_multiple)
    assert packed_tokens(_lengths(pairs), 3, pad_multiple, 1, shared_prompts=True) == sum(mb.tokens.numel()
                                                                                           for mb in shared)


def test_pairs_of_one_length_are_padded():
    choice = choose_packing(_pairs([(64, 64)] * 32), 8, 1234, 2, 2, 8, 1, 0.0)
    assert not choice.packed
    assert choice.padded_tokens == choice.packed_tokens == choice.real_tokens == 32 * 2 * 64
    assert choice.steps == 4
    assert choice.message() == ("model.data.packing=auto: padding (an epoch (4 steps, 4,096 real tokens) computes "
                                "4,096 tokens padded, 4,096 packed: packing would compute no fewer)")


def test_mixed_lengths_are_packed_and_the_counts_are_said():
    rng = random.Random(1)
    pairs = _pairs([(rng.randint(8, 200), rng.randint(8, 200)) for _ in range(64)])
    choice = choose_packing(pairs, 16, 1234, 4, 2, 8, 1, 0.0)
    assert choice.packed and choice.real_tokens <= choice.packed_tokens < choice.padded_tokens
    assert choice.real_tokens == sum(p.num_tokens for p in pairs)
    saving = 1 - choice.packed_tokens / choice.padded_tokens
    assert choice.message() == (f"model.data.packing=auto: packing (an epoch (4 steps, {choice.real_tokens:,} real "
                                f"tokens) computes {choice.padded_tokens:,} tokens padded, {choice.packed_tokens:,} "
                                f"packed: {saving:.1%} fewer)")


def test_the_count_follows_the_epoch_order_and_each_data_parallel_share():
    """The tokens are those of the global batches training takes (epoch 0's order), cut into each DP rank's share."""
    rng = random.Random(2)
    pairs = _pairs([(rng.randint(8, 100), rng.randint(8, 100)) for _ in range(48)])
    want = sum(padded_tokens([_lengths(pairs)[i] for i in dp_shard(batch, rank, 2)], 8)
               for batch in global_batches(48, 8, 7, 0) for rank in range(2))
    assert choose_packing(pairs, 8, 7, 2, 2, 8, 1, 0.0).padded_tokens == want
    assert choose_packing(pairs, 8, 7, 2, 2, 8, 1, 0.0) == choose_packing(pairs, 8, 7, 2, 2, 8, 1, 0.0)  # deterministic


@pytest.mark.parametrize("value", ["true", "false", "auto"])
def test_packing_takes_true_false_and_auto(value):
    cfg = load_config("gpt_dpo", [f"model.data.packing={value}"])
    validate(cfg, 1)
    assert cfg.model.data.packing == {"true": True, "false": False, "auto": "auto"}[value]


def test_auto_is_the_default_and_another_word_is_refused():
    assert load_config("gpt_dpo").model.data.packing == "auto"
    with pytest.raises(ConfigError, match=r"model.data.packing must be a boolean \(true: pack, false: pad\); or "
                                          r"'auto' \(whichever computes fewer tokens on the training data\), got 'always'"):
        validate(load_config("gpt_dpo", ["model.data.packing=always"]), 1)


def test_a_saving_below_packing_min_saving_pads_and_says_so():
    """Lengths 56..64: packing saves a little (about 7% here), less than the 20% default asks for."""
    rng = random.Random(3)
    pairs = _pairs([(rng.randint(56, 64), rng.randint(56, 64)) for _ in range(32)])
    any_saving, default = choose_packing(pairs, 8, 1234, 2, 2, 8, 1, 0.0), choose_packing(pairs, 8, 1234, 2, 2, 8, 1, 0.2)
    saving = 1 - default.packed_tokens / default.padded_tokens
    assert 0 < saving < 0.2 and any_saving.packed and not default.packed
    assert default.message().endswith(f"packed: {saving:.1%} fewer, less than model.data.packing_min_saving=0.2)")


def test_pairs_of_one_length_are_packed_when_their_prompts_are_shared():
    """The bench's full-length pairs: every sequence 512 tokens, a quarter of it prompt. Sharing the prompt computes
    12.5% fewer tokens, more than the default model.data.packing_min_saving of 0.1."""
    pairs = [TokenizedPair([5] * 128, [6] * 384, [7] * 384, 1.0, 0.0) for _ in range(16)]
    choice = choose_packing(pairs, 4, 1234, 4, 1, 8, 1, load_config("gpt_dpo").model.data.packing_min_saving,
                            shared_prompts=True)
    assert choice.packed and choice.padded_tokens == 16 * 1024 and choice.packed_tokens == 16 * 896
    assert choice.message() == ("model.data.packing=auto: packing (an epoch (4 steps, 16,384 real tokens) computes "
                                "16,384 tokens padded, 14,336 packed with shared prompts: 12.5% fewer)")
    assert not choose_packing(pairs, 4, 1234, 4, 1, 8, 1, 0.1).packed  # without sharing: no fewer


def test_prompts_are_shared_where_the_layout_allows_and_true_says_why_it_cannot():
    assert shares_prompts("auto", 1, local_attention=True) and shares_prompts(True, 1, local_attention=True)
    assert not shares_prompts("auto", 2, local_attention=True) and not shares_prompts("auto", 1, local_attention=False)
    assert not shares_prompts(False, 1, local_attention=True)
    with pytest.raises(ValueError, match=r"model.data.share_prompts=true cannot be done with "
                                         r"model.context_parallel_size=2 and transformer-engine's attention"):
        shares_prompts(True, 2, local_attention=False)
    assert load_config("gpt_dpo").model.data.share_prompts == "auto"
