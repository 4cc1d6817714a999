"""The routers' load-balancing loss: part of the policy pass only, and reported as ``moe_aux_loss``.

megatron adds the loss inside each mixture-of-experts layer (models/moe.py): a
router in training mode with gradients on attaches ``moe_aux_loss_coeff`` x its
layer's loss to its output, so the loss's gradient joins backward (scaled like
the main loss, by 1 / microbatches), and records the unweighted loss in a
process-wide tracker, per layer, summed over microbatches. Of a training step's
passes only the policy's runs so: the reference pass and validation run in eval
mode without gradients, where routers add nothing. The tracker is cleared before
every pass (:func:`clear`), so no pass ever reports another's; after the policy
pass :func:`policy_aux_loss` brings its values together over pipeline stages
(each holds its own layers), TP ranks (each router saw a share of the tokens)
and DP ranks (averaged): the coefficient times the sum over layers, averaged
over microbatches, which is the term the step's objective adds to ``loss``.

The loss is megatron's Switch-Transformer form per layer, E / k x sum_e f_e P_e
(f_e: the fraction of the k x tokens routed to expert e, P_e: its mean router
probability), summed over layers. transformers' Mixtral and Qwen3-MoE pool the
layers' counts and probabilities first and leave out the 1 / k, so the same
coefficient weighs the loss differently there.
"""

from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

TRACKED = "load_balancing_loss"  # megatron's name for the loss of moe_router_load_balancing_type "aux_loss"
METRIC = "moe_aux_loss"


def coefficient(config) -> float:
    """The loss's weight for a TransformerConfig: 0 for a dense model."""
    return config.moe_aux_loss_coeff if config.num_moe_experts is not None else 0.0


def clear() -> None:
    """Forget what earlier passes recorded."""
    clear_aux_losses_tracker()


def policy_aux_loss(weight: float, num_microbatches: int) -> float:
    """``weight`` x the load-balancing loss of the pass just run (collective: every rank calls it)."""
    reduce_aux_losses_tracker_across_ranks([TRACKED])
    per_layer = get_moe_layer_wise_logging_tracker()[TRACKED]["values"]
    return weight * per_layer.double().sum().item() / num_microbatches
