"""The short chaos run (tests/chaos.py has the long one, with every kind of fault): four faults, the result
bitwise the straight run's.

The suite's run takes the kinds no other test combines: the launcher killed alone (its ranks must
die with it), a preemption, a full disk for one save (where a tmpfs can be mounted) and a torn
``latest`` (followed by a kill). kill -9 of one rank and of everything are tests/test_checkpoint.py's.
Metrics, model, optimizer and RNG state are compared inside ``chaos`` (the checkpoints may live on a
tmpfs that is gone once it returns).
"""

import subprocess

import pytest

from chaos import chaos

pytestmark = [pytest.mark.slow, pytest.mark.system]  # a dozen torchrun jobs in a row

KINDS = ("kill_launcher", "sigterm", "full_disk", "torn_latest")


def _can_mount(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode:
        return False
    subprocess.run(["umount", str(probe)])
    return True


def test_a_run_hit_by_faults_of_four_kinds_ends_bitwise_as_the_straight_run(tmp_path):
    kinds = KINDS if _can_mount(tmp_path) else tuple(k for k in KINDS if k != "full_disk")
    report = chaos(tmp_path, steps=12, faults=len(kinds), seed=7, save_every=3, kinds=kinds, model=())
    assert report["faults"] == len(kinds) and {h["fault"] for h in report["history"]} >= set(kinds), report
    print(report)
