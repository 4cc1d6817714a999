"""slurm/train_dpo.sbatch on a real one-node Slurm cluster (munged, slurmctld and slurmd started here).

Needs root (slurmd launches the tasks); installs Debian's slurm-wlm and munge with apt-get
when sbatch is missing. The jobs run 2 tasks on CPU (gloo), exactly as the template
launches them on GPU nodes, and the warning signal is delivered the way
``--signal=B:USR1@...`` delivers it: to the batch shell only.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from distributed_harness import free_ports

from nemo_dpo.training import checkpoint, run_lock

pytestmark = pytest.mark.slow  # real multi-process runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(ROOT, "slurm", "train_dpo.sbatch")
# The header asks for GPU nodes; this overrides it for one CPU node with 2 tasks.
CPU_NODE = ["-N1", "-n2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.micro_batch_size=2",
    "trainer.dpo.val_check_interval=0",
    "trainer.dpo.limit_val_batches=1",
]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def test_the_template_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", TEMPLATE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not in a Slurm job: submit this script with sbatch" in proc.stderr, proc


def test_the_template_names_a_missing_checkout(tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NAME": "x"}
    for name in ("NEMO_DPO_DIR", "CONTAINER_IMAGE"):
        env.pop(name, None)
    proc = subprocess.run(["bash", TEMPLATE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert f"{tmp_path}/examples/train_dpo.py not found: submit from the nemo-dpo checkout or set NEMO_DPO_DIR" \
        in proc.stderr, proc.stderr


# -- the cluster --------------------------------------------------------------------------


def ensure_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get if sbatch is missing; skip where that cannot be done."""
    if all(shutil.which(tool) for tool in ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0:
        pytest.skip(f"Slurm is not installed and installing it needs root (running as uid {os.geteuid()})")
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install Debian's slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "--no-install-recommends",
               "slurm-wlm", "munge"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # the package lists may be missing or stale on a fresh machine
        update = subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=env,
                                capture_output=True, text=True, timeout=900)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"installing Slurm failed: `{' '.join(install)}` exited {proc.returncode}: "
                        f"{(proc.stderr or proc.stdout).strip()[-1500:]} (apt-get update: {update.stderr.strip()[-500:]})")


