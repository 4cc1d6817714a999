"""A Llama-style Hugging Face tokenizer folder (its post-processor adds <s>) trains in a real 2-process torchrun job,
and the batches of that run start every sequence with exactly one BOS."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from bos_fixtures import save_bos_tokenizer
from chat_fixtures import default_task_records, write_jsonl
from omegaconf import OmegaConf

from nemo_dpo.data.batching import Microbatcher, global_batches
from nemo_dpo.data.pipeline import load_run_data

pytestmark = pytest.mark.slow  # a real multi-process run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_bos_adding_tokenizer_folder_trains_with_one_bos_per_sequence(tmp_path):
    folder = save_bos_tokenizer(tmp_path / "tok", "llama")
    train = write_jsonl(tmp_path / "train.jsonl", default_task_records("train", 64))
    validation = write_jsonl(tmp_path / "validation.jsonl", default_task_records("validation", 16))
    run_dir = tmp_path / "run"
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    cmd = [*torchrun.split(), "--nproc_per_node", "2", os.path.join(ROOT, "examples", "train_dpo.py"),
           f"model.tokenizer.model={folder}", f"model.data.data_prefix.train={train}",
           f"model.data.data_prefix.validation={validation}", f"exp_manager.explicit_log_dir={run_dir}",
           "model.encoder_seq_length=64", "model.max_position_embeddings=64", "model.num_layers=2",
           "model.global_batch_size=8", "model.micro_batch_size=2", "trainer.dpo.max_steps=2", "model.data.packing=false",
           "trainer.dpo.val_check_interval=0", "trainer.dpo.limit_val_batches=1"]
    ran = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 1
    assert all(math.isfinite(r["loss"]) for r in rows)

    # The run's own config, through the real reader, tokenizer and batching: the run printed the same pair lines.
    cfg = OmegaConf.load(run_dir / "config.yaml")
    lines = []
    data = load_run_data(cfg.model, str(tmp_path / "check"), 0, lines.append)
    pair_lines = [line for line in lines if " pairs from " in line]
    assert len(pair_lines) == 2 and all(line in ran.stdout for line in pair_lines)
    bos = data.tokenizer.bos_id
    assert bos >= 0 and bos != data.tokenizer.pad_id
    m = cfg.model
    for indices in global_batches(len(data.pairs["train"]), m.global_batch_size, m.seed, 0)[:2]:
        for dp_rank in (0, 1):
            batcher = Microbatcher(m.micro_batch_size, m.data.packing, data.tokenizer.pad_id, dp_rank, 2, "cpu")
            for microbatch in batcher([data.pairs["train"][i] for i in indices]):
                for row in microbatch.tokens.tolist():
                    assert row[0] == bos and row.count(bos) == 1
