"""The GPT-2 family (GPT2LMHeadModel) <-> megatron's GPTModel.

LayerNorm with bias, GELU (tanh or exact), learned positions, biases
everywhere. HF's Conv1D layers store weights [in, out], the transpose of a
Linear's, and ``c_attn`` holds Q, K and V concatenated whole: plain multi-head
attention is grouped-query attention with one query head per group. Checkpoints
saved from the bare GPT2Model lack the ``transformer.`` prefix, and some carry
the causal mask as a buffer; both are handled when reading.
"""

import re

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

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# The causal mask some checkpoints carry next to the weights; it is rebuilt from the config.
_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")


def _transposed(tensors):
    return tensors[0].t()


def _transposed_list(tensor):
    return [tensor.t()]


class GPT2(Family):
    model_types = ("gpt2",)
    architecture = "GPT2LMHeadModel"

    def model_settings(self, hf_config: dict) -> dict:
        hidden = config_size(hf_config, "n_embd")
        heads = config_size(hf_config, "n_head")
        act = config_value(hf_config, "activation_function", str, "gelu_new")
        if act not in ACTIVATIONS:
            raise not_supported("activation_function", act, f"supported: {list(ACTIVATIONS)}")
        for key, needed in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            if config_value(hf_config, key, bool, needed) != needed:
                raise not_supported(key, not needed, f"megatron's attention needs {key}={needed}")
        return {
            "num_layers": config_size(hf_config, "n_layer"),
            "hidden_size": hidden,
            "ffn_hidden_size": config_size(hf_config, "n_inner", 4 * hidden),
            "num_attention_heads": heads,
            "num_query_groups": heads,
            "kv_channels": None,
            "position_embedding_type": "learned_absolute",
            "rope_scaling": None,
            "normalization": "LayerNorm",
            "layernorm_epsilon": config_value(hf_config, "layer_norm_epsilon", float, 1e-5),
            "activation": ACTIVATIONS[act],
            "bias": True,
            "qkv_bias": False,
            "qk_layernorm": False,
            "share_embeddings_and_output_weights": config_value(hf_config, "tie_word_embeddings", bool, True),
            "max_position_embeddings": config_size(hf_config, "n_positions"),
            "num_moe_experts": None,
        }

    def export_mismatches(self, model_cfg) -> list[str]:
        return mismatches(
            model_cfg,
            {
                "normalization": ("LayerNorm",),
                "activation": ("gelu_tanh", "gelu"),
                "position_embedding_type": ("learned_absolute",),
                "bias": (True,),
                "num_query_groups": (None, model_cfg["num_attention_heads"]),
                "kv_channels": (None, model_cfg["hidden_size"] // model_cfg["num_attention_heads"]),
                "qkv_bias": (False,),
                "qk_layernorm": (False,),
                **DENSE,
            },
        )

    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        """Dropout is written too, so HF's GPT-2 defaults (0.1) do not silently apply."""
        return {
            "architectures": [self.architecture],
            "model_type": "gpt2",
            "n_embd": model_cfg["hidden_size"],
            "n_inner": model_cfg["ffn_hidden_size"],
            "n_layer": model_cfg["num_layers"],
            "n_head": model_cfg["num_attention_heads"],
            "n_positions": model_cfg["max_position_embeddings"],
            "activation_function": "gelu_new" if model_cfg["activation"] == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": model_cfg["layernorm_epsilon"],
            "attn_pdrop": model_cfg["attention_dropout"],
            "resid_pdrop": model_cfg["hidden_dropout"],
            "embd_pdrop": model_cfg["hidden_dropout"],
            **vocabulary_config(model_cfg, vocab_size, eos_id, bos_id),
        }

    def rules(self, settings: dict, vocab: int) -> list[TensorRule]:
        h, ffn, heads = settings["hidden_size"], settings["ffn_hidden_size"], settings["num_attention_heads"]
        d = h // heads
        rules = [
            TensorRule("embedding.word_embeddings.weight", ("transformer.wte.weight",), ((vocab, h),), vocab=True),
            TensorRule(
                "embedding.position_embeddings.weight",
                ("transformer.wpe.weight",),
                ((settings["max_position_embeddings"], h),),
            ),
        ]
        for i in range(settings["num_layers"]):
            g, p = f"decoder.layers.{i}.", f"transformer.h.{i}."
            rules += [
                TensorRule(g + "input_layernorm.weight", (p + "ln_1.weight",), ((h,),)),
                TensorRule(g + "input_layernorm.bias", (p + "ln_1.bias",), ((h,),)),
                TensorRule(
                    g + "self_attention.linear_qkv.weight",
                    (p + "attn.c_attn.weight",),
                    ((h, 3 * h),),
                    to_global=lambda ts: interleave_qkv(*ts[0].t().chunk(3), heads),
                    to_hf=lambda t: [torch.cat(split_qkv(t, heads, heads, d)).t()],
                ),
                TensorRule(
                    g + "self_attention.linear_qkv.bias",
                    (p + "attn.c_attn.bias",),
                    ((3 * h,),),
                    to_global=lambda ts: interleave_qkv(*ts[0].chunk(3), heads),
                    to_hf=lambda t: [torch.cat(split_qkv(t, heads, heads, d))],
                ),
                TensorRule(
                    g + "self_attention.linear_proj.weight",
                    (p + "attn.c_proj.weight",),
                    ((h, h),),
                    _transposed,
                    _transposed_list,
                ),
                TensorRule(g + "self_attention.linear_proj.bias", (p + "attn.c_proj.bias",), ((h,),)),
                TensorRule(g + "pre_mlp_layernorm.weight", (p + "ln_2.weight",), ((h,),)),
                TensorRule(g + "pre_mlp_layernorm.bias", (p + "ln_2.bias",), ((h,),)),
                TensorRule(
                    g + "mlp.linear_fc1.weight", (p + "mlp.c_fc.weight",), ((h, ffn),), _transposed, _transposed_list
                ),
                TensorRule(g + "mlp.linear_fc1.bias", (p + "mlp.c_fc.bias",), ((ffn,),)),
                TensorRule(
                    g + "mlp.linear_fc2.weight", (p + "mlp.c_proj.weight",), ((ffn, h),), _transposed, _transposed_list
                ),
                TensorRule(g + "mlp.linear_fc2.bias", (p + "mlp.c_proj.bias",), ((h,),)),
            ]
        rules += [
            TensorRule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), ((h,),)),
            TensorRule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",), ((h,),)),
        ]
        return rules

    def weight_name(self, hf_name: str) -> str | None:
        if _BUFFERS.search(hf_name):
            return None
        return hf_name if hf_name.startswith(("transformer.", "lm_head.")) else "transformer." + hf_name
