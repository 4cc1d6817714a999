"""SwiGLU that keeps only its input for backward.

megatron-core's local MLP computes SwiGLU as ``silu(a) * (b + 0.0)`` under autograd,
which keeps the fc1 output, silu(a) and a copy of b: twice the memory of the fc1
output, per layer. Its fused version needs ``torch.compile`` (a C++ toolchain on
CPU). This one saves just the fc1 output and recomputes the rest in backward, in
eager PyTorch. The local layer spec plugs it in as the MLP's activation submodule
(megatron's ``use_te_activation_func`` hook, which passes it the whole fc1 output).
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


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
