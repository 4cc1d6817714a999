"""bench/gpu_check.py on CPU: the checks a CPU can run pass, the others say why they skip.

The script waits for a GPU machine (none has been lent yet) and gets minutes on it
when one comes: its plumbing must not be what fails there. Here it runs
te_packed's comparison on the local layer spec, the background-save resume, and
the runner itself with the checks that need CUDA. bf16_train is left out (bf16
matmuls are ~100x slower than fp32 on CPUs without bf16 instructions); the suite
trains in bf16 elsewhere.
"""

import os
import subprocess
import sys

import pytest

from distributed_harness import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow


def test_packed_rows_give_the_unpacked_log_probs_as_the_te_check_compares_them(tmp_path):
    [line] = run_world(1, str(tmp_path / "world"), gpu_check.packed_matches_unpacked, str(tmp_path))
    assert line.startswith("packed thd = unpacked within") and line.endswith("over 32 sequences"), line


def test_the_background_save_check_resumes_bitwise(tmp_path, monkeypatch):
    # The check's time limits are a GPU's; a loaded CPU machine gets more.
    run = gpu_check._python
    monkeypatch.setattr(gpu_check, "_python", lambda *args, env=None, timeout=60: run(*args, env=env, timeout=900))
    line = gpu_check.check_async_save(str(tmp_path))
    assert "steps 6-10 equal the straight run's, bitwise" in line


def test_the_runner_prints_a_line_per_check_and_skips_what_needs_cuda(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--out", str(tmp_path),
                           "--skip", "te_packed", "bf16_train", "async_save", "unit_tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split()[0]: line.split(None, 3)[1:] for line in done.stdout.splitlines()[:-1]}
    assert list(lines) == list(gpu_check.CHECKS), done.stdout
    for name in ("env", "nccl", "bench"):
        assert lines[name][0] == "SKIP" and lines[name][2].endswith("no CUDA device"), lines[name]
    for name in ("te_packed", "bf16_train", "async_save", "unit_tests"):
        assert lines[name][0] == "SKIP" and lines[name][2].endswith("(--skip)"), lines[name]
    assert done.stdout.splitlines()[-1] == f"logs in {tmp_path}"
