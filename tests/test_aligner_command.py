"""NeMo-Aligner's documented DPO command (docs/user-guide/dpo.rst, quoted in the README) runs unchanged: only its
paths are replaced, by a .nemo laid out as NeMo writes it and data in Aligner's format; torchrun starts the 8
processes it names, and it trains its epoch of 2 steps."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from chat_fixtures import default_task_records, write_jsonl
from distributed_harness import run_world
from nemo_fixtures import build_in_a_world

pytestmark = pytest.mark.slow  # a real 8-process torchrun job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def documented_command() -> list:
    """The user guide's command as the README quotes it, continuations joined."""
    section = README.split("## Coming from NeMo-Aligner", 1)[1]
    block = re.search(r"```text\n(python -u .*?)```", section, re.S).group(1)
    return shlex.split(re.sub(r"\\\n\s*", " ", block))


def test_the_documented_command_trains_two_steps_at_the_world_size_it_names(tmp_path):
    home = tmp_path / "home"  # the command leaves model.tokenizer.cache_dir at ~/.cache/nemo_dpo
    nemo = str(tmp_path / "megatron_gpt_sft.nemo")
    run_world(1, str(tmp_path / "build"), build_in_a_world, nemo, str(home / ".cache" / "nemo_dpo"))
    aligner = [{"prompt": r["prompt"], "chosen_response": r["chosen"], "rejected_response": r["rejected"]}
               for r in default_task_records("train", 1536)]
    paths = {"TRAIN_DATA_PATH": write_jsonl(tmp_path / "train_dpo_format.jsonl", aligner[:1024]),
             "VALID_DATA_PATH": write_jsonl(tmp_path / "valid_dpo_format.jsonl", aligner[1024:])}
    results = str(tmp_path / "results")

    argv = documented_command()
    assert argv[:2] == ["python", "-u"] and argv[2].endswith("/examples/nlp/gpt/train_gpt_dpo.py")
    args = [re.sub(r"\$\{(\w+)\}", lambda m: paths[m.group(1)], a) for a in argv[3:]]
    args = [a.replace("/path/to/megatron_gpt_sft.nemo", nemo).replace("=/results", f"={results}") for a in args]
    named = dict(a.split("=", 1) for a in args if a.startswith("trainer.num_nodes=") or a.startswith("trainer.devices="))
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    ran = subprocess.run(
        [*torchrun.split(), "--nnodes", named["trainer.num_nodes"], "--nproc_per_node", named["trainer.devices"],
         os.path.join(ROOT, "examples", "train_dpo.py"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"},
    )
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    out = ran.stdout
    assert f"initial policy and reference: {nemo}" in out
    assert f"test: {paths['VALID_DATA_PATH']} (model.data.data_prefix.test, NeMo-Aligner's test split) is not read" in out
    assert "training 2 steps: TP=1 PP=1 DP=8, global batch 512 pairs = 1 x 64 microbatches x DP 8" in out
    rows = [json.loads(line) for line in open(os.path.join(results, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and rows[-1]["split"] == "val" and rows[-1]["step"] == 2
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: the policy is its reference
    assert all(math.isfinite(r["loss"]) for r in rows)
    saved = json.load(open(os.path.join(results, "checkpoints", "step_2", "nemo_dpo.json")))["config"]
    assert saved["model"]["restore_from_path"] == nemo and saved["model"]["num_layers"] == 2
    assert (saved["model"]["micro_batch_size"], saved["model"]["global_batch_size"]) == (1, 512)
    assert (saved["trainer"]["num_nodes"], saved["trainer"]["devices"]) == (1, 8)
    assert saved["model"]["dpo"]["ref_policy_kl_penalty"] == 0.1
    assert saved["exp_manager"]["wandb_logger_kwargs"] == {"project": "dpo_training", "name": "dpo_training"}
