"""SwiGLU that keeps only its input for backward.

megatron-core's local MLP computes SwiGLU as ``silu(a) * (b + 0.0)`` under autograd,
which keeps the fc1 output, silu(a) and a copy of b: twice the memory of the fc1
output, per layer. Its fused version needs ``torch.compile`` (a C++ toolchain on
CPU). This one saves just the fc1 output and recomputes the rest in backward, in
eager PyTorch. The local layer spec plugs it in as the MLP's activation submodule
(megatron's ``use_te_activation_func`` hook, which passes it the whole fc1 output).

The SwiGLU's output is still kept, by fc2 (its input, for the weight gradient).
``ActivationRecomputingMLP`` drops that too (``model.recompute_modules: [.., swiglu]``):
the activation runs without autograd, its output's memory is released once fc2 has
used it, and it is recomputed from the fc1 output (kept anyway) when the gradient
reaches fc2: an elementwise pass, against a [tokens, ffn] tensor per layer.
megatron does the same for MoE experts' activations (``moe_act``) and for the norms
(``layernorm``), with the same ``CheckpointWithoutOutput``.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule

from nemo_dpo.models.released_output import ReleasesOutput, release_after


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad = torch.empty_like(x)  # written half by half: no concatenation
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad_output * up, gate, grad_input=grad_gate)
        torch.mul(F.silu(gate), grad_output, out=grad_up)
        return grad


class SwiGLU(MegatronModule):
    """silu(first half) * second half of the last dimension (fc1's [gate, up] layout); no parameters."""

    def __init__(self, config):
        super().__init__(config=config)

    def forward(self, x):
        return _SwiGLUFunction.apply(x)


class _OutputReleasingActivation(ReleasesOutput, MegatronModule):
    """The activation, its output releasable when a backward will follow (models/released_output.py). A megatron
    module, as the activation it wraps is: the MLP's distributed checkpoint asks each submodule for its (here
    empty) sharded state dict."""

    def __init__(self, activation):
        super().__init__(config=activation.config)
        self.activation = activation

    def forward(self, x):
        return self.releasable(self.activation, x)


class ActivationRecomputingMLP(MLP):
    """megatron's MLP (same parameters and state dict) whose activation output is recomputed in backward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation_func = _OutputReleasingActivation(self.activation_func)
        # Released after fc2 and anything hooked onto it (a LoRA adapter reads the same activation), and
        # recomputed when the gradient reaches the MLP's output, before any of them runs backward.
        release_after(self, self.activation_func)
