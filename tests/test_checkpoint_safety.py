"""Loading a checkpoint never runs code from it (2 real processes, DP=2).

A real checkpoint is saved, then copies are crafted as an attacker with write
access to the storage would: an RNG state stored as a pickled object (the
layout of earlier nemo-dpo versions), a pickled shard index, a pickled
``common.pt``, each carrying a payload that creates a file when unpickled, and
each with a matching manifest. Every copy must be refused with a message naming
what it holds, and the payload must never run; the genuine checkpoint loads.
"""

import pytest

from checkpoint_scenarios import crafted_checkpoints_are_refused
from distributed_harness import run_world

pytestmark = pytest.mark.slow  # real multi-process runs


def test_malicious_checkpoints_are_refused_and_their_payload_never_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    ranks = run_world(2, str(tmp_path / "out"), crafted_checkpoints_are_refused, str(tmp_path / "run"),
                      str(tmp_path / "tok"), str(marker))
    assert not marker.exists(), "a payload stored in a checkpoint was executed"
    for results in ranks:
        assert results["genuine"] is None
        assert "holds pickled objects (rng_state" in results["pickled_rng_object"]
        assert ".metadata: refers to posix.system" in results["pickled_index"]
        assert "common.pt: holds more than tensors and plain data" in results["pickled_common"]
