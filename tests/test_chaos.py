"""The short chaos run (tests/chaos.py has the long one): six faults of six kinds, the result bitwise the straight run's.

Metrics, model, optimizer and RNG state are compared inside ``chaos`` (the checkpoints may live on a
tmpfs that is gone once it returns).
"""

import subprocess

import pytest

from chaos import FAULTS, chaos

pytestmark = pytest.mark.slow  # real multi-process runs


def _can_mount(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode:
        return False
    subprocess.run(["umount", str(probe)])
    return True


def test_a_run_hit_by_every_kind_of_fault_ends_bitwise_as_the_straight_run(tmp_path):
    kinds = FAULTS if _can_mount(tmp_path) else tuple(k for k in FAULTS if k != "full_disk")
    report = chaos(tmp_path, steps=30, faults=len(kinds), seed=7, kinds=kinds)  # raises if anything differs
    assert report["faults"] == len(kinds) and {h["fault"] for h in report["history"]} >= set(kinds), report
    print(report)
