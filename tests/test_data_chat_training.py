"""Conversational data trains in a 2-process job (gloo; one of tests/data_training_runs.py's runs)."""

import json
import math
import os

import pytest

pytestmark = pytest.mark.slow  # real multi-process runs


@pytest.mark.parametrize("tokenizer", ["hf_folder", "trained"])
def test_conversational_pairs_train_for_a_few_steps(data_training_runs, tokenizer):
    """hf_folder: the template of the tokenizer folder's tokenizer_config.json; trained: model.tokenizer.model=null,
    a SentencePiece model trained on the text rendered by a .jinja file (model.data.chat_template)."""
    run = data_training_runs[f"conversational_{tokenizer}"]
    train, validation = run.files["train"], run.files["validation"]
    assert run.status == 0, run.console[-3000:]
    assert f"train: jsonl file {train}: 64 prompt/chosen/rejected (messages)" in run.console
    assert f"validation: parquet file {validation}: 16 prompt/chosen/rejected (messages)" in run.console
    assert "train: 64 pairs" in run.console and "0 prompt-truncated and 0 dropped" in run.console
    rows = [json.loads(line) for line in open(run.folder / "run" / "metrics.jsonl")]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 1
    assert all(math.isfinite(r["loss"]) for r in rows)
    if tokenizer == "trained":  # trained by rank 0 on the rendered conversations, sent to rank 1
        assert len([f for f in os.listdir(run.folder) if f.startswith("spm_")]) == 1
