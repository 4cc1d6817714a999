"""The Qwen2 family (Qwen2ForCausalLM: Qwen2, Qwen2.5) <-> megatron's GPTModel.

The Llama network (llama.py) with biases on the query, key and value
projections only (megatron's ``add_qkv_bias``, ``model.qkv_bias``), tied or
untied embeddings and RoPE with its theta (and YaRN for long context). Qwen
configs carry sliding-window settings that are usually off
(``use_sliding_window: false``); a window only counts on the layers it applies
to (``layer_types``, else those from ``max_window_layers`` on), and is refused
there when shorter than ``max_position_embeddings``.
"""

from nemo_dpo.models.hf.family import DENSE, config_size, config_value, mismatches, not_supported
from nemo_dpo.models.hf.llama import DECODER, Llama

QWEN_SLIDING_WINDOW = 4096  # transformers' default when use_sliding_window is true and sliding_window is absent
QWEN_MAX_WINDOW_LAYERS = 28  # transformers' default: layers from this index on slide


class Qwen2(Llama):
    model_types = ("qwen2",)
    architecture = "Qwen2ForCausalLM"

    def layer_settings(self, hf_config: dict) -> dict:
        return {"bias": False, "qkv_bias": True, "qk_layernorm": False}

    def check_full_attention(self, hf_config: dict, max_positions: int) -> None:
        if not config_value(hf_config, "use_sliding_window", bool, False):
            return  # transformers then sets sliding_window to None: no layer slides
        window = config_size(hf_config, "sliding_window", QWEN_SLIDING_WINDOW)
        layers = config_size(hf_config, "num_hidden_layers")
        first = config_value(hf_config, "max_window_layers", int, QWEN_MAX_WINDOW_LAYERS)
        default_types = ["full_attention" if i < first else "sliding_attention" for i in range(layers)]
        layer_types = config_value(hf_config, "layer_types", list, default_types)
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        if sliding and window < max_positions:
            raise not_supported(
                "sliding_window",
                window,
                f"use_sliding_window is true and layers {sliding} slide: "
                f"attention must see all {max_positions} positions",
            )

    def export_mismatches(self, model_cfg) -> list[str]:
        return mismatches(
            model_cfg, {**DECODER, **DENSE, "bias": (False,), "qkv_bias": (True,), "qk_layernorm": (False,)}
        )

    def decoder_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        return {**super().decoder_config(model_cfg, vocab_size, eos_id, bos_id), "use_sliding_window": False}

    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        config = self.decoder_config(model_cfg, vocab_size, eos_id, bos_id)
        if model_cfg["kv_channels"] is None:
            del config["head_dim"]  # Qwen2's configs have none: its attention takes hidden_size / num_attention_heads
        return config
