"""A rank that dies mid-run takes the job down quickly, and the report names it (real torchrun, TP=2)."""

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


def test_sigkill_of_one_rank_ends_the_job_within_a_minute(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            os.path.join(ROOT, "examples", "train_dpo.py"), *SMALL, "model.tensor_model_parallel_size=2",
            "trainer.dpo.max_steps=500", f"exp_manager.explicit_log_dir={run}",
            f"model.tokenizer.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or sum(1 for _ in open(run / "metrics.jsonl")) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 3"
        time.sleep(0.01)
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)}
    killed_at = time.time()
    ranks["1"].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    elapsed = time.time() - killed_at
    assert proc.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after rank 1 died"
    assert not ranks["0"].is_running() or ranks["0"].status() == psutil.STATUS_ZOMBIE
    root_cause = out.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "SIGKILL" in root_cause, out[-3000:]
