"""One job per log dir, and ranks that end with their launcher: real 2-process torchrun jobs.

A second job on a log dir in use is refused and changes nothing there, while the first one
(which took over a lock left by a process that has ended) trains to the end. A requeued
Slurm job takes over its own lock. Killing torchrun alone ends its ranks, and the lock they
leave behind is taken over by the next run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from nemo_dpo.training import run_lock
from distributed_harness import free_port
from parallel_scenarios import SMALL

pytestmark = [pytest.mark.slow, pytest.mark.system]  # real torchrun jobs run side by side and killed (tests/test_run_lock.py and tests/test_launcher.py are the quick layer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train_dpo.py")
HERE = socket.gethostname()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture
def torchrun(cache):
    """Starts a 2-rank job on a log dir; a job still running when the test ends is killed with its ranks."""
    jobs = []

    def start(log_dir, *extra, env=None) -> subprocess.Popen:
        # Each job its own rendezvous port: two launchers on one host cannot share one.
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), TRAIN, *SMALL, "model.num_layers=4", "model.hidden_size=128",
                "model.ffn_hidden_size=256", f"model.tokenizer.cache_dir={cache}",
                f"exp_manager.explicit_log_dir={log_dir}", *extra]
        jobs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=env))
        return jobs[-1]

    yield start
    for job in jobs:
        if job.poll() is None:
            for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
                process.kill()
            job.communicate()


def train_steps(log_dir) -> list:
    """Steps of the train rows in metrics.jsonl so far (a line still being written is left out)."""
    path = log_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    rows = [json.loads(line) for line in lines if line.endswith("\n")]
    return [r["step"] for r in rows if r["split"] == "train"]


def wait_for_training(proc, log_dir, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not train_steps(log_dir):
        assert proc.poll() is None and time.time() < deadline, "the run ended (or timed out) before its first step"
        time.sleep(0.05)


def ranks_by_number(launcher_pid: int) -> dict:
    return {int(p.environ()["RANK"]): p for p in psutil.Process(launcher_pid).children()}


def snapshot(folder) -> dict:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def write_lock(log_dir, host: str, pid: int, slurm_job_id, since: str = "2026-01-01T00:00:00+00:00") -> None:
    log_dir.mkdir(parents=True)
    lock = {"host": host, "pid": pid, "slurm_job_id": slurm_job_id, "since": since}
    (log_dir / run_lock.LOCK_FILE).write_text(json.dumps(lock) + "\n")


def test_a_second_job_on_a_log_dir_in_use_is_refused_and_changes_nothing(tmp_path, torchrun):
    run = tmp_path / "run"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    write_lock(run, HERE, ended.pid, None)  # left by a run killed with kill -9
    first = torchrun(run, "trainer.dpo.max_steps=20")
    wait_for_training(first, run)
    ranks = ranks_by_number(first.pid)
    for rank in ranks.values():
        rank.suspend()  # the first job surely still holds the log dir, and changes nothing in it, meanwhile
    try:
        before = snapshot(run)
        started = time.time()
        second = torchrun(run, "trainer.dpo.max_steps=20")
        out, _ = second.communicate(timeout=300)
        took = time.time() - started
        assert snapshot(run) == before
    finally:
        for rank in ranks.values():
            rank.resume()
    assert second.returncode != 0 and "exitcode  : 4" in out, out[-3000:]
    message = (f"not started: {run} is in use by another run (host {HERE}, pid {ranks[0].pid}, since ")
    assert out.count(message) == 1, out[-3000:]  # rank 0 says it, once
    assert f"its process {ranks[0].pid} is running on this host. Wait for that run to end or stop it" in out
    assert f'File "{ROOT}' not in out  # no traceback from the job's own code (torchrun prints its report)
    print(f"the second job was refused after {took:.0f} s")

    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    assert (f"taking over the lock of host {HERE}, pid {ended.pid}, since 2026-01-01T00:00:00+00:00: its process "
            f"{ended.pid} on this host has ended") in out
    assert train_steps(run) == list(range(1, 21))  # each step once
    assert not (run / run_lock.LOCK_FILE).exists()  # released at the end


def test_killing_torchrun_ends_its_ranks_and_a_requeued_job_takes_its_own_lock(tmp_path, torchrun):
    run = tmp_path / "run"
    write_lock(run, "node-of-the-first-try", 4321, "4242")  # this job, before it was requeued to another node
    proc = torchrun(run, "trainer.dpo.max_steps=500", env={**os.environ, "SLURM_JOB_ID": "4242"})
    wait_for_training(proc, run)
    launcher = psutil.Process(proc.pid)
    ranks = ranks_by_number(proc.pid)
    assert sorted(ranks) == [0, 1]  # torchrun's own children, nothing in between
    held = run_lock.parse_lock((run / run_lock.LOCK_FILE).read_text())
    assert (held["pid"], held["slurm_job_id"]) == (ranks[0].pid, "4242")
    everything = launcher.children(recursive=True)
    launcher.send_signal(signal.SIGKILL)  # the launcher alone
    try:
        deadline = time.time() + 10
        while not all(map(gone, everything)):
            assert time.time() < deadline, f"still running 10 s after torchrun was killed: {everything}"
            time.sleep(0.05)
    finally:
        for process in everything:
            if not gone(process):
                process.kill()
    out, _ = proc.communicate(timeout=60)
    assert ("taking over the lock of host node-of-the-first-try, pid 4321, Slurm job 4242, since "
            "2026-01-01T00:00:00+00:00: it is this Slurm job (4242), started again (requeued)") in out, out[-3000:]

    notes = []  # the lock the killed rank 0 left names a process that has ended: the next run takes it over
    run_lock.acquire(str(run), notes.append).release()
    assert len(notes) == 1 and f"its process {ranks[0].pid} on this host has ended" in notes[0]
