"""Mixture-of-experts MLPs on megatron-core's MoE layer, and the two things this project adds to it.

With ``model.num_moe_experts`` set, every layer's MLP is megatron's MoELayer: a
top-k router (softmax over the top-k logits, or over all experts first with
``model.moe_router_pre_softmax``), the all-to-all token dispatcher (a token
travels to the expert-parallel rank that holds its expert and back) and the
experts, one SwiGLU MLP each: run one after the other on the local layer spec,
as transformer-engine's grouped GEMM on GPUs that have it. Expert parallelism
(``model.expert_model_parallel_size``) spreads the experts over data-parallel
ranks; within an expert, TP splits its matrices as it splits a dense MLP's.

**Tokens divided among the TP ranks.** megatron's MoE layer expects each TP
rank to hold its own share of the tokens (sequence parallelism), and refuses to
train otherwise: with every TP rank holding every token, each token would be
routed TP times and each expert's gradient would add up TP copies. nemo-dpo keeps
activations whole on every TP rank, so :func:`split_tokens_over_tp`, a step
applied to the built model, gives each MoE layer this rank's 1/TP of the
positions and gathers the outputs back: the rest of the model is unchanged,
the experts see every token once, and at TP=1 nothing changes. Each rank's
router then sees only its share of the tokens, so its gradient is partial:
:func:`sum_router_grads_over_tp` adds the shares up after backward (the
auxiliary loss is split the same way, megatron summing the token counts it
needs over TP inside the router).

**The router without transformer-engine.** megatron-core 0.16's router GEMM
refers to transformer-engine's ``te_general_gemm`` even when transformer-engine
is absent (a NameError at the first forward); :func:`build_moe_spec` defines the
name as None there, which is what selects the router's plain torch path.

The auxiliary load-balancing loss (``model.moe_aux_loss_coeff``) is megatron's:
each MoE layer's router attaches it to its output during a forward with
gradients in training mode; training/moe_aux_loss.py logs it.
"""

import copy

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer

from nemo_dpo.distributed import layout

# Set on the router's parameters of a token-split layer: their gradient is summed over TP after backward.
SUMMED_OVER_TP = "moe_router_summed_over_tp"


def build_moe_spec(mlp_spec, expert_activation=None):
    """The MoE module spec of a GPT layer spec made with ``num_experts``, ready to build.

    ``expert_activation``: the activation module the experts' MLPs take (the
    local spec's SwiGLU, models/activations.py), or None for megatron's own.
    """
    if not hasattr(moe_utils, "te_general_gemm"):  # transformer-engine is absent: the router's torch path
        moe_utils.te_general_gemm = None
    if expert_activation is not None:
        mlp_spec.submodules.experts.submodules.activation_func = expert_activation
    return mlp_spec


def split_tokens_over_tp(model) -> None:
    """At TP > 1, run every MoE layer of ``model`` on this TP rank's share of the positions.

    Each layer is told that its input is a share (its config's
    ``sequence_parallel``, which only its training guard reads), gets hooks that
    take the share before it and gather the shares after it, and its router's
    parameters are marked for :func:`sum_router_grads_over_tp`.
    """
    if layout.current().tp_group is None:
        return
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.config = copy.copy(module.config)
            module.config.sequence_parallel = True
            module.register_forward_pre_hook(_take_share)
            module.register_forward_hook(_gather_shares)
            for param in module.router.parameters():
                setattr(param, SUMMED_OVER_TP, True)


def _take_share(layer, args):
    hidden_states, *rest = args
    tp = layer.tp_group.size()
    if hidden_states.shape[0] % tp:
        raise ValueError(
            f"a mixture-of-experts layer divides the {hidden_states.shape[0]} positions of a microbatch among "
            f"model.tensor_model_parallel_size={tp} ranks, which needs a multiple of {tp}"
        )
    # [s, b, h] -> this rank's [s/TP, b, h]; backward gathers the shares' gradients.
    return (scatter_to_sequence_parallel_region(hidden_states, group=layer.tp_group), *rest)


def _gather_shares(layer, args, outputs):
    output, bias = outputs
    # Every rank goes on with the whole output; backward keeps each rank's share of its (whole) gradient.
    return gather_from_sequence_parallel_region(output, tensor_parallel_output_grad=False, group=layer.tp_group), bias


def sum_router_grads_over_tp(model_chunks) -> None:
    """Add up the routers' gradients of token-split MoE layers over the TP group (after DP's reduction).

    Each TP rank's router saw 1/TP of the tokens; the gradient of the whole
    batch is the sum of the shares, the same on every TP rank afterwards.
    """
    group = layout.current().tp_group
    if group is None:
        return
    grads = [
        param.main_grad
        for chunk in model_chunks
        for param in chunk.parameters()
        if param.requires_grad and getattr(param, SUMMED_OVER_TP, False)
    ]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(summed)
