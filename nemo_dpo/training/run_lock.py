"""One run per log dir: rank 0 holds ``<log dir>/run.lock`` from start-up until the run ends.

Two runs started on one ``exp_manager.explicit_log_dir`` (a Slurm job submitted again under
the same name, a command started twice by mistake) would otherwise both train to the end,
write checkpoints into the same folder and append the same steps to ``metrics.jsonl``. So
before anything is written there, rank 0 creates the lock file, naming its host, pid,
Slurm job and start time, and a second run that finds it exits, naming the holder.

The file is created with O_CREAT | O_EXCL, which fails when it exists, atomically on NFS
and Lustre too, across nodes (where ``flock`` may not reach). A run killed with ``kill -9``,
or on a node that died, leaves its lock behind; it is taken over, with a note, when its
holder is known to be gone:

- on this host, when the holder's process has ended (a later process that got the same
  pid does not count: it started after the lock was taken);
- on another host, when the holder is this very Slurm job (a requeued job keeps its id),
  or a Slurm job that Slurm says has ended. If Slurm cannot be asked, the lock stands.

A holder on another host outside Slurm cannot be checked from here: the lock stands and
the message names the file to delete once that run is known to be gone. A host is its host
name: containers that share one but not their processes (``docker run --network host``)
would take each other's live runs for ended ones; give them host names of their own.
"""

import json
import os
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import psutil
import torch.distributed as dist

LOCK_FILE = "run.lock"
# States (squeue's %T) of a Slurm job whose processes have ended for good. Any other state
# (pending, running, completing, requeued, suspended, ...) keeps its lock.
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "TIMEOUT"}
# A process start time read from /proc can be off by about a second (the boot time is kept in whole seconds).
START_TIME_SLACK_S = 2


class LogDirInUse(RuntimeError):
    """Another run holds the log dir; the message names it and what to do."""


class SlurmUnavailable(RuntimeError):
    """Slurm could not be asked about a job."""


class Verdict(NamedTuple):
    take_over: bool
    reason: str


