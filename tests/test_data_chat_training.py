"""Conversational data trains in a real 2-process torchrun job (gloo)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chat_fixtures import CHATML, conversation, default_task_records, save_chatml_tokenizer, write_jsonl

pytestmark = pytest.mark.slow  # real multi-process runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("tokenizer", ["hf_folder", "trained"])
def test_conversational_pairs_train_for_a_few_steps(tmp_path, tokenizer):
    """hf_folder: the template of the tokenizer folder's tokenizer_config.json; trained: model.tokenizer.model=null,
    a SentencePiece model trained on the text rendered by a .jinja file (model.data.chat_template)."""
    if tokenizer == "hf_folder":
        settings = [f"model.tokenizer.model={save_chatml_tokenizer(tmp_path / 'tok')}"]
    else:
        (tmp_path / "chatml.jinja").write_text(CHATML.replace("<|im_end|>", "{{ eos_token }}"))
        settings = [f"model.data.chat_template={tmp_path / 'chatml.jinja'}", f"model.tokenizer.cache_dir={tmp_path}"]
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(r) for r in default_task_records("train", 64)])
    validation = str(tmp_path / "validation.parquet")
    pq.write_table(pa.Table.from_pylist([conversation(r) for r in default_task_records("validation", 16)]), validation)
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    cmd = [*torchrun.split(), "--nproc_per_node", "2", os.path.join(ROOT, "examples", "train_dpo.py"),
           *settings, f"model.data.data_prefix.train={train}",
           f"model.data.data_prefix.validation={validation}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
           "model.encoder_seq_length=256", "model.max_position_embeddings=256", "model.num_layers=2",
           "model.global_batch_size=8", "model.micro_batch_size=2", "trainer.dpo.max_steps=3",
           "trainer.dpo.val_check_interval=0", "trainer.dpo.limit_val_batches=1"]
    ran = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert f"train: jsonl file {train}: 64 prompt/chosen/rejected (messages)" in ran.stdout
    assert f"validation: parquet file {validation}: 16 prompt/chosen/rejected (messages)" in ran.stdout
    assert "train: 64 pairs" in ran.stdout and "0 prompt-truncated and 0 dropped" in ran.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 1
    assert all(math.isfinite(r["loss"]) for r in rows)
    if tokenizer == "trained":  # trained by rank 0 on the rendered conversations, sent to rank 1
        assert len([f for f in os.listdir(tmp_path) if f.startswith("spm_")]) == 1
