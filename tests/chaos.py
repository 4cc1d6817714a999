"""Chaos, as clusters do it: one run interrupted at random moments by random faults must end as if it never was.

    python tests/chaos.py --steps 200 --faults 20 --out /tmp/chaos      # the long version (minutes)
    (tests/test_chaos.py runs a short one in the suite)

A 2-process torchrun job trains with a checkpoint every few steps. It is run
once straight, then again in another log dir where, again and again, a fault
hits it at a random moment and the same command is started again, until the
run completes. The faults: kill -9 of one rank, of the launcher alone, of
everything; SIGTERM to one rank (a preemption: save and exit 0); a save on a
full disk (the checkpoints folder is a small tmpfs, filled before a start and
emptied after the failure, which must be one line naming what was needed and
free, without a traceback); a torn ``latest`` (a pointer out of the run, bytes
that are not UTF-8, a step that is not there). At the end the interrupted run must hold every metrics
row bitwise equal to the straight run's, each step once, the same weights,
optimizer state and RNG state bitwise, and no temporary folder or file.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_scenarios import plain_tensors  # noqa: E402
from distributed_harness import run_world  # noqa: E402
from parallel_scenarios import SMALL  # noqa: E402

FAULTS = ("kill_rank", "kill_launcher", "kill_all", "sigterm", "full_disk", "torn_latest")
VOLATILE = ("tokens_per_sec",)  # measured, not computed: differs between any two runs


# The long run's model: steps and saves long enough for a fault to land inside them. The suite's short run
# keeps SMALL's, where process start-up is most of the time anyway.
LARGER = ("model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=256")


def command(log_dir: Path, cache: Path, steps: int, save_every: int, model: tuple) -> list:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "examples" / "train_dpo.py"),
        *SMALL, *model,
        f"trainer.dpo.max_steps={steps}", f"trainer.dpo.save_interval={save_every}",
        f"trainer.dpo.val_check_interval={2 * save_every}", "trainer.dpo.limit_val_batches=1",
        "exp_manager.create_tensorboard_logger=false", "trainer.enable_progress_bar=false",
        f"model.tokenizer.cache_dir={cache}", f"exp_manager.explicit_log_dir={log_dir}",
    ]


def rows(log_dir: Path) -> list:
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def last_step(log_dir: Path) -> int:
    return max((r["step"] for r in rows(log_dir)), default=0)


def start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ranks_of(proc) -> list:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _parent(process: psutil.Process):
    try:
        return process.ppid()
    except psutil.NoSuchProcess:
        return None


def wait_for_step(proc, log_dir: Path, step: int, timeout: float = 300) -> bool:
    """Until ``log_dir`` has logged ``step`` (True) or the run ended (False)."""
    deadline = time.time() + timeout
    while last_step(log_dir) < step:
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            raise TimeoutError(f"step {step} not reached in {timeout} s")
        time.sleep(0.01)
    return True


def finish(proc, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in ranks_of(proc):  # ranks run in sessions of their own: killpg does not reach them
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)  # raises, rather than waits forever, if an orphan holds the pipe
        raise RuntimeError(f"a run hung for {timeout} s; its output:\n{out[-4000:]}") from None
    for child in ranks_of(proc):  # none may outlive the launcher
        child.kill()
    return out


class TinyDisk:
    """The run's checkpoints folder on a small tmpfs that can be filled up for one save."""

    def __init__(self, folder: Path, size_bytes: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise PermissionError(f"cannot mount a tmpfs at {folder}: {done.stderr.strip()}")

    def fill(self) -> None:
        free = shutil.disk_usage(self.folder).free
        with open(self.folder / "filler", "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(free - 64 * 1024, 0))  # no room for another checkpoint

    def empty(self) -> None:
        (self.folder / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.folder)], capture_output=True)


