"""nemo_dpo/training/run_lock.py: the lock file, who may take it over (Slurm's answers faked), taking and releasing it.

The runs themselves (a second job refused, a stale lock taken over, a requeue) are in
tests/test_one_job_per_log_dir.py.
"""

import json
import os
import socket
import stat
import threading
import time
from datetime import datetime

import psutil
import pytest

from nemo_dpo.training import run_lock
from nemo_dpo.training.run_lock import LogDirInUse, SlurmUnavailable, judge

HERE = socket.gethostname()


def holder(host=HERE, pid=1234, job=None, since="2026-05-09T15:30:02+00:00") -> dict:
    return {"host": host, "pid": pid, "slurm_job_id": job, "since": since}


def dead_pid() -> int:
    """A pid no process of this host has now (the kernel hands out the top of the range last)."""
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read())
    return next(pid for pid in range(top - 1, 1, -1) if not psutil.pid_exists(pid))


def write_lock(log_dir, **fields) -> str:
    path = log_dir / run_lock.LOCK_FILE
    path.write_text(json.dumps(holder(**fields)) + "\n")
    return path.read_text()


# -- the file ------------------------------------------------------------------------------


def test_a_lock_names_its_holder_and_anything_else_is_refused():
    me = run_lock.this_process()
    assert me["host"] == HERE and me["pid"] == os.getpid()
    assert abs(datetime.fromisoformat(me["since"]).timestamp() - time.time()) < 5
    assert run_lock.parse_lock(json.dumps(me)) == me
    since = "since 2026-05-09T15:30:02+00:00"
    assert run_lock.describe(holder(job="77")) == f"host {HERE}, pid 1234, Slurm job 77, {since}"
    assert run_lock.describe(holder()) == f"host {HERE}, pid 1234, {since}"
    bad = {
        "": "not JSON",
        "[1]": "exactly the keys",
        json.dumps({**holder(), "extra": 1}): "exactly the keys",
        json.dumps({**holder(), "pid": "1234"}): "pid an integer",
        json.dumps({**holder(), "pid": True}): "pid an integer",
        json.dumps({**holder(), "slurm_job_id": 77}): "slurm_job_id must be a string",
        json.dumps({**holder(), "since": "yesterday"}): "since is not an ISO 8601 time",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            run_lock.parse_lock(text)


# -- who may take it over ------------------------------------------------------------------


def running(answer: bool):
    return lambda pid, since: answer


def slurm(answer):
    def ask(job_id):
        if isinstance(answer, Exception):
            raise answer
        return answer
    return ask


def not_asked(*args):
    raise AssertionError("should not be asked")


def test_on_this_host_the_holders_process_decides():
    me = holder(pid=99, job="5")
    for job in (None, "5", "6"):  # a Slurm job on this host too: its process is the answer
        verdict = judge(holder(job=job), me, running(True), not_asked)
        assert verdict == (False, "its process 1234 is running on this host")
        verdict = judge(holder(job=job), me, running(False), not_asked)
        assert verdict == (True, "its process 1234 on this host has ended")


def test_on_another_host_slurm_decides():
    me = holder(pid=99, job="5")
    requeued = judge(holder(host="node7", job="5"), me, not_asked, not_asked)
    assert requeued == (True, "it is this Slurm job (5), started again (requeued)")
    cases = {
        "RUNNING": (False, "Slurm job 6 is RUNNING"),
        "PENDING": (False, "Slurm job 6 is PENDING"),
        "REQUEUED": (False, "Slurm job 6 is REQUEUED"),  # it will come back to this log dir
        "COMPLETED": (True, "Slurm job 6 has ended (COMPLETED)"),
        "CANCELLED": (True, "Slurm job 6 has ended (CANCELLED)"),
        "NODE_FAIL": (True, "Slurm job 6 has ended (NODE_FAIL)"),
        "": (True, "Slurm no longer knows job 6 (it ended)"),
    }
    for state, want in cases.items():
        assert judge(holder(host="node7", job="6"), me, not_asked, slurm(state)) == want, state
    verdict = judge(holder(host="node7", job="6"), me, not_asked, slurm(SlurmUnavailable("squeue: not found")))
    assert verdict == (False, "Slurm could not be asked whether job 6 still runs: squeue: not found")
    outside = judge(holder(host="node7"), me, not_asked, not_asked)
    assert not outside.take_over and "not a Slurm job, so whether it still runs cannot be checked" in outside.reason


def test_a_process_counts_as_the_holder_only_if_it_started_before_the_lock():
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    assert run_lock.process_running(os.getpid(), now)
    assert not run_lock.process_running(dead_pid(), now)
    # The same pid, but the lock is older than this process: a reused pid (a restarted container, a reboot).
    assert not run_lock.process_running(os.getpid(), "2000-01-01T00:00:00+00:00")


@pytest.fixture
def fake_squeue(tmp_path, monkeypatch):
    """Put a `squeue` on PATH that prints ``stdout``/``stderr`` and exits with ``status``; returns its argv log."""
    folder = tmp_path / "bin"
    folder.mkdir()
    argv_log = tmp_path / "squeue_argv"

    def install(stdout="", stderr="", status=0):
        script = folder / "squeue"
        script.write_text(f"#!/bin/sh\necho \"$@\" > {argv_log}\nprintf '%s' '{stdout}'\n"
                          f"printf '%s' '{stderr}' >&2\nexit {status}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return argv_log

    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return install


@pytest.mark.slow  # starts processes (a stand-in squeue)
def test_slurm_is_asked_with_squeue(fake_squeue, monkeypatch):
    """squeue's answers as Slurm 22.05 gives them (tests/test_slurm.py asks a real one)."""
    argv_log = fake_squeue(stdout="RUNNING\n")
    assert run_lock.slurm_job_state("77") == "RUNNING"
    assert argv_log.read_text().split() == ["--noheader", "--states=all", "--jobs=77", "--format=%T"]
    fake_squeue(stderr="slurm_load_jobs error: Invalid job id specified\n", status=1)
    assert run_lock.slurm_job_state("77") == ""  # purged: ended long ago
    fake_squeue(stderr="slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n", status=1)
    with pytest.raises(SlurmUnavailable, match="exited with status 1: slurm_load_jobs error: Unable to contact"):
        run_lock.slurm_job_state("77")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SlurmUnavailable, match="could not be run"):
        run_lock.slurm_job_state("77")


# -- taking and releasing it ---------------------------------------------------------------


def test_a_free_log_dir_is_taken_and_released(tmp_path):
    log_dir = tmp_path / "run"  # created by taking the lock
    notes = []
    lock = run_lock.acquire(str(log_dir), notes.append)
    assert notes == [] and os.listdir(log_dir) == [run_lock.LOCK_FILE]
    found = run_lock.parse_lock((log_dir / run_lock.LOCK_FILE).read_text())
    assert found["host"] == HERE and found["pid"] == os.getpid()
    lock.release()
    assert os.listdir(log_dir) == []


def test_a_lock_held_by_a_live_process_is_refused_and_left_alone(tmp_path):
    holder_pid = 1  # init: alive, and started before the lock below
    text = write_lock(tmp_path, pid=holder_pid, job="77", since=datetime.now().astimezone().isoformat())
    with pytest.raises(LogDirInUse) as err:
        run_lock.acquire(str(tmp_path), lambda line: pytest.fail(line))
    message = str(err.value)
    assert f"{tmp_path} is in use by another run (host {HERE}, pid {holder_pid}, Slurm job 77, since " in message
    assert f"its process {holder_pid} is running on this host" in message
    assert "another exp_manager.explicit_log_dir" in message and f"delete {tmp_path / 'run.lock'}" in message
    assert (tmp_path / run_lock.LOCK_FILE).read_text() == text and os.listdir(tmp_path) == [run_lock.LOCK_FILE]


def test_a_lock_whose_process_has_ended_is_taken_over_with_a_note(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    notes = []
    lock = run_lock.acquire(str(tmp_path), notes.append)
    assert notes == [f"{tmp_path / 'run.lock'}: taking over the lock of host {HERE}, pid {pid}, since "
                     f"2026-05-09T15:30:02+00:00: its process {pid} on this host has ended"]
    assert run_lock.parse_lock((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert os.listdir(tmp_path) == [run_lock.LOCK_FILE]  # nothing set aside is left
    lock.release()
    assert os.listdir(tmp_path) == []


def test_a_lock_being_written_is_read_once_written_and_one_that_cannot_be_read_is_refused(tmp_path):
    path = tmp_path / run_lock.LOCK_FILE
    path.write_text("")  # just created by another run, which writes it a moment later
    now = run_lock.this_process()["since"]
    writer = threading.Timer(0.3, write_lock, (tmp_path,), {"pid": 1, "since": now})
    writer.start()
    with pytest.raises(LogDirInUse, match="pid 1, since .* its process 1 is running on this host"):
        run_lock.acquire(str(tmp_path), print)
    writer.join()
    for content in (b"", b"\xff\xfe{"):  # never written (killed right after creating it), or damaged
        path.write_bytes(content)
        with pytest.raises(LogDirInUse, match=r"run.lock cannot be read as a lock \(not JSON .*If no run uses"):
            run_lock.acquire(str(tmp_path), print)


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path):
    lock = run_lock.acquire(str(tmp_path), print)
    theirs = write_lock(tmp_path, host="node7", job="6")
    lock.release()
    assert (tmp_path / run_lock.LOCK_FILE).read_text() == theirs


def test_a_takeover_puts_back_a_lock_that_changed_meanwhile(tmp_path):
    """Two runs taking over one stale lock: the one that comes second must not remove the first one's new lock."""
    stale = write_lock(tmp_path, pid=dead_pid())
    fresh = write_lock(tmp_path, host="node7", job="6")  # the other run's, written after this one read `stale`
    run_lock._remove_if_unchanged(str(tmp_path / run_lock.LOCK_FILE), stale)
    assert (tmp_path / run_lock.LOCK_FILE).read_text() == fresh and os.listdir(tmp_path) == [run_lock.LOCK_FILE]
    run_lock._remove_if_unchanged(str(tmp_path / run_lock.LOCK_FILE), fresh)
    assert os.listdir(tmp_path) == []
