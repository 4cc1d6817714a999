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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from distributed_harness import run_world
from nemo_dpo.data.default_task import DEFAULT_DATA_DIR
from nemo_dpo.models.safetensors_io import read_safetensors
from pipeline_scenarios import score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}
TOKENS = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(1))


def _tokenizer(folder):
    """Byte-level BPE trained on the default task's text, so every training pair encodes."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [json.loads(line) for line in open(os.path.join(DEFAULT_DATA_DIR, "train.jsonl"))]
    tok.train_from_iterator([r[k] for r in lines[:500] for k in ("prompt", "chosen", "rejected")], trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>"}, f)


def _hf_log_probs(model, tokens):
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def convert(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "nemo_dpo.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_pipeline")
    torch.manual_seed(0)
    hf = {}
    for name, make in MODELS.items():
        model = make().eval()
        with torch.no_grad():  # far from uniform next-token distributions
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 0.2)
        model.save_pretrained(root / "hf" / name, safe_serialization=True)
        _tokenizer(root / "hf" / name)
        hf[name] = model
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
        torch.testing.assert_close(ours[0], _hf_log_probs(model, TOKENS), atol=1e-4, rtol=0)


def test_export_after_import_reproduces_every_tensor(work):
    root, _ = work
    for name in MODELS:
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
    theirs = _hf_log_probs(trained, TOKENS)
    (ours,) = [r for r in run_world(1, str(root / "score_trained"), score, str(ckpt), 1, 1,
                                    str(root / "log_trained"), TOKENS) if r is not None]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (theirs - _hf_log_probs(hf["llama"], TOKENS)).abs().max() > 1e-3  # training changed the policy


def test_convert_refuses_to_overwrite_and_names_problems(work, tmp_path):
    root, _ = work
    proc = convert("hf-to-mcore", "--hf-dir", root / "hf" / "llama", "--out", root / "mcore" / "gpt2", check=False)
    assert proc.returncode == 2 and "already exists and is not an empty folder" in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = convert("hf-to-mcore", "--hf-dir", tmp_path / "bad", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "bert" in proc.stderr and "config.json" in proc.stderr
    assert not (tmp_path / "out").exists()