def chaos(out: Path, steps: int, faults: int, seed: int, save_every: int = 5, kinds=FAULTS, model=LARGER) -> dict:
    """Run straight, then with ``faults`` random faults; returns what happened (and raises if they differ)."""
    rng = random.Random(seed)
    cache = out / "tokenizer_cache"
    straight = out / "straight"
    done = start(command(straight, cache, steps, save_every, model))
    log = finish(done)
    if done.returncode != 0:
        raise RuntimeError(f"the straight run failed:\n{log[-3000:]}")
    checkpoint_bytes = sum(f.stat().st_size for f in (straight / "checkpoints" / f"step_{steps}").rglob("*")
                           if f.is_file())

    chaotic = out / "chaotic"
    disk = TinyDisk(chaotic / "checkpoints", 4 * checkpoint_bytes) if "full_disk" in kinds else None
    history, recomputed, launches = [], 0, 0
    try:
        plan = [kinds[i % len(kinds)] for i in range(faults)]  # every kind, then more in turn
        rng.shuffle(plan)
        kills = [k for k in ("kill_rank", "kill_launcher", "kill_all", "sigterm") if k in kinds] or ["kill_all"]
        while True:
            fault = plan.pop() if plan and last_step(chaotic) < steps - 1 else None
            action = fault
            if fault == "torn_latest":  # between two starts, and then the run is hit again
                latest = chaotic / "checkpoints" / "latest"
                latest.parent.mkdir(parents=True, exist_ok=True)
                torn = [b"../../straight/checkpoints/step_5", b"\xff\xfe\x00", b"step_999999"]  # out of the run first
                latest.write_bytes(torn[sum(h["fault"] == "torn_latest" for h in history) % len(torn)])
                action = rng.choice(kills)
            if action == "full_disk":
                disk.fill()
            before = last_step(chaotic)
            proc = start(command(chaotic, cache, steps, save_every, model))
            launches += 1
            hit = []
            room = max(1, (steps - 1 - before) // (len(plan) + 1))  # leave steps for the faults still planned
            if action in kills and wait_for_step(proc, chaotic, rng.randint(before + 1, min(before + room, steps - 1))):
                time.sleep(rng.uniform(0, 0.3))  # anywhere inside the next step, or its save
                hit = ranks_of(proc)
                ranks = [p for p in hit if _parent(p) == proc.pid]  # the ranks, not their helper processes
                victim = rng.choice(ranks) if ranks else None
                if action == "kill_rank" and victim is not None:
                    victim.send_signal(signal.SIGKILL)
                elif action == "sigterm" and victim is not None:
                    victim.send_signal(signal.SIGTERM)
                elif action == "kill_launcher":
                    os.kill(proc.pid, signal.SIGKILL)
                elif action == "kill_all":
                    for pid in [proc.pid, *(p.pid for p in hit)]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            log = finish(proc)
            survivors = [p for p in psutil.wait_procs(hit, timeout=15)[1]]
            if survivors:  # ranks must not outlive their launcher, whatever killed it
                for p in survivors:
                    p.kill()
                raise AssertionError(f"{len(survivors)} process(es) outlived the launcher after {action}")
            if action == "full_disk":
                disk.empty()
                said = [line for line in log.splitlines() if "could not be written: the disk has no room for it" in line]
                frames = [line for line in log.splitlines() if line.strip().startswith("File ") and "nemo_dpo" in line]
                if proc.returncode == 0 or len(said) != 1 or "MiB are free); the partial write was removed" not in \
                        said[0] or frames:
                    raise AssertionError(f"a save on a full disk must stop the run with one line and no traceback "
                                         f"of ours:\n{log[-3000:]}")
            reached = last_step(chaotic)
            resumed = [int(line.split(" at step ")[1].split()[0]) for line in log.splitlines()
                       if "checkpoint: resumed from" in line]
            if resumed:
                recomputed += max(before - resumed[0], 0)
            history.append({"fault": fault, "action": action, "exit": proc.returncode, "logged_before": before,
                            "logged_after": reached, "resumed_at": resumed[0] if resumed else 0})
            if fault is None and proc.returncode == 0 and reached == steps:
                break
            if fault is None and proc.returncode != 0:
                raise RuntimeError(f"a start without a fault failed:\n{log[-3000:]}")
            if launches > faults + 10:
                raise RuntimeError(f"the run did not complete after {launches} starts: {history}")
        compare(straight, chaotic, steps)
    finally:
        if disk is not None:
            disk.close()
    return {"faults": sum(h["fault"] is not None for h in history), "starts": launches,
            "steps_recomputed": recomputed, "history": history}


def compare(straight: Path, chaotic: Path, steps: int) -> None:
    """Every row bitwise, each step once; model, optimizer and RNG state bitwise; no temporary leftovers."""
    a, b = rows(straight), rows(chaotic)
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE and not k.startswith("time_")}  # noqa: E731
    if [strip(r) for r in a] != [strip(r) for r in b]:
        diff = next(i for i, (x, y) in enumerate(zip(a, b)) if strip(x) != strip(y)) if len(a) == len(b) else "count"
        raise AssertionError(f"metrics differ from the straight run (first at row {diff}): {len(a)} vs {len(b)} rows")
    leftovers = [str(p) for p in chaotic.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    if leftovers:
        raise AssertionError(f"temporary leftovers: {leftovers}")
    folders = [run / "checkpoints" / f"step_{steps}" for run in (straight, chaotic)]
    want, got = (run_world(1, str(f.parent.parent / "loaded"), plain_tensors, str(f))[0] for f in folders)
    if set(want) != set(got) or not any(k.startswith("rng_state.") for k in want):
        raise AssertionError(f"the checkpoints hold different tensors: {sorted(set(want) ^ set(got))[:5]}")
    for key, value in want.items():
        if not (torch.equal(value, got[key]) if isinstance(value, torch.Tensor) else value == got[key]):
            raise AssertionError(f"{key} differs from the straight run's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="an empty folder for both runs")
    args = parser.parse_args()
    print(json.dumps(chaos(args.out, args.steps, args.faults, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
