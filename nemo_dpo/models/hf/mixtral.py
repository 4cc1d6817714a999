"""The Mixtral family (MixtralForCausalLM) <-> megatron's GPTModel with mixture-of-experts layers.

Mistral's attention (llama.py: RMSNorm, GQA, RoPE, its own ``head_dim``) with
every MLP replaced by ``num_local_experts`` SwiGLU experts behind a top-k router
(``num_experts_per_tok``; softmax over the chosen experts' logits, so their
weights sum to 1: ``model.moe_router_pre_softmax`` false) and no shared expert.
Expert tensors are read and written as the Hub's checkpoints hold them
(``block_sparse_moe.experts.<e>.w1`` gate, ``w3`` up, ``w2`` down,
``block_sparse_moe.gate`` the router; models/hf/experts.py).

``router_jitter_noise`` is refused: transformers multiplies the router's input
by noise only while training, megatron's ``moe_input_jitter_eps`` in every
pass, the reference's and validation's included.
"""

from nemo_dpo.models.hf.experts import (
    aux_loss_coeff,
    aux_loss_config,
    expert_export_mismatches,
    expert_rules,
    expert_settings,
)
from nemo_dpo.models.hf.family import TensorRule, config_value, mismatches, not_supported
from nemo_dpo.models.hf.llama import DECODER, Llama

MIXTRAL_AUX_LOSS_COEF = 0.001  # transformers' MixtralConfig default
_PROJECTIONS = {"gate": "w1", "up": "w3", "down": "w2"}


class Mixtral(Llama):
    model_types = ("mixtral",)
    architecture = "MixtralForCausalLM"

    def model_settings(self, hf_config: dict) -> dict:
        jitter = config_value(hf_config, "router_jitter_noise", float, 0.0)
        if jitter:
            raise not_supported(
                "router_jitter_noise", jitter,
                "megatron would jitter the router's input in every pass, reference and validation included; "
                "transformers does only while training",
            )
        return {
            **super().model_settings(hf_config),
            **expert_settings(hf_config, "num_local_experts", normalized=True),
            "moe_ffn_hidden_size": None,  # the experts' size is intermediate_size, model.ffn_hidden_size
        }

    def aux_loss_coeff(self, hf_config: dict) -> float:
        return aux_loss_coeff(hf_config, MIXTRAL_AUX_LOSS_COEF)

    def export_mismatches(self, model_cfg) -> list[str]:
        wanted = {
            **DECODER,
            "bias": (False,),
            "qkv_bias": (False,),
            "qk_layernorm": (False,),
            "moe_router_pre_softmax": (False,),
            "moe_ffn_hidden_size": (None, model_cfg["ffn_hidden_size"]),
        }
        return expert_export_mismatches(model_cfg) or mismatches(model_cfg, wanted)

    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        config = self.decoder_config(model_cfg, vocab_size, eos_id, bos_id)
        if model_cfg["kv_channels"] is None:
            del config["head_dim"]  # as the Hub's Mixtral configs have it: transformers takes hidden_size / heads
        return {
            **config,
            "num_local_experts": model_cfg["num_moe_experts"],
            "num_experts_per_tok": model_cfg["moe_router_topk"],
            "router_jitter_noise": 0.0,
            "sliding_window": None,
            **aux_loss_config(model_cfg),
        }

    def mlp_rules(self, settings: dict, g: str, p: str) -> list[TensorRule]:
        moe = p + "block_sparse_moe."
        return expert_rules(
            settings, g, moe + "gate.weight", lambda e, proj: f"{moe}experts.{e}.{_PROJECTIONS[proj]}.weight"
        )
