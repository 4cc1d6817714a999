"""What the mixture-of-experts families (mixtral.py, qwen3_moe.py) share: the router's fields and the experts' tensors.

config.json's experts and their router map onto the ``model`` section as
``num_moe_experts`` (the experts per layer), ``moe_router_topk``
(``num_experts_per_tok``) and ``moe_router_pre_softmax`` (false when a token's
top-k weights are renormalised to sum to 1, as Mixtral always does and Qwen3-MoE
does with ``norm_topk_prob``). The load-balancing loss weight is a run's
choice, not the network's: a folder's ``router_aux_loss_coef`` is the default
of ``model.moe_aux_loss_coeff`` only when its ``output_router_logits`` is true,
since transformers (and TRL's DPOTrainer) add the loss only then; an export
writes the run's weight back the same way.

Tensors: the router's [experts, hidden] matrix is megatron's ``mlp.router.weight``;
expert e's gate and up projections [ffn, hidden] make its
``mlp.experts.local_experts.e.linear_fc1.weight`` [gate; up] (SwiGLU, as a dense
MLP's), its down projection ``linear_fc2``. Checkpoints are read and written in
the per-expert layout transformers saves and the Hub's models use.
"""

import torch

from nemo_dpo.models.hf.family import TensorRule, config_size, config_value, not_supported


def expert_settings(hf_config: dict, experts_key: str, normalized: bool) -> dict:
    """The ``model`` keys of the experts: their number (``experts_key``), top-k and how the weights are normalised."""
    experts = config_size(hf_config, experts_key)
    topk = config_size(hf_config, "num_experts_per_tok")
    if topk > experts:
        raise not_supported("num_experts_per_tok", topk, f"a token can go to at most the {experts} experts")
    return {"num_moe_experts": experts, "moe_router_topk": topk, "moe_router_pre_softmax": not normalized}


def aux_loss_coeff(hf_config: dict, default: float) -> float:
    """``router_aux_loss_coef`` (``default``: transformers' for the family) if ``output_router_logits`` is true, else 0."""
    coefficient = config_value(hf_config, "router_aux_loss_coef", float, default)
    if coefficient < 0:
        raise not_supported("router_aux_loss_coef", coefficient, "a loss weight is >= 0")
    return float(coefficient) if config_value(hf_config, "output_router_logits", bool, False) else 0.0


def aux_loss_config(model_cfg) -> dict:
    """config.json's aux-loss fields for the run's ``model.moe_aux_loss_coeff``; transformers' default weight
    stays in place when the run trained without the loss."""
    coefficient = model_cfg["moe_aux_loss_coeff"] or 0.0
    if coefficient == 0:
        return {"output_router_logits": False}
    return {"output_router_logits": True, "router_aux_loss_coef": coefficient}


def expert_export_mismatches(model_cfg) -> list[str]:
    """Why a ``model`` section is not a mixture of experts an MoE family can write."""
    if model_cfg["num_moe_experts"] is None:
        return ["model.num_moe_experts=<the number of experts> (got None)"]
    return []


def expert_rules(settings: dict, g: str, router: str, expert) -> list[TensorRule]:
    """Layer ``g``'s router and experts: ``router`` is the HF router matrix's name, ``expert(e, proj)`` the HF name
    of expert e's ``gate``, ``up`` or ``down`` projection."""
    h, experts = settings["hidden_size"], settings["num_moe_experts"]
    ffn = settings["moe_ffn_hidden_size"] or settings["ffn_hidden_size"]
    rules = [TensorRule(g + "mlp.router.weight", (router,), ((experts, h),))]
    for e in range(experts):
        local = f"{g}mlp.experts.local_experts.{e}."
        gate, up, down = (expert(e, proj) for proj in ("gate", "up", "down"))
        rules += [
            TensorRule(
                local + "linear_fc1.weight",
                (gate, up),
                ((ffn, h), (ffn, h)),
                to_global=torch.cat,
                to_hf=lambda t: list(t.chunk(2)),
            ),
            TensorRule(local + "linear_fc2.weight", (down,), ((h, ffn),)),
        ]
    return rules
