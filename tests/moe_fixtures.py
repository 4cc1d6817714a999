"""Tiny Mixtral and Qwen3-MoE models made by transformers, for tests/test_hf_moe_families.py.

Three cases: Mixtral (top-2 of 8, untied, trained with its aux loss:
``output_router_logits`` true), Qwen3-MoE with ``norm_topk_prob`` (tied, a head
size of its own, experts smaller than ``intermediate_size``) and Qwen3-MoE
without it (top-3, the softmax over all experts kept as it is). Every router is made
*decisive*: its weights are scaled by ROUTER_SCALE after the usual random
init, so that the k-th and (k+1)-th router logits of a token lie far apart
(tests/test_hf_moe_families.py measures the smallest gap). A near-tie would let
rounding differences between implementations (transformers against megatron, one
layout against another) send a token to another expert and change its
log-probs by far more than any tolerance. SETTINGS names the ``model``
settings each folder must give.
"""

import os

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_fixtures import randomized, save_tokenizer

VOCAB = 300
SEQUENCE = 320  # tokens scored per sequence
EXPERTS = 8
ROUTER_SCALE = 10.0
MIXTRAL_AUX = 0.02
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    num_experts_per_tok=2, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)
CASES = {
    "mixtral": (MixtralForCausalLM, MixtralConfig(
        **BASE, num_local_experts=EXPERTS, output_router_logits=True, router_aux_loss_coef=MIXTRAL_AUX,
        tie_word_embeddings=False)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **BASE, num_experts=EXPERTS, moe_intermediate_size=32, head_dim=32, norm_topk_prob=True,
        tie_word_embeddings=True)),
    "qwen3_moe_softmax": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **{**BASE, "num_experts_per_tok": 3}, num_experts=EXPERTS, moe_intermediate_size=32, norm_topk_prob=False,
        tie_word_embeddings=False)),
}
# The model section each Hugging Face folder defines (tests/test_hf_architecture.py counts them too).
SETTINGS = {
    "mixtral": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2, kv_channels=None,
        qk_layernorm=False, share_embeddings_and_output_weights=False, num_moe_experts=EXPERTS, moe_router_topk=2,
        moe_ffn_hidden_size=None, moe_router_pre_softmax=False, moe_aux_loss_coeff=MIXTRAL_AUX),
    "qwen3_moe": dict(
        kv_channels=32, qk_layernorm=True, share_embeddings_and_output_weights=True, num_moe_experts=EXPERTS,
        moe_router_topk=2, ffn_hidden_size=48, moe_ffn_hidden_size=32, moe_router_pre_softmax=False,
        moe_aux_loss_coeff=0.0),
    "qwen3_moe_softmax": dict(
        kv_channels=None, qk_layernorm=True, share_embeddings_and_output_weights=False, num_moe_experts=EXPERTS,
        moe_router_topk=3, moe_ffn_hidden_size=32, moe_router_pre_softmax=True, moe_aux_loss_coeff=0.0),
}


def router_weights(model) -> list:
    """The router matrix of every layer."""
    return [layer.mlp.gate.weight for layer in model.model.layers]


def save_case(name: str, folder) -> torch.nn.Module:
    """Case ``name`` with random weights and decisive routers, saved with a generation_config.json and a tokenizer."""
    model_class, config = CASES[name]
    model = randomized(model_class(config))
    with torch.no_grad():
        for weight in router_weights(model):
            weight.mul_(ROUTER_SCALE)
    model.generation_config.eos_token_id = [2, 7]
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder)
    return model


def save_cases(root) -> dict:
    """{case: (transformers model, its folder)} for every case."""
    torch.manual_seed(0)
    return {name: (save_case(name, os.path.join(root, name)), os.path.join(root, name)) for name in CASES}
