"""bench/bench_dpo.py: the FLOP count it divides by, and a real (tiny) run end to end.

Speed itself is never asserted here; the benchmark is the place for numbers.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_dpo  # noqa: E402


def test_matmul_params_are_the_linear_layers_of_the_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = bench_dpo.SHAPES["tiny"]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], tie_word_embeddings=False,
    ))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench_dpo.matmul_params(shape) == linear
    # 8N per real token, plus 16 x layers x hidden x L^2 of attention per sequence.
    n = linear
    assert bench_dpo.model_flops(shape, [10, 30]) == 8 * n * 40 + 16 * 2 * 64 * (100 + 900)


@pytest.mark.slow
def test_tiny_packed_run_reports_a_consistent_summary(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_dpo.py"), "--shape", "tiny", "--seq", "64",
           "--data", "spread", "--steps", "2", "--warmup", "1", "--frameworks", "nemo_dpo", "--dtype", "fp32",
           "--out", str(out), "--ours", "model.data.packing=true"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "real tokens/s" in proc.stdout and "MFU" in proc.stdout

    report = json.loads(out.read_text())
    result = report["results"]["nemo_dpo"]
    lengths = [n for step in report["workload"]["lengths"][1:] for n in step]
    assert len(lengths) == 2 * 2 * 4 and all(32 <= n <= 64 for n in lengths)
    seconds = sum(row["step"] for row in result["steps"][1:])
    assert abs(result["tokens_per_s"] - sum(lengths) / seconds) < 1e-6 * result["tokens_per_s"]
    assert result["reference_s"] + result["policy_s"] + result["optimizer_s"] <= result["step_s"]
    assert 0 < result["mfu"] < 1 and result["peak_memory_mib"] > 0
    assert all(row["loss"] > 0 for row in result["steps"])

    # The memory inventory: each kept role is the size of the model's parameters (Adam: two moments each), no
    # gradient is held twice, and the moments are in the order they happen.
    shape = bench_dpo.SHAPES["tiny"]
    params = bench_dpo.matmul_params(shape) + shape["vocab"] * shape["hidden"] + (2 * shape["layers"] + 1) * shape["hidden"]
    kept = result["memory"]["tensors_mib"]
    assert kept["weights"] == pytest.approx(params * 4 / 2**20)
    assert kept["gradients"] == kept["reference weights"] == kept["weights"]
    assert kept["optimizer state"] == pytest.approx(2 * kept["weights"], rel=1e-3)  # exp_avg, exp_avg_sq (+ steps)
    assert kept["fp32 master weights"] == 0  # fp32 training updates the weights themselves
    rss = result["memory"]["rss_mib"]
    assert list(rss) == ["start", "imports", "set up", "after step 1", "after step 2", "after step 3"]
    assert rss["start"] < rss["imports"] <= result["memory"]["peak_rss_mib"]
    assert "tensors kept: optimizer state" in proc.stdout


def test_the_scaling_table_divides_within_each_cell_and_the_pairs_shrink_with_the_cell():
    import bench_scaling

    assert [bench_scaling.pairs_per_step(shape, seq) for shape, seq in
            (("llama-33m", 512), ("llama-33m", 2048), ("llama-125m", 512), ("llama-125m", 2048))] == [4, 1, 2, 1]
    shape = {"name": "tiny", **bench_dpo.SHAPES["tiny"], "matmul_params": bench_dpo.matmul_params(bench_dpo.SHAPES["tiny"])}
    result = lambda tokens, mib, mfu: {"tokens_per_s": tokens, "peak_memory_mib": mib, "mfu": mfu}  # noqa: E731
    report = {"shape": shape, "workload": {"seq": 64, "pairs": 2},
              "results": {"nemo_dpo": result(300.0, 1000.0, 0.5), "trl": result(200.0, 2000.0, 0.25)}}
    row = bench_scaling.table([report]).splitlines()[-1]
    assert "| 64 | 2 | 300 | 200 | 1.50x | 1,000 | 2,000 | 0.50x | 50.0% | 25.0% |" in row
