"""The Qwen3-MoE family (Qwen3MoeForCausalLM) <-> megatron's GPTModel with mixture-of-experts layers.

Qwen3's attention (qwen3.py: per-head query/key RMSNorms, its own ``head_dim``
(hidden_size / num_attention_heads when absent, unlike Qwen3), no q/k/v biases) with every MLP replaced by ``num_experts`` SwiGLU experts of
``moe_intermediate_size`` (``model.moe_ffn_hidden_size``) behind a top-k router
(``num_experts_per_tok``) and no shared expert. ``norm_topk_prob`` true
renormalises a token's top-k weights to sum to 1 (``model.moe_router_pre_softmax``
false); false keeps the softmax over all experts (true). ``intermediate_size``
sizes only the dense MLPs of layers that are not sparse, so it is kept
(``model.ffn_hidden_size``) for the export and unused. Tensors: ``mlp.gate`` the
router, ``mlp.experts.<e>.{gate,up,down}_proj`` (models/hf/experts.py). Older
configs name the expert count ``num_local_experts``, as transformers writes it.

Refused, naming the field: dense layers among the sparse ones
(``decoder_sparse_step`` other than 1, a non-empty ``mlp_only_layers``), and a
sliding window shorter than ``max_position_embeddings`` (with
``use_sliding_window``, Qwen3-MoE slides on every layer).
"""

from nemo_dpo.models.hf.experts import (
    aux_loss_coeff,
    aux_loss_config,
    expert_export_mismatches,
    expert_rules,
    expert_settings,
)
from nemo_dpo.models.hf.family import TensorRule, config_size, config_value, mismatches, not_supported
from nemo_dpo.models.hf.llama import DECODER
from nemo_dpo.models.hf.qwen2 import QWEN_SLIDING_WINDOW
from nemo_dpo.models.hf.qwen3 import Qwen3

QWEN3_MOE_AUX_LOSS_COEF = 0.001  # transformers' Qwen3MoeConfig default
QWEN3_MOE_INTERMEDIATE_SIZE = 768  # transformers' default moe_intermediate_size


class Qwen3Moe(Qwen3):
    model_types = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"
    default_head_dim = None  # unlike Qwen3's 128: transformers' Qwen3-MoE takes hidden_size / num_attention_heads

    def check_full_attention(self, hf_config: dict, max_positions: int) -> None:
        if not config_value(hf_config, "use_sliding_window", bool, False):
            return
        window = config_size(hf_config, "sliding_window", QWEN_SLIDING_WINDOW)
        if window < max_positions:
            raise not_supported(
                "sliding_window", window,
                f"use_sliding_window is true and every layer slides: attention must see all {max_positions} positions",
            )

    def model_settings(self, hf_config: dict) -> dict:
        step = config_value(hf_config, "decoder_sparse_step", int, 1)
        if step != 1:
            raise not_supported("decoder_sparse_step", step, "every layer must be a mixture of experts")
        dense_layers = config_value(hf_config, "mlp_only_layers", list, [])
        if dense_layers:
            raise not_supported("mlp_only_layers", dense_layers, "every layer must be a mixture of experts")
        experts_key = "num_experts" if "num_experts" in hf_config else "num_local_experts"
        normalized = config_value(hf_config, "norm_topk_prob", bool, False)
        return {
            **super().model_settings(hf_config),
            **expert_settings(hf_config, experts_key, normalized),
            "moe_ffn_hidden_size": config_size(hf_config, "moe_intermediate_size", QWEN3_MOE_INTERMEDIATE_SIZE),
        }

    def aux_loss_coeff(self, hf_config: dict) -> float:
        return aux_loss_coeff(hf_config, QWEN3_MOE_AUX_LOSS_COEF)

    def export_mismatches(self, model_cfg) -> list[str]:
        wanted = {**DECODER, "bias": (False,), "qkv_bias": (False,), "qk_layernorm": (True,)}
        return expert_export_mismatches(model_cfg) or mismatches(model_cfg, wanted)

    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        config = self.decoder_config(model_cfg, vocab_size, eos_id, bos_id)
        if model_cfg["kv_channels"] is None:
            del config["head_dim"]  # as the source had it: transformers takes hidden_size / num_attention_heads
        return {
            **config,
            "attention_bias": False,
            "num_experts": model_cfg["num_moe_experts"],
            "num_experts_per_tok": model_cfg["moe_router_topk"],
            "moe_intermediate_size": model_cfg["moe_ffn_hidden_size"] or model_cfg["ffn_hidden_size"],
            "norm_topk_prob": not model_cfg["moe_router_pre_softmax"],
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            **aux_loss_config(model_cfg),
        }

    def mlp_rules(self, settings: dict, g: str, p: str) -> list[TensorRule]:
        return expert_rules(
            settings, g, p + "mlp.gate.weight", lambda e, proj: f"{p}mlp.experts.{e}.{proj}_proj.weight"
        )
