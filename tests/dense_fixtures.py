"""Tiny Llama 3 / Qwen2 / Qwen3 models made by transformers, for tests/test_hf_dense_families.py.

Each case is a transformers model class and its config; the long-context ones
scale RoPE from an original length of 64 or 128 positions while the tests
score 320 tokens, so every regime of the scaling (kept, smoothed, stretched
frequencies) is used. DPO_RUNS names one case per family and the ``model`` settings its
folder must give (tests/test_hf_architecture.py counts them too).
"""

import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hf_fixtures import randomized, save_tokenizer

VOCAB = 300
SEQUENCE = 320  # tokens scored per sequence, far past the original lengths of the scaled RoPE
ORIGINAL = 64  # Llama 3 scaling's original_max_position_embeddings
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=ORIGINAL, rope_theta=500000.0)
CASES = {
    "llama3": (LlamaForCausalLM, LlamaConfig(**BASE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama3_bias_head_dim": (LlamaForCausalLM, LlamaConfig(
        **BASE, rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True, head_dim=32, tie_word_embeddings=True)),
    "llama_linear": (LlamaForCausalLM, LlamaConfig(
        **BASE, rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0))),
    "llama_yarn": (LlamaForCausalLM, LlamaConfig(**BASE, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=16.0, rope_theta=10000.0))),
    "qwen2_tied": (Qwen2ForCausalLM, Qwen2Config(
        **BASE, rope_parameters=dict(rope_type="default", rope_theta=1000000.0), tie_word_embeddings=True)),
    "qwen2_untied": (Qwen2ForCausalLM, Qwen2Config(**BASE, tie_word_embeddings=False)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(
        **BASE, head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1000000.0), tie_word_embeddings=True)),
}
SCALED = ("llama3", "llama3_bias_head_dim", "llama_linear", "llama_yarn")
# One DPO run per family, and the model section its Hugging Face folder defines.
DPO_RUNS = {
    "llama3": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=None,
        position_embedding_type="rope", rotary_base=500000, normalization="RMSNorm", layernorm_epsilon=1e-6,
        activation="swiglu", bias=False, qkv_bias=False, qk_layernorm=False, share_embeddings_and_output_weights=False,
        max_position_embeddings=512, vocab_size=VOCAB,
        rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}),
    "qwen2_untied": dict(
        kv_channels=None, rotary_base=10000, rope_scaling=None, bias=False, qkv_bias=True, qk_layernorm=False,
        share_embeddings_and_output_weights=False),
    "qwen3": dict(
        kv_channels=32, rotary_base=1000000, rope_scaling=None, bias=False, qkv_bias=False, qk_layernorm=True,
        share_embeddings_and_output_weights=True),
}


def save_cases(root) -> dict:
    """{case: (transformers model, its folder)}: weights, config, a generation_config.json and a tokenizer."""
    torch.manual_seed(0)
    saved = {}
    for name, (model_class, config) in CASES.items():
        model = randomized(model_class(config))
        model.generation_config.eos_token_id = [2, 7]  # a stop-token list, as Llama 3 Instruct has
        folder = os.path.join(root, name)
        model.save_pretrained(folder, safe_serialization=True)
        if saved:
            first = next(iter(saved.values()))[1]
            for file in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(first, file), folder)
        else:
            save_tokenizer(folder)
        saved[name] = (model, folder)
    return saved