class Cluster:
    """A one-node Slurm cluster whose config, state, logs and munge key all live in ``root``."""

    def __init__(self, root):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self.daemons = []

    def write_config(self) -> None:
        host = socket.gethostname().split(".")[0]  # slurmd finds its NodeName from the short host name
        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        r = self.root
        ctld_port, slurmd_port = free_ports(2)
        self.conf.write_text(f"""\
ClusterName=nemodpotest
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={r}/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The main and backfill schedulers look at pending jobs every few seconds, not every 30-60.
SchedulerParameters=sched_interval=2,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={host} CPUs={max(2, os.cpu_count() or 1)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        r = self.root
        munged = ["munged", "--foreground", "--force", f"--key-file={r}/munge.key", f"--socket={r}/munge.socket",
                  f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed"]
        self._daemon(munged, r / "munged.log", lambda: (r / "munge.socket").exists())
        self._daemon(["slurmctld", "-D", "-f", str(self.conf)], r / "slurmctld.log",
                     lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") >= 1)
        self._daemon(["slurmd", "-D", "-f", str(self.conf)], r / "slurmd.log",
                     lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle")

    def _daemon(self, cmd, log, ready, timeout=60) -> None:
        with open(self.root / f"{cmd[0]}.stdout", "w") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons.append(proc)
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.skip(f"{cmd[0]} could not be started here (exit status {proc.returncode}): "
                            f"{self.tail(log, self.root / f'{cmd[0]}.stdout')}")
            assert time.time() < deadline, f"{cmd[0]} not ready after {timeout} s: {self.tail(log)}"
            time.sleep(0.2)

    def tail(self, *files, chars=2000) -> str:
        return " | ".join(f.read_text()[-chars:] for f in files if f.exists())

    def run(self, *cmd, check=True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        assert not check or proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"
        return proc

    def submit(self, submit_dir, name, *overrides) -> str:
        (submit_dir / "logs").mkdir(parents=True, exist_ok=True)  # as the template's header asks
        env = {k: v for k, v in self.env.items() if k not in ("RUNS_DIR", "CONTAINER_IMAGE", "MASTER_PORT")}
        env.update(PYTHON=sys.executable, NEMO_DPO_DIR=ROOT)
        cmd = ["sbatch", "--parsable", f"--job-name={name}", *CPU_NODE, TEMPLATE, *overrides]
        proc = subprocess.run(cmd, cwd=submit_dir, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"\b(JobState|Reason|Restarts|ExitCode|StdOut)=(\S+)", text))

    def wait_until(self, condition, what: str, job_id: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"job {job_id}: no {what} after {timeout} s: {self.job(job_id)}; " \
                                           f"{self.tail(self.root / 'slurmctld.log', self.root / 'slurmd.log')}"
            time.sleep(0.5)

    def wait_done(self, job_id: str) -> dict:
        self.wait_until(lambda: self.job(job_id)["JobState"] in DONE, "end", job_id)
        return self.job(job_id)

    def stop(self) -> None:
        """Cancel what is left, stop the daemons, and end any process of this cluster still running."""
        if self.daemons and self.daemons[-1].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.time() + 30
                while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.time() < deadline:
                    time.sleep(0.5)
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # slurmstepd and job tasks detach from slurmd; they carry this cluster's SLURM_CONF.
        mine = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("SLURM_CONF") == str(self.conf):
                    mine.append(p)
            except (psutil.Error, OSError):
                continue
        for p in mine:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(mine, timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = time.time()
    ensure_slurm_installed()
    print(f"Slurm available after {time.time() - started:.1f} s")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.write_config()
        c.start()
        yield c
    finally:
        c.stop()


# -- jobs ---------------------------------------------------------------------------------


def train_steps(log_dir) -> list:
    """Steps of the train rows in metrics.jsonl so far (a line still being written is left out)."""
    lines = (log_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    rows = [json.loads(line) for line in lines if line.endswith("\n")]
    return [r["step"] for r in rows if r["split"] == "train"]


def test_sbatch_runs_two_ranks_that_train_and_checkpoint(cluster, tmp_path):
    cache = tmp_path / "tokenizer"
    job = cluster.submit(tmp_path, "plain", *SMALL, "model.global_batch_size=8", "trainer.dpo.max_steps=4",
                         "trainer.dpo.save_interval=2", f"model.tokenizer.cache_dir={cache}")
    info = cluster.wait_done(job)
    out_file = tmp_path / "logs" / f"plain-{job}.out"  # the header's logs/%x-%j.out, under the submit dir
    assert info["StdOut"] == str(out_file)
    out = out_file.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, out)

    log_dir = tmp_path / "runs" / "plain"  # <RUNS_DIR>/<job name>
    assert f"nemo-dpo: job {job} (restart 0) on 1 node(s), 2 ranks" in out
    assert f"DP=2, global batch 8 pairs = 2 x 2 microbatches x DP 2; logs in {log_dir}" in out  # one world of 2
    assert "train step 4 |" in out and "requeue" not in out
    assert train_steps(log_dir) == [1, 2, 3, 4]
    assert checkpoint.newest_complete(log_dir / "checkpoints") == log_dir / "checkpoints" / "step_4"
    assert (log_dir / "checkpoints" / "step_2").is_dir()


def test_a_failing_run_fails_the_job_and_is_not_requeued(cluster, tmp_path):
    job = cluster.submit(tmp_path, "broken", "model.dpo.preference_loss=nope")
    info = cluster.wait_done(job)
    out = (tmp_path / "logs" / f"broken-{job}.out").read_text()
    # Status 2 from the ranks (a config error), or 143 where srun's --kill-on-bad-exit ended the other rank first.
    status = re.search(r"nemo-dpo: training failed with status (\d+); not requeued", out)
    assert status and status.group(1) in ("2", "143") and "config error" in out, out
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{status.group(1)}:0", (info, out)
    assert info["Restarts"] == "0" and "requeueing" not in out


def test_term_to_the_ranks_saves_and_stops_without_requeue(cluster, tmp_path):
    steps = 24
    job = cluster.submit(tmp_path, "stop", *SMALL, "model.global_batch_size=64", f"trainer.dpo.max_steps={steps}",
                         "trainer.dpo.save_interval=0", f"model.tokenizer.cache_dir={tmp_path / 'tokenizer'}")
    log_dir = tmp_path / "runs" / "stop"
    cluster.wait_until(lambda: (log_dir / "metrics.jsonl").exists() and train_steps(log_dir), "training step", job)

    cluster.run("scancel", "--signal=TERM", job)  # the job's steps only: the ranks, not the batch shell or srun
    info = cluster.wait_done(job)
    out = (tmp_path / "logs" / f"stop-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, out)
    saved = int(re.search(r"preempted: checkpoint of step (\d+) complete", out).group(1))
    assert saved < steps and "requeue" not in out, out
    assert train_steps(log_dir) == list(range(1, saved + 1))
    assert checkpoint.newest_complete(log_dir / "checkpoints") == log_dir / "checkpoints" / f"step_{saved}"


def test_the_warning_signal_saves_requeues_and_the_job_resumes(cluster, tmp_path):
    steps = 24  # long steps (16 microbatches per rank), so the signal lands well before the last one
    cache = tmp_path / "tokenizer"
    job = cluster.submit(tmp_path, "preempt", *SMALL, "model.global_batch_size=64", f"trainer.dpo.max_steps={steps}",
                         "trainer.dpo.save_interval=4", f"model.tokenizer.cache_dir={cache}")
    log_dir = tmp_path / "runs" / "preempt"
    metrics = log_dir / "metrics.jsonl"
    cluster.wait_until(lambda: metrics.exists() and train_steps(log_dir), "training step", job)

    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@300 sends
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # a second warning is not passed on to the ranks
    info = cluster.wait_done(job)  # the requeued run's end: a requeued job is pending, not done
    out = (tmp_path / "logs" / f"preempt-{job}.out").read_text()  # both runs, appended
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, out)

    first, second = out.split(f"nemo-dpo: job {job} (restart 1)")
    assert "nemo-dpo: got USR1" in first
    # Slurm signals every process of the step; only the ranks themselves react (once each)
    assert first.count("rank 0: got SIGUSR1") == 1 and first.count("rank 1: got SIGUSR1") == 1, first
    assert "second signal" not in first
    saved = int(re.search(r"preempted: checkpoint of step (\d+) complete", first).group(1))
    assert saved < steps, "the signal came after the last step: nothing was tested"
    assert f"nemo-dpo: checkpoint saved; requeueing job {job}" in first
    assert f"checkpoint: resumed from {log_dir}/checkpoints/step_{saved} at step {saved}" in second
    assert f"train step {saved + 1} |" in second and f"train step {saved} |" not in second
    assert "requeueing" not in second
    assert train_steps(log_dir) == list(range(1, steps + 1))  # every step once, across the two runs
    assert checkpoint.newest_complete(log_dir / "checkpoints") == log_dir / "checkpoints" / f"step_{steps}"


def test_a_run_lock_of_another_slurm_job_stands_while_slurm_says_it_runs(cluster, tmp_path, monkeypatch):
    """run_lock asks the real squeue: the lock of a job on another node stands while the job runs, not after."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    job = cluster.run("sbatch", "--parsable", "-n1", "--wrap", "sleep 300", cwd=tmp_path).stdout.strip()
    holder = {"host": "another-node", "pid": 1, "slurm_job_id": job, "since": "2026-01-01T00:00:00+00:00"}
    me = run_lock.this_process()
    cluster.wait_until(lambda: run_lock.slurm_job_state(job) == "RUNNING", "start", job)
    assert run_lock.judge(holder, me) == (False, f"Slurm job {job} is RUNNING")
    cluster.run("scancel", job)
    cluster.wait_until(lambda: run_lock.slurm_job_state(job) == "CANCELLED", "cancellation", job)
    assert run_lock.judge(holder, me) == (True, f"Slurm job {job} has ended (CANCELLED)")
    assert run_lock.slurm_job_state("999999") == ""  # a job Slurm does not know
