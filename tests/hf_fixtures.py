"""Tiny Hugging Face models, a tokenizer for the default task, and helpers shared by the HF tests."""

import json
import os
import subprocess
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nemo_dpo.data.default_task import DEFAULT_DATA_DIR

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
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(  # biases on q, k and v only
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2)),
}
TOKENS = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(1))


def save_tokenizer(folder):
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


def randomized(model):
    """Weights large enough that the next-token distribution is far from uniform."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
            elif "norm" in name or ".ln_" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


def hf_log_probs(model, tokens):
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def convert(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "nemo_dpo.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc




def save_tiny(name: str, folder) -> torch.nn.Module:
    """A tiny random model of family ``name`` with far-from-uniform outputs, saved with a tokenizer."""
    torch.manual_seed(0)
    model = randomized(MODELS[name]())
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder)
    return model
