"""RMSNorm and SwiGLU of the local layer spec as fused kernels (``torch.compile``), when they pay.

Without transformer-engine, megatron's local spec runs its norms and its
MLP activation as chains of eager PyTorch operations: RMSNorm alone is a square,
a mean, an rsqrt and two products, each a pass over the activations in forward
and more in backward. That elementwise work is most of what is not a matmul or
attention in a step. ``torch.compile`` (inductor: C++ kernels on CPU, built with
the machine's compiler; Triton on GPU) turns each chain into one kernel per
direction, computing the same function (to rounding: inductor may sum in
another order). Compiling costs time once per process and shape family
(seconds to tens of seconds; inductor caches its kernels on disk, so later runs
on the machine mostly load them), and pays back on models whose activations are
large. ``model.fused_elementwise``: ``auto`` (the default) fuses when the
hidden size is at least :data:`AUTO_MIN_HIDDEN` and leaves tiny models eager,
where compiling would cost more than it saves; ``true`` or ``false`` decide.
With transformer-engine (GPU) its own fused layers are used instead.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from nemo_dpo.ranges import Either, Flag, OneOf

RANGES = {
    "model.fused_elementwise": Either(first=OneOf(choices=("auto",)), first_is="by model size",
                                      second=Flag(), second_is="always or never"),
}
AUTO_MIN_HIDDEN = 512


def wanted(model_cfg) -> bool:
    """Whether ``model.fused_elementwise`` asks for the fused norms and SwiGLU for this model."""
    setting = model_cfg.fused_elementwise
    if setting == "auto":
        return model_cfg.hidden_size >= AUTO_MIN_HIDDEN
    return setting


def fused_parts(model_cfg) -> list:
    """What :func:`wanted` fuses in this model: its RMSNorm and its SwiGLU, where it has them."""
    if not wanted(model_cfg):
        return []
    return [part for part, present in (("RMSNorm", model_cfg.normalization == "RMSNorm"),
                                       ("SwiGLU", model_cfg.activation == "swiglu")) if present]


def _rms_norm(x, normalized_shape, weight, eps):
    return F.rms_norm(x, normalized_shape, weight, eps)


def _swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


_compiled = {}


def _compiled_fn(fn):
    """``fn`` compiled on first use (compiling at import would cost every process that never calls it), for any
    number of tokens: rows change length from step to step (padded to the step's longest, or packed), and a kernel
    compiled for one length would be compiled again for the next."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


class FusedRMSNorm(torch.nn.RMSNorm):
    """PyTorch's RMSNorm (same parameters, same state dict) computed by one compiled kernel per direction."""

    def forward(self, x):
        return _compiled_fn(_rms_norm)(x, self.normalized_shape, self.weight, self.eps)


class FusedSwiGLU(MegatronModule):
    """silu(first half) * second half of the last dimension (fc1's [gate, up] layout), compiled; no parameters."""

    def __init__(self, config):
        super().__init__(config=config)

    def forward(self, x):
        return _compiled_fn(_swiglu)(x)
