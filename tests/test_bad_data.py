"""One bad line among 1,000 good ones, through real torchrun jobs (2 processes)."""

import os
import shutil
import subprocess
import sys

import pytest

from nemo_dpo.data.default_task import DEFAULT_DATA_DIR

pytestmark = pytest.mark.slow  # real multi-process runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(tmp_path, *overrides):
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    cmd = [*torchrun.split(), "--nproc_per_node", "2", os.path.join(ROOT, "examples", "train_dpo.py"), *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_error_stops_before_step_one_and_skip_trains_around_the_line(tmp_path):
    with open(os.path.join(DEFAULT_DATA_DIR, "train.jsonl")) as f:
        good = [next(f) for _ in range(1000)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(good[:499]) + '{"prompt": "p", "chosen": "c", "rejected": \n' + "".join(good[499:]))
    common = [f"model.data.data_prefix.train={train}", f"model.tokenizer.cache_dir={tmp_path / 'tok'}",
              "trainer.dpo.max_steps=2", "trainer.dpo.limit_val_batches=1"]

    failed = torchrun(tmp_path, *common, f"exp_manager.explicit_log_dir={tmp_path / 'strict'}")
    assert failed.returncode != 0
    assert f"{train}:500: invalid JSON" in failed.stdout + failed.stderr
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()  # nothing trained

    ran = torchrun(tmp_path, *common, "model.data.on_bad_record=skip", f"exp_manager.explicit_log_dir={tmp_path / 'lax'}")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "train: skipped 1 bad record(s)" in ran.stdout and "train: 1000 pairs" in ran.stdout
    listed = (tmp_path / "lax" / "skipped_records.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{train}:500: invalid JSON")
    assert "step 2" in ran.stdout
