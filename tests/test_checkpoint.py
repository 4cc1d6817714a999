"""Checkpoints: exact resume after kill -9, fallback from torn checkpoints, resharding across layouts."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from checkpoint_scenarios import plain_tensors, runs_one_after_another
from distributed_harness import run_world
from logging_checks import assert_tensorboard_matches_metrics
from nemo_dpo.training import checkpoint
from parallel_scenarios import SMALL

pytestmark = pytest.mark.slow  # real multi-process runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train_dpo.py")


def torchrun(log_dir, cache, *extra, wait=True):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", TRAIN]
    args += SMALL + [
        "model.recompute_modules=auto",  # the shipped default (SMALL keeps everything for the equivalence tests)
        "trainer.dpo.max_steps=20",
        "trainer.dpo.save_interval=10",
        "trainer.dpo.val_check_interval=10",
        f"model.tokenizer.cache_dir={cache}",
        f"exp_manager.explicit_log_dir={log_dir}",
        *extra,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_for(proc, condition, what: str, timeout: float = 300) -> None:
    """Poll until ``condition()`` holds while the run is still going."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, f"the run ended (or timed out) before {what}"
        time.sleep(0.01)


def rows(log_dir, split="train"):
    return [r for r in map(json.loads, open(os.path.join(log_dir, "metrics.jsonl"))) if r["split"] == split]


def assert_same_weights(folder_a, folder_b, tmp):
    a = run_world(1, str(tmp / "load_a"), plain_tensors, str(folder_a))[0]
    b = run_world(1, str(tmp / "load_b"), plain_tensors, str(folder_b))[0]
    assert "embedding.word_embeddings.weight" in a and any(k.startswith("optimizer.") for k in a)
    assert set(a) == set(b)
    for key in a:
        if key in ("config.exp_manager.explicit_log_dir", "config.checkpoint.async_save"):
            continue
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key  # bitwise, model and optimizer state
        else:
            assert a[key] == b[key], key
    return b


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    torchrun(tmp / "run", tmp / "cache")
    return tmp


