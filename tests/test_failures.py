"""Failures as a cluster sees them, on real 2-process torchrun jobs: said once, cleaned up, the culprit named.

- a start-up error (an empty training file) is one line, once, without a traceback from the ranks;
- (a save on a full disk: tests/chaos.py, which fills the disk for one save and resumes bitwise);
- an exception inside a step on one rank ends the job within a minute, naming that rank and its error;
- a hung rank is reported after ``trainer.distributed_timeout_minutes`` with the setting and the rank.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from parallel_scenarios import SMALL

pytestmark = pytest.mark.slow  # real multi-process runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train_dpo.py")


def launch(log_dir, *extra, env=None):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", TRAIN, *SMALL,
            f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.create_tensorboard_logger=false",
            "trainer.dpo.limit_val_batches=1", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def finish(proc, timeout=300) -> tuple:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def our_tracebacks(out: str) -> list:
    """Traceback frames from nemo-dpo's own code (torchrun's report of a failed rank has frames of torch only)."""
    return [line for line in out.splitlines() if line.strip().startswith("File ") and "nemo_dpo" in line]


def rows(log_dir):
    return [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]


def test_a_start_up_error_is_said_once_without_a_traceback(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out = finish(launch(tmp_path / "run", f"model.data.data_prefix.train={empty}",
                              f"model.tokenizer.cache_dir={tmp_path / 'tok'}"))
    assert code != 0
    message = f"error: {empty}: no preference pairs (the file is empty)"
    assert out.count(message) == 1, out[-3000:]
    assert our_tracebacks(out) == [], out[-3000:]


def _rank(proc, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under torchrun")


def _wait_for_rows(proc, log_dir, count: int) -> None:
    deadline = time.time() + 300
    while not (log_dir / "metrics.jsonl").exists() or len(rows(log_dir)) < count:
        assert proc.poll() is None and time.time() < deadline, "the run ended before its rows"
        time.sleep(0.05)


def test_an_exception_on_one_rank_ends_the_job_naming_rank_and_error(tmp_path):
    proc = launch(tmp_path / "run", "trainer.dpo.max_steps=500", f"model.tokenizer.cache_dir={tmp_path / 'tok'}",
                  env={"NEMO_DPO_FAULT_RAISE_AT_STEP": "3:1"})
    _wait_for_rows(proc, tmp_path / "run", 2)
    started = time.time()
    code, out = finish(proc, timeout=120)
    assert code != 0 and time.time() - started < 60
    root_cause = out.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, out[-3000:]
    assert "RuntimeError: injected fault at step 3 on rank 1" in out


@pytest.mark.system  # waits out the distributed timeout
def test_a_hung_rank_is_named_when_the_timeout_expires(tmp_path):
    proc = launch(tmp_path / "run", "trainer.dpo.max_steps=500", "trainer.distributed_timeout_minutes=0.1",
                  f"model.tokenizer.cache_dir={tmp_path / 'tok'}")
    _wait_for_rows(proc, tmp_path / "run", 3)
    hung = _rank(proc, 1)
    hung.send_signal(signal.SIGSTOP)
    seen, started = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if "did not arrive" in line or "gave up waiting" in line:
            break
    hung.send_signal(signal.SIGKILL)
    code, out = finish(proc, timeout=120)
    out = "".join(seen) + out
    assert code != 0 and time.time() - started < 90, out[-3000:]
    message = [x for x in out.splitlines() if "waited longer than trainer.distributed_timeout_minutes=0.1" in x]
    assert len(message) == 1 and message[0].startswith("rank 0: a collective at step "), out[-3000:]
    assert "rank 1 (last started step " in message[0] and "did not arrive" in message[0]
    assert our_tracebacks(out) == [], out[-3000:]


def test_all_finite_finds_one_nan_or_inf_anywhere_in_a_gradient_buffer():
    """The check behind nan_policy (every rank's loss and gradients, before the update), on buffers of both dtypes."""
    import torch

    from nemo_dpo.training.trainer import all_finite

    for dtype in (torch.float32, torch.bfloat16):
        buffer = torch.randn(100_003, dtype=dtype)
        assert all_finite(buffer) and all_finite(buffer[:0])
        for where in (0, 4_321, 100_002):
            for bad in (float("nan"), float("inf"), float("-inf")):
                broken = buffer.clone()
                broken[where] = bad
                assert not all_finite(broken), (dtype, where, bad)
        huge = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)
        assert all_finite(huge)  # finite values whose sum would overflow are still finite
