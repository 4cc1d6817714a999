"""A Llama-style Hugging Face tokenizer folder (its post-processor adds <s>) trains in a 2-process job (one of
tests/data_training_runs.py's runs), and the batches of that run start every sequence with exactly one BOS."""

import json
import math

import pytest
from omegaconf import OmegaConf

from nemo_dpo.data.batching import Microbatcher, global_batches
from nemo_dpo.data.pipeline import load_run_data

pytestmark = pytest.mark.slow  # a real multi-process run


def test_a_bos_adding_tokenizer_folder_trains_with_one_bos_per_sequence(data_training_runs):
    run = data_training_runs["bos"]
    run_dir = run.folder / "run"
    assert run.status == 0, run.console[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 1
    assert all(math.isfinite(r["loss"]) for r in rows)

    # The run's own config, through the real reader, tokenizer and batching: the run printed the same pair lines.
    cfg = OmegaConf.load(run_dir / "config.yaml")
    lines = []
    data = load_run_data(cfg.model, str(run.folder / "check"), 0, lines.append)
    pair_lines = [line for line in lines if " pairs from " in line]
    assert len(pair_lines) == 2 and all(line in run.console for line in pair_lines)
    bos = data.tokenizer.bos_id
    assert bos >= 0 and bos != data.tokenizer.pad_id
    m = cfg.model
    for indices in global_batches(len(data.pairs["train"]), m.global_batch_size, m.seed, 0)[:2]:
        for dp_rank in (0, 1):
            batcher = Microbatcher(m.micro_batch_size, m.data.packing, data.tokenizer.pad_id, dp_rank, 2, "cpu")
            for microbatch in batcher([data.pairs["train"][i] for i in indices]):
                for row in microbatch.tokens.tolist():
                    assert row[0] == bos and row.count(bos) == 1
