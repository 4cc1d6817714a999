"""models/rope_scaling.py against transformers' own RoPE code, bit for bit.

For each rope_type, a config.json (v5's rope_parameters or v4's rope_scaling
spelling, with real checkpoints' values and small ones) is read by our Hugging
Face import; the inverse frequencies and attention factor we compute from the
resulting ``model`` section must equal what transformers computes from the
same config.json (its ROPE_INIT_FUNCTIONS).
"""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from nemo_dpo.models.hf import model_overrides_from_hf
from nemo_dpo.models.rope_scaling import attention_factor, inverse_frequencies

LLAMA_3_2 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)
CASES = {
    "llama3 (Llama 3.2)": (LlamaConfig, 64, 131072, {"rope_parameters": {**LLAMA_3_2, "rope_theta": 500000.0}}),
    "llama3 (Llama 3.1, v4 spelling)": (LlamaConfig, 128, 131072, {
        "rope_scaling": {**LLAMA_3_2, "factor": 8.0}, "rope_theta": 500000.0}),
    "llama3 (short original)": (LlamaConfig, 16, 512, {"rope_parameters": {
        **LLAMA_3_2, "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}}),
    "linear": (LlamaConfig, 16, 512, {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
    "yarn (Qwen2.5, v4 spelling)": (Qwen2Config, 128, 131072, {
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        "rope_theta": 1000000.0}),
    "yarn (betas, no truncation)": (LlamaConfig, 64, 4096, {"rope_parameters": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16.0,
        "beta_slow": 2.0, "truncate": False, "rope_theta": 10000.0}}),
    "yarn (mscale)": (LlamaConfig, 64, 4096, {"rope_parameters": {
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 100, "mscale": 1.0,
        "mscale_all_dim": 0.707, "rope_theta": 10000.0}}),
    "yarn (attention factor, factor from the lengths)": (LlamaConfig, 32, 2048, {"rope_parameters": {
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256, "attention_factor": 1.25,
        "rope_theta": 10000.0}}),
}


@pytest.mark.parametrize("case", CASES)
def test_frequencies_and_attention_factor_equal_transformers(case):
    config_class, head_dim, max_positions, rope = CASES[case]
    config_json = dict(model_type=config_class.model_type, hidden_size=4 * head_dim, num_attention_heads=4,
                       num_hidden_layers=1, intermediate_size=32, vocab_size=32, max_position_embeddings=max_positions,
                       **rope)
    hf = config_class(**config_json)
    rope_type = hf.rope_parameters["rope_type"]
    want, want_factor = ROPE_INIT_FUNCTIONS[rope_type](hf, device="cpu")

    settings = model_overrides_from_hf(config_json)
    assert settings["rope_scaling"]["rope_type"] == rope_type
    got = inverse_frequencies(head_dim, settings["rotary_base"], settings["rope_scaling"])
    assert got.dtype == want.dtype and torch.equal(got, want), (got - want).abs().max()
    assert attention_factor(settings["rope_scaling"]) == want_factor
    assert want_factor != 1.0 or rope_type != "yarn"


def test_plain_rope_is_megatrons_and_has_no_attention_factor():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    megatron = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=500000, use_cpu_initialization=True)
    assert torch.equal(inverse_frequencies(64, 500000, None), megatron.inv_freq)
    assert attention_factor(None) == 1.0
