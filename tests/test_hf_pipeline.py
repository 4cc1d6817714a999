"""Hugging Face in and out, end to end: the convert CLI, DPO from an HF folder, export after training.

Tiny Llama and GPT-2 models with random weights are saved by transformers with a
byte-level BPE tokenizer. Imported with ``python -m nemo_dpo.convert`` and loaded
at TP=2 and PP=2 they give transformers' log-probs (1e-4); exported back, every
tensor is reproduced exactly; trained with DPO straight from the HF folder and
exported, they load in transformers and match our log-probs (1e-4).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from distributed_harness import run_world
from hf_fixtures import ROOT, TOKENS, convert, hf_log_probs, save_tiny
from nemo_dpo.models.hf.safetensors_io import read_safetensors
from pipeline_scenarios import score

pytestmark = [pytest.mark.slow, pytest.mark.system]  # Llama and GPT-2 at TP=2 and PP=2 (tests/test_hf_dense_families.py is the default layer's)
FAMILIES = ("llama", "gpt2")  # Llama 3 and the Qwens: tests/test_hf_dense_families.py

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_pipeline")
    hf = {}
    for name in FAMILIES:
        hf[name] = save_tiny(name, root / "hf" / name)
        convert("hf-to-mcore", "--hf-dir", root / "hf" / name, "--out", root / "mcore" / name, "--tp", 2)
    return root, hf


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_imported_checkpoints_match_transformers(work, tp, pp):
    root, hf = work
    for name, model in hf.items():
        ranks = run_world(2, str(root / f"score_{name}_{tp}{pp}"), score, str(root / "mcore" / name), tp, pp,
                          str(root / f"log_{name}_{tp}{pp}"), TOKENS)
        ours = [r for r in ranks if r is not None]
        assert len(ours) == 1
        torch.testing.assert_close(ours[0], hf_log_probs(model, TOKENS), atol=1e-4, rtol=0)


def test_export_after_import_reproduces_every_tensor(work):
    root, _ = work
    for name in FAMILIES:
        out = root / "exported" / name
        convert("mcore-to-hf", "--ckpt", root / "mcore" / name, "--out", out)
        original = read_safetensors(str(root / "hf" / name / "model.safetensors"))
        exported = read_safetensors(str(out / "model.safetensors"))
        original = {k: v for k, v in original.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        assert set(exported) == set(original)
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), key
        assert (out / "tokenizer.json").is_file()
        assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_dpo_from_hf_folder_then_export_loads_in_transformers(work):
    root, hf = work
    log_dir = root / "dpo_llama"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            os.path.join(ROOT, "examples", "train_dpo.py"),
            f"model.restore_from_path={root / 'hf' / 'llama'}", "model.tensor_model_parallel_size=2",
            "model.global_batch_size=8", "model.micro_batch_size=2", "trainer.dpo.max_steps=3",
            "model.optim.lr=1e-3", f"exp_manager.explicit_log_dir={log_dir}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model.num_query_groups: None -> 2" in proc.stdout  # the architecture came from config.json
    ckpt = log_dir / "checkpoints" / "step_3"
    convert("mcore-to-hf", "--ckpt", ckpt, "--out", root / "dpo_llama_hf")
    trained = AutoModelForCausalLM.from_pretrained(root / "dpo_llama_hf").eval()
    theirs = hf_log_probs(trained, TOKENS)
    (ours,) = [r for r in run_world(1, str(root / "score_trained"), score, str(ckpt), 1, 1,
                                    str(root / "log_trained"), TOKENS) if r is not None]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (theirs - hf_log_probs(hf["llama"], TOKENS)).abs().max() > 1e-3  # training changed the policy


def test_convert_refuses_to_overwrite_and_names_problems(work, tmp_path):
    root, _ = work
    proc = convert("hf-to-mcore", "--hf-dir", root / "hf" / "llama", "--out", root / "mcore" / "gpt2", check=False)
    assert proc.returncode == 2 and "already exists and is not an empty folder" in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = convert("hf-to-mcore", "--hf-dir", tmp_path / "bad", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "bert" in proc.stderr and "config.json" in proc.stderr
    assert not (tmp_path / "out").exists()