def this_process() -> dict:
    """What a lock taken now by this process says about its holder."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder["slurm_job_id"] else ""
    return f"host {holder['host']}, pid {holder['pid']}{job}, since {holder['since']}"


def parse_lock(text: str) -> dict:
    """The holder a lock file's text names; ValueError if it is not a lock this module wrote."""
    try:
        holder = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from err
    if not isinstance(holder, dict) or set(holder) != {"host", "pid", "slurm_job_id", "since"}:
        raise ValueError("not an object with exactly the keys host, pid, slurm_job_id, since")
    if not isinstance(holder["host"], str) or type(holder["pid"]) is not int:
        raise ValueError("host must be a string and pid an integer")
    if holder["slurm_job_id"] is not None and not isinstance(holder["slurm_job_id"], str):
        raise ValueError("slurm_job_id must be a string or null")
    try:
        datetime.fromisoformat(holder["since"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"since is not an ISO 8601 time ({err})") from err
    return holder


def process_running(pid: int, since: str) -> bool:
    """Whether process ``pid`` of this host is running and could have taken a lock at ``since``."""
    try:
        process = psutil.Process(pid)
        started = process.create_time()
        ended = process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    return not ended and started <= datetime.fromisoformat(since).timestamp() + START_TIME_SLACK_S


def slurm_job_state(job_id: str) -> str:
    """The job's state as squeue prints it (RUNNING, COMPLETED, ...), "" if Slurm no longer knows the job
    (it ended long ago). SlurmUnavailable if Slurm cannot be asked."""
    command = ["squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmUnavailable(f"`{' '.join(command)}` could not be run: {err}") from err
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return ""
        raise SlurmUnavailable(f"`{' '.join(command)}` exited with status {proc.returncode}: "
                               f"{proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def judge(holder: dict, me: dict, process_running=process_running, slurm_job_state=slurm_job_state) -> Verdict:
    """Whether ``me`` may take over the lock of ``holder``, and why."""
    pid, job = holder["pid"], holder["slurm_job_id"]
    if holder["host"] == me["host"]:
        if process_running(pid, holder["since"]):
            return Verdict(False, f"its process {pid} is running on this host")
        return Verdict(True, f"its process {pid} on this host has ended")
    if job is None:
        return Verdict(False, f"it is on another host and not a Slurm job, so whether it still runs cannot be "
                              f"checked from {me['host']}")
    if job == me["slurm_job_id"]:
        return Verdict(True, f"it is this Slurm job ({job}), started again (requeued)")
    try:
        state = slurm_job_state(job)
    except SlurmUnavailable as err:
        return Verdict(False, f"Slurm could not be asked whether job {job} still runs: {err}")
    if state == "":
        return Verdict(True, f"Slurm no longer knows job {job} (it ended)")
    if state in SLURM_ENDED:
        return Verdict(True, f"Slurm job {job} has ended ({state})")
    return Verdict(False, f"Slurm job {job} is {state}")


def _read(path: str) -> str | None:
    """The lock file's text, None if there is none. A run that has just created the file may not have written
    it yet: an empty file is read again a moment later."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if not text:
            time.sleep(1)
            text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return text


def _create(path: str, text: str) -> bool:
    """Create the lock file holding ``text``; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def _remove_if_unchanged(path: str, text: str) -> None:
    """Remove the lock file if it still holds ``text``. Two runs may take over the same stale lock at once: the
    file is first moved aside (only one of them gets it), and put back if it is no longer the stale one."""
    aside = f"{path}.stale.{socket.gethostname()}.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = _read(aside)
        if moved != text:
            _create(path, moved)  # another run's fresh lock (unless a third run has just made one)
    finally:
        os.unlink(aside)


class RunLock:
    """The lock file this process holds."""

    def __init__(self, path: str, text: str):
        self.path, self.text = path, text

    def release(self) -> None:
        """Remove the lock, unless it is no longer this process's (then it belongs to the run that took it over)."""
        if _read(self.path) == self.text:
            os.unlink(self.path)


def acquire(log_dir: str, note, process_running=process_running, slurm_job_state=slurm_job_state) -> RunLock:
    """Take the log dir's lock for this process, taking over a lock whose holder is gone (``note`` gets a line
    saying so). LogDirInUse if another run holds it."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, LOCK_FILE)
    me = this_process()
    text = json.dumps(me) + "\n"
    for _ in range(3):  # a lock released, or taken over by another run, between two looks: look again
        if _create(path, text):
            return RunLock(path, text)
        found = _read(path)
        if found is None:
            continue
        try:
            holder = parse_lock(found)
        except ValueError as err:
            raise LogDirInUse(f"{path} cannot be read as a lock ({err}). If no run uses {log_dir}, delete the "
                              f"file and start again.") from None
        verdict = judge(holder, me, process_running, slurm_job_state)
        if not verdict.take_over:
            raise LogDirInUse(
                f"{log_dir} is in use by another run ({describe(holder)}): {verdict.reason}. Wait for that run to "
                f"end or stop it, or give this run another exp_manager.explicit_log_dir; if that run is gone, "
                f"delete {path} and start again."
            )
        note(f"{path}: taking over the lock of {describe(holder)}: {verdict.reason}")
        _remove_if_unchanged(path, found)
    raise LogDirInUse(f"{path} changed hands while this run started: another run is starting on {log_dir}. "
                      f"Start again once it is clear which run should have it.")


def hold(log_dir: str, rank: int) -> RunLock | None:
    """Rank 0 takes the log dir's lock and every rank learns the outcome (collective: all ranks call it).
    Returns rank 0's lock (None on the other ranks); raises LogDirInUse on every rank if another run holds it."""
    lock, refusal = None, [None]
    if rank == 0:
        try:
            lock = acquire(log_dir, note=lambda line: print(line, flush=True))
        except LogDirInUse as err:
            refusal = [str(err)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise LogDirInUse(refusal[0])
    return lock
