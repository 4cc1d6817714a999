"""The Llama family (LlamaForCausalLM: Llama 1-3.x, and Mistral, the same network) <-> megatron's GPTModel.

RMSNorm, SwiGLU, RoPE (with Llama 3's long-context scaling, linear or YaRN:
models/hf/rope_parameters.py), grouped-query attention, a head size of its own
(``head_dim``, megatron's kv_channels), and biases either everywhere
(``attention_bias`` and ``mlp_bias``, megatron's ``bias``) or nowhere.
Megatron's SwiGLU ``linear_fc1`` is [gate; up] where HF keeps gate_proj and
up_proj apart. RoPE needs no permutation: megatron's default (non-interleaved)
rotation is HF Llama's rotate-half. Configs that would change the function (a
sliding window shorter than the context, biases on attention but not the MLP,
another activation) are refused rather than silently approximated.

The Qwen families (qwen2.py, qwen3.py) are this network with q/k/v biases or
query/key norms; they reuse these rules, which follow the ``model`` settings.
"""

import torch

from nemo_dpo.models.hf.family import (
    DENSE,
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
from nemo_dpo.models.hf.rope_parameters import rope_config, rope_settings

# What every family of this network needs of a ``model`` section to export it (the dense ones: DENSE too).
DECODER = {"normalization": ("RMSNorm",), "activation": ("swiglu",), "position_embedding_type": ("rope",)}


class Llama(Family):
    model_types = ("llama", "mistral")
    architecture = "LlamaForCausalLM"
    default_head_dim = None  # config.json without head_dim: hidden_size / num_attention_heads

    def layer_settings(self, hf_config: dict) -> dict:
        """``bias``, ``qkv_bias`` and ``qk_layernorm``: the family's weights beyond the Llama network's."""
        attention_bias = config_value(hf_config, "attention_bias", bool, False)
        mlp_bias = config_value(hf_config, "mlp_bias", bool, False)
        if attention_bias != mlp_bias:
            key = "attention_bias" if attention_bias else "mlp_bias"
            raise not_supported(
                key, True, "megatron has biases on every linear layer (model.bias) or on q/k/v only (model.qkv_bias)"
            )
        return {"bias": attention_bias, "qkv_bias": False, "qk_layernorm": False}

    def check_full_attention(self, hf_config: dict, max_positions: int) -> None:
        """Refuse a sliding window that would stop attention from seeing every position."""
        window = config_size(hf_config, "sliding_window", max_positions)
        if window < max_positions:
            raise not_supported("sliding_window", window, f"attention must see all {max_positions} positions")

    def model_settings(self, hf_config: dict) -> dict:
        hidden = config_size(hf_config, "hidden_size")
        heads = config_size(hf_config, "num_attention_heads")
        max_positions = config_size(hf_config, "max_position_embeddings")
        head_dim = config_size(hf_config, "head_dim", self.default_head_dim or hidden // heads)
        act = config_value(hf_config, "hidden_act", str, "silu")
        if act != "silu":
            raise not_supported("hidden_act", act, "the MLP must be SwiGLU, i.e. silu")
        self.check_full_attention(hf_config, max_positions)
        return {
            "num_layers": config_size(hf_config, "num_hidden_layers"),
            "hidden_size": hidden,
            "ffn_hidden_size": config_size(hf_config, "intermediate_size"),
            "num_attention_heads": heads,
            "num_query_groups": config_size(hf_config, "num_key_value_heads", heads),
            "kv_channels": None if head_dim * heads == hidden else head_dim,
            "position_embedding_type": "rope",
            **rope_settings(hf_config),
            "normalization": "RMSNorm",
            "layernorm_epsilon": config_value(hf_config, "rms_norm_eps", float, 1e-6),
            "activation": "swiglu",
            **self.layer_settings(hf_config),
            "share_embeddings_and_output_weights": config_value(hf_config, "tie_word_embeddings", bool, False),
            "max_position_embeddings": max_positions,
            "num_moe_experts": None,
        }

    def export_mismatches(self, model_cfg) -> list[str]:
        return mismatches(model_cfg, {**DECODER, **DENSE, "qkv_bias": (False,), "qk_layernorm": (False,)})

    def decoder_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        """The config.json keys the families of this network share."""
        heads = model_cfg["num_attention_heads"]
        return {
            "architectures": [self.architecture],
            "model_type": self.model_types[0],
            "hidden_size": model_cfg["hidden_size"],
            "intermediate_size": model_cfg["ffn_hidden_size"],
            "num_hidden_layers": model_cfg["num_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": model_cfg["num_query_groups"] or heads,
            "head_dim": model_cfg["kv_channels"] or model_cfg["hidden_size"] // heads,
            "hidden_act": "silu",
            "max_position_embeddings": model_cfg["max_position_embeddings"],
            "rms_norm_eps": model_cfg["layernorm_epsilon"],
            **rope_config(model_cfg),
            "attention_dropout": model_cfg["attention_dropout"],
            **vocabulary_config(model_cfg, vocab_size, eos_id, bos_id),
        }

    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        bias = model_cfg["bias"]
        return {**self.decoder_config(model_cfg, vocab_size, eos_id, bos_id), "attention_bias": bias, "mlp_bias": bias}

    def rules(self, settings: dict, vocab: int) -> list[TensorRule]:
        h = settings["hidden_size"]
        heads, groups = settings["num_attention_heads"], settings["num_query_groups"]
        d = settings["kv_channels"] or h // heads
        bias, qkv_bias = settings["bias"], settings["bias"] or settings["qkv_bias"]

        def qkv(g: str, p: str, kind: str, shapes: tuple) -> TensorRule:  # kind: weight or bias
            return TensorRule(
                g + f"self_attention.linear_qkv.{kind}",
                tuple(p + f"self_attn.{x}_proj.{kind}" for x in "qkv"),
                shapes,
                to_global=lambda ts: interleave_qkv(*ts, groups),
                to_hf=lambda t: split_qkv(t, heads, groups, d),
            )

        rules = [TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((vocab, h),), vocab=True)]
        for i in range(settings["num_layers"]):
            g, p = f"decoder.layers.{i}.", f"model.layers.{i}."
            rules += [
                TensorRule(g + "input_layernorm.weight", (p + "input_layernorm.weight",), ((h,),)),
                qkv(g, p, "weight", ((heads * d, h), (groups * d, h), (groups * d, h))),
                TensorRule(g + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), ((h, heads * d),)),
                TensorRule(g + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), ((h,),)),
                *self.mlp_rules(settings, g, p),
            ]
            if qkv_bias:
                rules.append(qkv(g, p, "bias", ((heads * d,), (groups * d,), (groups * d,))))
            if settings["qk_layernorm"]:
                rules += [
                    TensorRule(g + "self_attention.q_layernorm.weight", (p + "self_attn.q_norm.weight",), ((d,),)),
                    TensorRule(g + "self_attention.k_layernorm.weight", (p + "self_attn.k_norm.weight",), ((d,),)),
                ]
            if bias:
                rules.append(TensorRule(g + "self_attention.linear_proj.bias", (p + "self_attn.o_proj.bias",), ((h,),)))
        rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),)))
        return rules

    def mlp_rules(self, settings: dict, g: str, p: str) -> list[TensorRule]:
        """Layer ``g``'s MLP (HF prefix ``p``): SwiGLU's gate and up make ``linear_fc1``, [gate; up]."""
        h, ffn = settings["hidden_size"], settings["ffn_hidden_size"]
        rules = [
            TensorRule(
                g + "mlp.linear_fc1.weight",
                (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                ((ffn, h), (ffn, h)),
                to_global=torch.cat,
                to_hf=lambda t: list(t.chunk(2)),
            ),
            TensorRule(g + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), ((h, ffn),)),
        ]
        if settings["bias"]:
            rules += [
                TensorRule(
                    g + "mlp.linear_fc1.bias",
                    (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"),
                    ((ffn,), (ffn,)),
                    to_global=torch.cat,
                    to_hf=lambda t: list(t.chunk(2)),
                ),
                TensorRule(g + "mlp.linear_fc2.bias", (p + "mlp.down_proj.bias",), ((h,),)),
            ]
        return rules

    def weight_name(self, hf_name: str) -> str | None:
        return None if hf_name.endswith(".rotary_emb.inv_freq") else hf_name
