"""LoRA DPO end to end: from a Hugging Face model, adapters-only checkpoints, merge, export to transformers.

The base is a Qwen2 (biases on q, k and v): the adapter on the fused qkv layer
adds to its output, bias included, and merging folds it into the weight alone.

(TP=2 equals TP=1, step 0 is exactly ln 2 and the base stays bitwise unchanged:
see the "lora" variant in tests/test_parallel_equivalence.py.)
"""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from checkpoint_scenarios import plain_tensors
from distributed_harness import run_world
from hf_fixtures import ROOT, TOKENS, convert, hf_log_probs, save_tiny
from nemo_dpo.config import load_config, validate
from nemo_dpo.training import checkpoint
from pipeline_scenarios import score

pytestmark = pytest.mark.slow  # real multi-process runs

RUN = [
    "model.global_batch_size=8",
    "model.micro_batch_size=2",
    "trainer.dpo.max_steps=3",
    "model.optim.lr=2e-2",
    "model.peft.lora_tuning.adapter_dim=4",
]


def test_lora_config_is_complete_and_valid():
    cfg = load_config("gpt_dpo_lora")
    validate(cfg, 2)
    assert cfg.model.peft.peft_scheme == "lora"
    assert list(cfg.model.peft.lora_tuning.target_modules) == ["attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"]
    assert cfg.model.hidden_size == load_config("gpt_dpo").model.hidden_size  # everything else from gpt_dpo.yaml


@pytest.mark.system  # LoRA's step at TP=2 is tests/test_parallel_equivalence.py's
def test_lora_from_hf_then_merge_and_export(tmp_path):
    base = tmp_path / "hf"
    base_model = save_tiny("qwen2", base)
    log_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         os.path.join(ROOT, "examples", "train_dpo.py"), "--config-name", "gpt_dpo_lora",
         f"model.restore_from_path={base}", "model.tensor_model_parallel_size=2", *RUN,
         f"exp_manager.explicit_log_dir={log_dir}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = log_dir / "checkpoints" / "step_3"

    # The checkpoint holds the adapters (and their optimizer state) only; the base is named in its config.
    tensors = run_world(1, str(tmp_path / "plain"), plain_tensors, str(ckpt))[0]
    weights = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.startswith(("optimizer.", "rng"))]
    assert weights and all("_lora." in k for k in weights), weights
    saved = checkpoint.read_metadata(ckpt)["config"]["model"]
    assert saved["restore_from_path"] == str(base)
    assert sum(tensors[k].numel() for k in weights) < base_model.num_parameters() / 4  # rank 4 of 64
    other = load_config("gpt_dpo_lora", RUN + [f"model.restore_from_path={tmp_path / 'elsewhere'}"]).model
    other.update({k: saved[k] for k in checkpoint.ARCHITECTURE_KEYS})
    with pytest.raises(checkpoint.CheckpointError, match="model.restore_from_path"):
        checkpoint.check_compatible(ckpt, other)

    # Merged and exported, the policy loads in transformers and gives our adapter model's log-probs.
    convert("merge", "--ckpt", ckpt, "--out", tmp_path / "merged")
    convert("mcore-to-hf", "--ckpt", tmp_path / "merged", "--out", tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    (ours,) = [r for r in run_world(1, str(tmp_path / "score"), score, str(base), 1, 1, str(log_dir), TOKENS,
                                    "gpt_dpo_lora", RUN) if r is not None]
    theirs = hf_log_probs(exported, TOKENS)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (theirs - hf_log_probs(base_model, TOKENS)).abs().max() > 1e-3  # the adapters changed the policy


def test_adapters_come_back_on_after_an_exception():
    from nemo_dpo.models.lora import LoRAAdapter, adapters_disabled

    model = torch.nn.Module()
    model.a = LoRAAdapter(torch.nn.Linear(8, 4), "row", rank=2, alpha=4, dropout=0.0, swiglu_fc1=False)
    model.b = LoRAAdapter(torch.nn.Linear(8, 4), "column", rank=2, alpha=4, dropout=0.0, swiglu_fc1=False)
    model.b.enabled = False  # already off stays off
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(model):
            assert not model.a.enabled and not model.b.enabled
            raise RuntimeError("boom")
    assert model.a.enabled and not model.b.enabled
