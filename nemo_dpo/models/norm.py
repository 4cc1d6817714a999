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

A layer's two norms feed one linear layer each (q/k/v, fc1), and that linear
keeps the norm's output for its weight gradient: a [tokens, hidden] tensor per
norm and layer. ``model.recompute_modules: [.., layernorm]`` releases it once
the attention or MLP that read it has run, and recomputes it from the norm's
input (the residual stream, kept anyway) when the gradient reaches that
attention or MLP: megatron's ``layernorm`` recomputation, done here because
megatron's own passes ``fp8=False`` to ``CheckpointWithoutOutput``, which reads
it as fp8 on and fails without transformer-engine.
"""

import dataclasses

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer

from nemo_dpo.models.fusion import FusedRMSNorm
from nemo_dpo.models.released_output import ReleasesOutput, release_after


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


class _OutputReleased(ReleasesOutput):
    """Mixin for a norm class: its output releasable when a backward will follow (models/released_output.py)."""

    def forward(self, x):
        return self.releasable(super().forward, x)


class OutputReleasedLayerNorm(_OutputReleased, torch.nn.LayerNorm):
    pass


class OutputReleasedRMSNorm(_OutputReleased, torch.nn.RMSNorm):
    pass


class OutputReleasedFusedRMSNorm(_OutputReleased, FusedRMSNorm):
    pass


class OutputReleasedTorchNorm(TorchNorm):
    norms = {"LayerNorm": OutputReleasedLayerNorm, "RMSNorm": OutputReleasedRMSNorm}


class OutputReleasedFusedTorchNorm(TorchNorm):
    norms = {**OutputReleasedTorchNorm.norms, "RMSNorm": OutputReleasedFusedRMSNorm}


OUTPUT_RELEASED = {TorchNorm: OutputReleasedTorchNorm, FusedTorchNorm: OutputReleasedFusedTorchNorm}


class NormRecomputingTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer (same submodules and state dict) whose norms' outputs are released after the
    attention and the MLP that read them, and recomputed in backward (the spec gives it
    norms from :data:`OUTPUT_RELEASED`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        release_after(self.self_attention, self.input_layernorm)
        release_after(self.mlp, self.pre_mlp_layernorm)


def recompute_norms(layer_spec) -> None:
    """Make a local layer spec (norms :class:`TorchNorm` or :class:`FusedTorchNorm`) release and recompute its two
    norms' outputs."""
    submodules = layer_spec.submodules
    submodules.input_layernorm = OUTPUT_RELEASED[submodules.input_layernorm]
    submodules.pre_mlp_layernorm = OUTPUT_RELEASED[submodules.pre_mlp_layernorm]
    layer_spec.module = NormRecomputingTransformerLayer
