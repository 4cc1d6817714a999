"""The Qwen3 family (Qwen3ForCausalLM) <-> megatron's GPTModel.

Qwen2's network (qwen2.py) without the q/k/v biases and with an RMSNorm over
each head's query and key before RoPE (``q_norm``/``k_norm``: megatron's
``qk_layernorm`` with the layer spec's norm, ``model.qk_layernorm``), and a head
size of its own (``head_dim``, 128 when config.json has none, as in
transformers). ``attention_bias`` would put biases on q, k, v and the output
projection but not the MLP, which megatron cannot, and is refused.
"""

from nemo_dpo.models.hf.family import DENSE, config_value, mismatches, not_supported
from nemo_dpo.models.hf.llama import DECODER
from nemo_dpo.models.hf.qwen2 import Qwen2


class Qwen3(Qwen2):
    model_types = ("qwen3",)
    architecture = "Qwen3ForCausalLM"
    default_head_dim = 128

    def layer_settings(self, hf_config: dict) -> dict:
        if config_value(hf_config, "attention_bias", bool, False):
            raise not_supported(
                "attention_bias", True, "Qwen3 would have biases on attention but not the MLP, which megatron cannot"
            )
        return {"bias": False, "qkv_bias": False, "qk_layernorm": True}

    def export_mismatches(self, model_cfg) -> list[str]:
        return mismatches(
            model_cfg, {**DECODER, **DENSE, "bias": (False,), "qkv_bias": (False,), "qk_layernorm": (True,)}
        )

    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        return {**self.decoder_config(model_cfg, vocab_size, eos_id, bos_id), "attention_bias": False}
