"""Ring attention (models/ring_attention.py) equals causal attention on the whole sequence, forward and backward.

One launch of 3 real processes (gloo): CP=3 over all of them and CP=2 over two,
each with rows of one sequence and packed rows of sequences of unequal lengths,
grouped-query attention (4 heads, 2 key/value groups), in float32 to rounding,
and in bf16 (as a bf16 run computes it) to bf16's precision.
"""

import pytest

from distributed_harness import run_world
from ring_scenarios import ring_cases

pytestmark = pytest.mark.slow  # real multi-process runs


def test_ring_attention_equals_whole_attention(tmp_path):
    ranks = run_world(3, str(tmp_path), ring_cases)
    assert set(ranks[0]) == set(ranks[1]) == {"cp3", "cp3_packed", "cp2", "cp2_packed", "cp2_bf16"}
    assert set(ranks[2]) == {"cp3", "cp3_packed"}
    for rank, result in enumerate(ranks):
        for case, errors in result.items():
            for what, error in errors.items():
                limit = 5e-2 if case.endswith("bf16") else 1e-5
                assert error < limit, f"rank {rank} {case}: {what} differs by {error}"
