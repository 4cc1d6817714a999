"""The layer norms of the local (no transformer-engine) layer spec, sequence parallelism included.

megatron's local spec builds PyTorch's LayerNorm or RMSNorm through
``WrappedTorchNorm``, which refuses sequence parallelism. Under sequence
parallelism each tensor-parallel rank normalises its own slice of the sequence
with the (replicated) norm weights, so a rank's gradient of those weights covers
only its slice; megatron sums the gradients of parameters marked
``sequence_parallel`` over the TP group after the backward pass
(``finalize_model_grads``), which is how transformer-engine's norms take part.
:class:`TorchNorm` is PyTorch's norm with that mark: the same computation, and
the same parameters, with sequence parallelism on or off.
"""

import dataclasses

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from nemo_dpo.models.fusion import FusedRMSNorm


class TorchNorm:
    """Drop-in for megatron's ``WrappedTorchNorm`` (same constructor) that also runs under sequence parallelism."""

    norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = None):
        norm = cls.norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class FusedTorchNorm(TorchNorm):
    """:class:`TorchNorm` with RMSNorm computed by compiled kernels (models/fusion.py; LayerNorm is one already)."""

    norms = {**TorchNorm.norms, "RMSNorm": FusedRMSNorm}


def use_torch_norm(submodules, norm=TorchNorm) -> None:
    """Replace megatron's ``WrappedTorchNorm`` by ``norm`` (:class:`TorchNorm` or :class:`FusedTorchNorm`) wherever
    a spec's submodules name it."""
    for field in dataclasses.fields(submodules):
        if getattr(submodules, field.name) is WrappedTorchNorm:
            setattr(submodules, field.name, norm)
