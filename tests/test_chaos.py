"""The short chaos run (tests/chaos.py has the long one): six faults of six kinds, the result bitwise the straight run's."""

import subprocess

import pytest
import torch

from chaos import FAULTS, chaos
from checkpoint_scenarios import plain_tensors
from distributed_harness import run_world

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
    steps = 30
    report = chaos(tmp_path, steps=steps, faults=len(kinds), seed=7, kinds=kinds)
    assert report["faults"] == len(kinds), report
    assert {h["fault"] for h in report["history"]} >= set(kinds), report
    straight, chaotic = (run_world(1, str(tmp_path / f"load_{name}"), plain_tensors,
                                   str(tmp_path / name / "checkpoints" / f"step_{steps}"))[0]
                         for name in ("straight", "chaotic"))
    assert set(straight) == set(chaotic) and any(k.startswith("optimizer.") for k in straight)
    assert any(k.startswith("rng_state.") for k in straight)
    for key, value in straight.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, chaotic[key]), key
        else:
            assert value == chaotic[key], key
    print(report)
