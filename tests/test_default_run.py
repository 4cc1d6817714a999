"""The README's first command: the embedded default run learns the task (real torchrun, 2 processes)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from logging_checks import assert_tensorboard_matches_metrics, colour_share, png_size
from nemo_dpo.cli.plot import PLOTS

pytestmark = pytest.mark.slow  # real multi-process runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {
    "step", "split", "loss", "preference_loss", "sft_loss", "accuracy", "rewards_chosen_mean",
    "rewards_rejected_mean", "reward_margin", "consumed_samples", "tokens_per_sec",
}


def test_torchrun_default_job_learns(tmp_path):
    # No arguments, as a new user runs it: logs go to ./runs/<name> under the working
    # directory and the tokenizer is trained into ~/.cache (both redirected into tmp_path).
    env = {**os.environ, "HOME": str(tmp_path)}
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    cmd = f"{torchrun} --nproc_per_node 2 {os.path.join(ROOT, 'examples', 'train_dpo.py')}"
    proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = [json.loads(line) for line in open(tmp_path / "runs" / "megatron_gpt_dpo" / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 126))
    timings = {"time_reference", "time_policy", "time_optimizer", "time_step"}
    assert all(KEYS | timings | {"grad_norm", "lr"} <= set(r) for r in train)
    assert all(KEYS <= set(r) for r in val)
    assert [r["step"] for r in val] == [25, 50, 75, 100, 125]
    assert train[0]["loss"] == train[0]["preference_loss"]
    assert abs(train[0]["loss"] - 0.6931472) < 1e-6  # policy == reference at step 1
    assert train[0]["reward_margin"] == 0.0
    assert train[-1]["consumed_samples"] == 125 * 32
    last = val[-1]
    assert last["accuracy"] >= 0.9, last
    assert last["reward_margin"] > 0, last
    assert last["loss"] < 0.5 * val[0]["loss"] or last["loss"] < 0.3, val
    assert os.path.isfile(tmp_path / "runs" / "megatron_gpt_dpo" / "config.yaml")
    assert any(name.startswith("spm_") for name in os.listdir(tmp_path / ".cache" / "nemo_dpo"))
    assert "val step 125" in proc.stdout

    # Logging: TensorBoard holds exactly metrics.jsonl; not a terminal, so plain lines with an ETA.
    log_dir = tmp_path / "runs" / "megatron_gpt_dpo"
    assert_tensorboard_matches_metrics(log_dir)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("train step ")]
    assert len(lines) == 125 and "\r" not in proc.stdout  # log_interval 1
    pattern = r"train step {} \| loss .* \| tokens_per_sec \d+ \| progress {}% of 125 \| elapsed \d+:\d\d \| eta {}"
    assert re.fullmatch(pattern.format(1, 1, r"\d+:\d\d"), lines[0]), lines[0]
    assert re.fullmatch(pattern.format(125, 100, "0:00"), lines[-1]), lines[-1]

    # Plots of this run, from the command line.
    plot = subprocess.run([sys.executable, "-m", "nemo_dpo.plot", str(log_dir), "--out", str(tmp_path / "plots")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert plot.stdout.split() == [str(tmp_path / "plots" / f"{name}.png") for name in PLOTS]
    for path in plot.stdout.split():
        assert png_size(path) == (800, 450) and colour_share(path, "#1f77b4") > 0.001, path
