"""Precomputed reference log-probs: same losses as the online reference, reused, and refused when stale (DP=2).

The online reference computes validation's sums once, and only for the batches validation uses. A loss that asks
for more reference values (LD-DPO's shared-length sums) finds them in the table too, and a table without them is
refused.
"""

import pytest

from distributed_harness import run_world
from reference_scenarios import online_then_precomputed

pytestmark = pytest.mark.slow  # real multi-process runs

KEYS = ("loss", "preference_loss", "reward_margin", "rewards_chosen_mean", "rewards_rejected_mean", "grad_norm")


def test_precomputed_reference_matches_online_and_is_cached(tmp_path):
    for rank in run_world(2, str(tmp_path / "out"), online_then_precomputed, str(tmp_path), str(tmp_path / "tok")):
        online = rank["online"]
        for run in ("precomputed", "reused"):
            for got, want in zip(rank[run]["train"] + [rank[run]["val"]], online["train"] + [online["val"]]):
                for key in KEYS:
                    if key in want:
                        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (run, key)
        assert rank["cache_untouched"]
        # Online, the first validation computes the reference for the 4 batches it uses (limit_val_batches=4:
        # 4 x 8 pairs, 2 sequences each, half of them on each DP rank), not the whole split; the next none.
        assert rank["validation_passes"] == [4 * 8 * 2 // 2, 0]
        assert "was computed for other weights (key mismatch)" in rank["refused"]
        assert "was computed for other values (key mismatch)" in rank["refused_values"]
        assert rank["ld_table_vs_online"] < 1e-5
