"""nemo_dpo/distributed/launcher.py: a process started by torchrun asks to be killed with its parent, others do not.

Each case runs in a process of its own (the death signal would otherwise be pytest's), with
a shell standing in for the launcher; tests/test_one_job_per_log_dir.py kills a real torchrun.
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow  # each test starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints what follow_launcher() returned and the death signal the kernel then has for this process.
REPORT = """
import ctypes, os, signal, sys, time
from nemo_dpo.distributed import launcher
{before}
followed = launcher.follow_launcher()
death_signal = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(death_signal), 0, 0, 0)  # PR_GET_PDEATHSIG
print(followed, death_signal.value, flush=True)
{after}
"""
KILL_MY_PARENT = """
parent = os.getppid()
os.kill(parent, signal.SIGKILL)
while os.getppid() == parent:
    time.sleep(0.01)
"""


def run(env_extra: dict, before: str = "", after: str = "") -> subprocess.Popen:
    """The report script under a shell that stays its parent (`; :` keeps sh from exec-ing python)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"} | env_extra
    script = REPORT.format(before=before, after=after)
    return subprocess.Popen(["sh", "-c", '"$0" -c "$1"; :', sys.executable, script], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)


def test_only_a_rank_started_by_torchrun_asks_to_die_with_its_launcher():
    for env, want in (({"TORCHELASTIC_RUN_ID": "none"}, f"True {int(signal.SIGKILL)}"), ({}, "True 0")):
        out, _ = run(env).communicate(timeout=60)
        assert out.strip() == want, env


def test_a_launcher_gone_before_the_request_is_noticed():
    out, _ = run({"TORCHELASTIC_RUN_ID": "none"}, before=KILL_MY_PARENT).communicate(timeout=60)
    assert out.split()[0] == "False"


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_rank_is_killed_when_its_launcher_is():
    shell = run({"TORCHELASTIC_RUN_ID": "none"}, after="time.sleep(120)")
    assert shell.stdout.readline().strip() == f"True {int(signal.SIGKILL)}"
    (rank,) = psutil.Process(shell.pid).children()
    shell.kill()
    shell.wait()
    try:
        deadline = time.time() + 10
        while not gone(rank):
            assert time.time() < deadline, "the process outlived its parent by 10 s"
            time.sleep(0.05)
    finally:
        if not gone(rank):
            rank.kill()