def test_kill_minus_9_and_resume_is_exact(straight_run, tmp_path):
    straight = straight_run / "run"
    killed = tmp_path / "run"
    proc = torchrun(killed, straight_run / "cache", wait=False)
    wait_for(proc, (killed / "checkpoints" / "step_10" / checkpoint.MARKER).exists, "its step-10 checkpoint")
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts ranks in their own sessions
    for p in [psutil.Process(proc.pid), *ranks]:
        p.send_signal(signal.SIGKILL)  # every rank and the launcher, no cleanup
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    assert not (killed / "checkpoints" / "step_20").exists(), "killed too late to test anything"

    out = torchrun(killed, straight_run / "cache")
    assert "step_10 at step 10" in out, out[-3000:]
    a, b = rows(straight), rows(killed)
    assert [r["step"] for r in b] == list(range(1, 21))  # each step once, the killed run's tail dropped
    for key in ("loss", "accuracy", "reward_margin", "grad_norm", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bitwise equal floats
    assert [r["loss"] for r in rows(straight, "val")] == [r["loss"] for r in rows(killed, "val")]
    assert_tensorboard_matches_metrics(killed)  # what the killed run logged after step 10 is hidden
    assert_same_weights(straight / "checkpoints" / "step_20", killed / "checkpoints" / "step_20", tmp_path)


# BCO's running mean (nemo_dpo.json) and TR-DPO's moving reference (sharded tensors), moved every 3 steps.
LOSS_STATE = ["model.dpo.preference_loss=bco_pair", "model.dpo.sync_ref_model=true", "model.dpo.ref_model_sync_steps=3",
              "model.dpo.ref_model_mixup_alpha=0.5", "trainer.dpo.max_steps=12", "trainer.dpo.save_interval=6",
              "trainer.dpo.val_check_interval=6"]


@pytest.mark.system
def test_bco_and_trdpo_state_survives_kill_minus_9_bitwise(tmp_path):
    straight, killed, cache = tmp_path / "straight", tmp_path / "killed", tmp_path / "cache"
    torchrun(straight, cache, *LOSS_STATE)
    proc = torchrun(killed, cache, *LOSS_STATE, wait=False)
    wait_for(proc, (killed / "checkpoints" / "step_6" / checkpoint.MARKER).exists, "its step-6 checkpoint")
    ranks = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *ranks]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    assert not (killed / "checkpoints" / "step_12").exists(), "killed too late to test anything"

    out = torchrun(killed, cache, *LOSS_STATE)
    assert "step_6 at step 6" in out, out[-3000:]
    a, b = rows(straight), rows(killed)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert a[6]["bco_reward_shift"] != 0  # the state the resumed steps need is not the initial one
    for key in ("loss", "bco_reward_shift", "rewards_chosen_mean", "reward_margin", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bitwise equal floats
    assert [r["loss"] for r in rows(straight, "val")] == [r["loss"] for r in rows(killed, "val")]
    folders = [run / "checkpoints" / "step_12" for run in (straight, killed)]
    states = [checkpoint.read_metadata(folder)["loss_state"]["bco_pair"] for folder in folders]
    assert states[0] == states[1] and states[0]["count"] == 12
    tensors = assert_same_weights(*folders, tmp_path)
    reference = {k[len("reference."):]: v for k, v in tensors.items() if k.startswith("reference.")}
    weights = {k for k in tensors if k.split(".")[0] in ("embedding", "decoder", "output_layer")}
    assert weights and set(reference) == weights  # every weight has its reference copy
    assert any(not torch.equal(reference[k], tensors[k]) for k in reference)  # which lags the policy


def rank_process(launcher, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under torchrun")


def test_sigterm_to_one_rank_saves_and_exits_zero_then_resumes_exactly(straight_run, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(run, straight_run / "cache", wait=False)
    wait_for(proc, lambda: (run / "metrics.jsonl").exists() and len(rows(run)) >= 3, "step 3")
    rank_process(proc, 1).send_signal(signal.SIGTERM)  # one rank only, as a scheduler might
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "rank 1: got SIGTERM" in out
    saved = int(out.split("preempted: checkpoint of step ")[1].split()[0])
    assert 3 <= saved < 20 and len(rows(run)) == saved
    assert checkpoint.newest_complete(run / "checkpoints") == run / "checkpoints" / f"step_{saved}"

    out = torchrun(run, straight_run / "cache")
    assert f"step_{saved} at step {saved}" in out
    for key in ("loss", "accuracy", "reward_margin", "grad_norm", "lr"):
        assert [r[key] for r in rows(run)] == [r[key] for r in rows(straight_run / "run")], key
    assert_tensorboard_matches_metrics(run)


def test_a_second_signal_exits_at_once_and_leaves_the_last_checkpoint_whole(straight_run, tmp_path):
    run = tmp_path / "run"
    # Long steps (32 microbatches), so that the second signal surely lands before the step ends.
    long_steps = ("model.global_batch_size=64", "trainer.dpo.save_interval=2")
    proc = torchrun(run, straight_run / "cache", *long_steps, wait=False)
    wait_for(proc, (run / "checkpoints" / "step_2" / checkpoint.MARKER).exists, "its step-2 checkpoint")
    rank0 = rank_process(proc, 0)
    rank0.send_signal(signal.SIGTERM)
    seen = []
    for line in proc.stdout:  # the first signal is acknowledged before the second is sent
        seen.append(line)
        if "rank 0: got SIGTERM" in line:
            break
    rank0.send_signal(signal.SIGTERM)
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "rank 0: second signal (SIGTERM): exiting now" in out, out[-3000:]
    assert "preempted: checkpoint of step" not in out  # no save was started
    newest = checkpoint.newest_complete(run / "checkpoints")
    assert newest == run / "checkpoints" / "step_2"

    out = torchrun(run, straight_run / "cache", *long_steps, "trainer.dpo.max_steps=3")  # resumes from it
    assert "step_2 at step 2" in out and [r["step"] for r in rows(run)] == [1, 2, 3]


@pytest.mark.system
def test_nan_at_a_step_is_skipped_by_every_rank(straight_run, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_DPO_FAULT_NAN_AT_STEP", "5")  # NaN gradients on rank 0 only
    out = torchrun(tmp_path / "run", straight_run / "cache")
    for rank in (0, 1):
        assert f"rank {rank}: step 5: non-finite loss or gradients on some rank: step skipped (1 skipped" in out
    skipped, straight = rows(tmp_path / "run"), rows(straight_run / "run")
    assert [r["skipped_steps"] for r in skipped] == [0] * 4 + [1] * 16
    assert [r["loss"] for r in skipped[:5]] == [r["loss"] for r in straight[:5]]  # up to the bad step
    assert math.isnan(skipped[4]["grad_norm"])
    assert skipped[5]["lr"] == straight[4]["lr"]  # the schedule did not advance either
    assert skipped[5]["loss"] != straight[5]["loss"]  # step 6 starts from step 4's weights


@pytest.mark.system
def test_nan_under_stop_saves_the_last_good_step_and_resume_continues(straight_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("NEMO_DPO_FAULT_NAN_AT_STEP", "13")
    proc = torchrun(run, straight_run / "cache", "trainer.dpo.nan_policy=stop", wait=False)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped: step 13: non-finite loss or gradients" in out, out[-3000:]
    assert "saved as step 12" in out
    assert checkpoint.newest_complete(run / "checkpoints") == run / "checkpoints" / "step_12"

    monkeypatch.delenv("NEMO_DPO_FAULT_NAN_AT_STEP")
    out = torchrun(run, straight_run / "cache", "trainer.dpo.nan_policy=stop")
    assert "step_12 at step 12" in out
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(straight_run / "run")]


def test_torn_checkpoints_a_garbled_latest_and_a_torn_metrics_line_are_skipped(straight_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_run / "run", run)
    folder = run / "checkpoints" / "step_20"
    shard = sorted(folder.glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    messages = []
    assert checkpoint.newest_complete(run / "checkpoints", messages.append) == run / "checkpoints" / "step_10"
    assert f"{shard} has" in messages[0] and "truncated" in messages[0]

    # Resuming falls back to step 10, replays steps 11-20 and ends where the straight run ended; a `latest` that
    # is not UTF-8 and a metrics line torn in the middle of an append (a run killed, a disk full) do not stop it.
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfestep_\x00\x81")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "split": "train", "loss": 0.6')
    out = torchrun(run, straight_run / "cache")
    assert "latest is not usable: it cannot be read as text" in out and f"{shard} has" in out, out[-3000:]
    assert "resumed from" in out and "step_10 at step 10" in out
    assert "metrics.jsonl: dropped 1 line(s) that are not whole rows (line 23" in out
    assert [r["step"] for r in rows(run)] == list(range(1, 21))
    for key in ("loss", "accuracy", "reward_margin", "grad_norm", "lr"):
        assert [r[key] for r in rows(run)] == [r[key] for r in rows(straight_run / "run")], key
    assert_tensorboard_matches_metrics(run)  # steps 11-20 once: the replay's, not also the copied run's
    assert_same_weights(straight_run / "run" / "checkpoints" / "step_20", folder, tmp_path)

    # A checkpoint without its marker (a save that never finished) is never loaded.
    (folder / checkpoint.MARKER).unlink()
    messages.clear()
    assert checkpoint.newest_complete(run / "checkpoints", messages.append) == run / "checkpoints" / "step_10"
    assert "COMPLETE.json is missing" in messages[0]
    (run / "checkpoints" / "step_10" / checkpoint.MARKER).unlink()
    assert checkpoint.newest_complete(run / "checkpoints", messages.append) is None


def _resumable_copy(straight_run, tmp_path):
    """The straight run as it was after step 10: its step-20 checkpoint gone, so a resume replays 11-20."""
    run = tmp_path / "run"
    shutil.copytree(straight_run / "run", run)
    shutil.rmtree(run / "checkpoints" / "step_20")
    return run


def test_latest_never_leads_out_of_the_run(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    other = tmp_path / "other_run" / "checkpoints" / "step_2"
    for folder in (root / "step_1", other):
        folder.mkdir(parents=True)
        (folder / "weights").write_text("w")
        (folder / checkpoint.MARKER).write_text(json.dumps({"files": {"weights": 1}}))
    for pointer in ("../../other_run/checkpoints/step_2", str(other), "step_2/../../../other_run/checkpoints/step_2"):
        (root / "latest").write_text(pointer)
        messages = []
        assert checkpoint.newest_complete(root, messages.append) == root / "step_1", pointer
        assert "not the name of a step_<N> folder" in messages[0]


def test_a_resume_runs_the_schedule_its_config_names(straight_run, tmp_path):
    """lr and max_steps changed on resume apply from the resumed step on, and config.yaml says what ran."""
    run = _resumable_copy(straight_run, tmp_path)
    torchrun(run, straight_run / "cache", "model.optim.lr=5e-4", "trainer.dpo.max_steps=12")
    got = {r["step"]: r["lr"] for r in rows(run)}
    # The schedule of a 12-step run at lr 5e-4 (SMALL has no warmup): cosine from 5e-4 to min_lr 1e-4 at step 12.
    assert got[11] == pytest.approx(1e-4 + (5e-4 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 11 / 12)), rel=1e-9)
    assert got[12] == pytest.approx(1e-4, rel=1e-9) and max(got) == 12
    assert [got[s] for s in range(1, 11)] == [r["lr"] for r in rows(straight_run / "run")][:10]
    assert "lr: 0.0005" in (run / "config.yaml").read_text()


@pytest.mark.system
def test_async_save_writes_the_same_checkpoint(straight_run, tmp_path):
    out = torchrun(tmp_path / "run", straight_run / "cache", "checkpoint.async_save=true")
    assert "checkpoint: saved" in out
    assert [r["loss"] for r in rows(tmp_path / "run")] == [r["loss"] for r in rows(straight_run / "run")]
    assert_same_weights(straight_run / "run" / "checkpoints" / "step_20", tmp_path / "run" / "checkpoints" / "step_20", tmp_path)


def test_keep_last_k_and_latest(straight_run):
    ckpts = straight_run / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_10", "step_20"]
    assert (ckpts / "latest").read_text() == "step_20"
    assert not list(ckpts.glob(".tmp_*"))


DISTOPT = ("model.optim.use_distributed_optimizer=true",)
RESHARD = {  # name: (saved at (tp, pp, dp, cp), loaded at (tp, pp, dp, cp), extra overrides)
    "tp2_to_tp1": ((2, 1, 1, 1), (1, 1, 1, 1), ()),
    "tp2_to_pp2": ((2, 1, 1, 1), (1, 2, 1, 1), ()),
    "tp2_to_dp2": ((2, 1, 1, 1), (1, 1, 2, 1), ()),
    "distopt_dp2_to_tp2": ((1, 1, 2, 1), (2, 1, 1, 1), DISTOPT),
    "cp2_to_cp1": ((1, 1, 1, 2), (1, 1, 1, 1), ()),
}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """Every origin layout saved once and every case loaded, in two launches: one of 2 processes (the origins,
    then the cases at world size 2), one of 1 (the cases at world size 1)."""
    base = tmp_path_factory.mktemp("reshard")
    origins, loads = {}, {1: {}, 2: {}}
    for case, ((tp0, pp0, dp0, cp0), (tp, pp, dp, cp), extra) in RESHARD.items():
        origin = f"origin_{tp0}{pp0}{dp0}{cp0}{len(extra)}"
        origins[origin] = (tp0, pp0, cp0, str(base / origin), extra, None)
        loads[tp * pp * dp * cp][case] = (tp, pp, cp, str(base / case), extra, str(base / origin / "checkpoints"))
    cache = str(base / "cache")
    two = {**origins, **loads[2]}
    ranks = run_world(2, str(base / "two"), runs_one_after_another, two, cache)
    ranks += run_world(1, str(base / "one"), runs_one_after_another, loads[1], cache)
    return {name: [rank[name] for rank in ranks if name in rank] for name in {**two, **loads[1]}}  # per rank


@pytest.mark.parametrize("case", list(RESHARD))
def test_checkpoint_loads_at_another_layout(resharded, case):
    """Weights (validation right after loading) and optimizer state (the next two steps) survive resharding."""
    (tp0, pp0, dp0, cp0), _, extra = RESHARD[case]
    want = resharded[f"origin_{tp0}{pp0}{dp0}{cp0}{len(extra)}"][0]
    assert want["resumed_at"] == 0
    for result in resharded[case]:
        assert result["resumed_at"] == 1
        for g, w in zip(result["after"], want["after"]):  # validation, then steps 2 and 3
            for key in ("loss", "rewards_chosen_mean", "rewards_rejected_mean", "reward_margin"):
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key
            if "grad_norm" in w:
                assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)


def test_incompatible_checkpoint_is_named_and_left_alone(straight_run):
    from nemo_dpo.config import load_config

    folder = straight_run / "run" / "checkpoints" / "step_20"
    before = checkpoint._manifest(folder)
    cfg = load_config("gpt_dpo", SMALL + ["model.hidden_size=256", "model.vocab_size=375"])
    with pytest.raises(checkpoint.CheckpointError, match=r"step_20: checkpoint has model.hidden_size=64, this run has model.hidden_size=256"):
        checkpoint.check_compatible(folder, cfg.model)
    assert checkpoint._manifest(folder) == before and checkpoint.problem(folder) is None


def test_the_checkpoint_queue_manager_leaves_scheduler_signals_to_the_rank():
    """Slurm signals every process of a job step: the forked queue manager must neither run the rank's
    preemption handler (a second "got SIGUSR1") nor die of SIGTERM while the rank saves."""
    script = """
import os, signal, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
from nemo_dpo.training.checkpoint import _writer_results_queue_without_spawn

signal.signal(signal.SIGUSR1, lambda *_: print("handler ran in", os.getpid(), flush=True))
_writer_results_queue_without_spawn()
queue = filesystem_async._results_queue
for sig in (signal.SIGUSR1, signal.SIGTERM):
    os.kill(queue._manager._process.pid, sig)
time.sleep(1)
queue.put("still serving")
print(queue.get(timeout=10), flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "still serving\n", proc.stdout
