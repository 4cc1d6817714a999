"""The Llama family (LlamaForCausalLM, and Mistral, the same network) <-> megatron's GPTModel.

RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases. Megatron's SwiGLU
``linear_fc1`` is [gate; up] where HF keeps gate_proj and up_proj apart. RoPE
needs no permutation: megatron's default (non-interleaved) rotation is HF
Llama's rotate-half. Configs that would change the function (rope scaling,
partial rotary, a sliding window shorter than the context, biases, another
activation or head size) are refused rather than silently approximated.
"""

import torch

from nemo_dpo.models.hf.family import (
    Family,
    TensorRule,
    config_size,
    config_value,
    interleave_qkv,
    mismatches,
    not_supported,
    split_qkv,
    vocabulary_config,
)


def _rotary_base(hf_config: dict) -> int:
    """RoPE theta from either spelling (``rope_theta`` / ``rope_scaling`` or v5's ``rope_parameters``)."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf_config.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise not_supported(f"{key}.rope_type", rope_type, "only plain RoPE; no rope scaling")
    params = hf_config.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise not_supported("partial_rotary_factor", partial, "RoPE must cover the whole head")
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if theta != int(theta):
        raise not_supported("rope_theta", theta, "model.rotary_base is an integer")
    return int(theta)


class Llama(Family):
    model_types = ("llama", "mistral")
    architecture = "LlamaForCausalLM"

    def model_settings(self, hf_config: dict) -> dict:
        hidden = config_size(hf_config, "hidden_size")
        heads = config_size(hf_config, "num_attention_heads")
        max_positions = config_size(hf_config, "max_position_embeddings")
        head_dim = config_size(hf_config, "head_dim", hidden // heads)
        if hidden % heads or head_dim != hidden // heads:
            raise not_supported("head_dim", head_dim, f"must be hidden_size / num_attention_heads = {hidden} / {heads}")
        act = config_value(hf_config, "hidden_act", str, "silu")
        if act != "silu":
            raise not_supported("hidden_act", act, "Llama's MLP must be SwiGLU, i.e. silu")
        for key in ("attention_bias", "mlp_bias"):
            if config_value(hf_config, key, bool, False):
                raise not_supported(key, True, "Llama layers here have no biases")
        window = config_size(hf_config, "sliding_window", max_positions)
        if window < max_positions:
            raise not_supported("sliding_window", window, f"attention must see all {max_positions} positions")
        return {
            "num_layers": config_size(hf_config, "num_hidden_layers"),
            "hidden_size": hidden,
            "ffn_hidden_size": config_size(hf_config, "intermediate_size"),
            "num_attention_heads": heads,
            "num_query_groups": config_size(hf_config, "num_key_value_heads", heads),
            "position_embedding_type": "rope",
            "rotary_base": _rotary_base(hf_config),
            "normalization": "RMSNorm",
            "layernorm_epsilon": config_value(hf_config, "rms_norm_eps", float, 1e-6),
            "activation": "swiglu",
            "bias": False,
            "share_embeddings_and_output_weights": config_value(hf_config, "tie_word_embeddings", bool, False),
            "max_position_embeddings": max_positions,
        }

    def export_mismatches(self, model_cfg) -> list[str]:
        return mismatches(
            model_cfg,
            {
                "normalization": ("RMSNorm",),
                "activation": ("swiglu",),
                "position_embedding_type": ("rope",),
                "bias": (False,),
            },
        )

    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        heads, hidden = model_cfg["num_attention_heads"], model_cfg["hidden_size"]
        return {
            "architectures": [self.architecture],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": model_cfg["ffn_hidden_size"],
            "num_hidden_layers": model_cfg["num_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": model_cfg["num_query_groups"] or heads,
            "head_dim": hidden // heads,
            "hidden_act": "silu",
            "max_position_embeddings": model_cfg["max_position_embeddings"],
            "rms_norm_eps": model_cfg["layernorm_epsilon"],
            "rope_theta": float(model_cfg["rotary_base"]),
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": model_cfg["attention_dropout"],
            **vocabulary_config(model_cfg, vocab_size, eos_id, bos_id),
        }

    def rules(self, settings: dict, vocab: int) -> list[TensorRule]:
        h, ffn = settings["hidden_size"], settings["ffn_hidden_size"]
        heads, groups = settings["num_attention_heads"], settings["num_query_groups"]
        d = h // heads
        rules = [TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((vocab, h),), vocab=True)]
        for i in range(settings["num_layers"]):
            g, p = f"decoder.layers.{i}.", f"model.layers.{i}."
            rules += [
                TensorRule(g + "input_layernorm.weight", (p + "input_layernorm.weight",), ((h,),)),
                TensorRule(
                    g + "self_attention.linear_qkv.weight",
                    tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
                    ((heads * d, h), (groups * d, h), (groups * d, h)),
                    to_global=lambda ts: interleave_qkv(*ts, groups),
                    to_hf=lambda t: split_qkv(t, heads, groups, d),
                ),
                TensorRule(g + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), ((h, heads * d),)),
                TensorRule(g + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), ((h,),)),
                TensorRule(
                    g + "mlp.linear_fc1.weight",
                    (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    ((ffn, h), (ffn, h)),
                    to_global=torch.cat,
                    to_hf=lambda t: list(t.chunk(2)),
                ),
                TensorRule(g + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), ((h, ffn),)),
            ]
        rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),)))
        return rules

    def weight_name(self, hf_name: str) -> str | None:
        return None if hf_name.endswith(".rotary_emb.inv_freq") else hf_name
