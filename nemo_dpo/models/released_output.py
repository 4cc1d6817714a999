"""Modules whose output is freed once the next layer has read it, and recomputed in backward.

In the local layer spec a linear layer keeps its input for the weight gradient,
and for three of them that input is cheap to make again from tensors kept anyway:
a norm's output read by q/k/v or fc1 (from the residual stream), the SwiGLU's
output read by fc2 (from the fc1 output the SwiGLU keeps), and attention's
row-order output in a shared-prompt row read by the projection (from the fused
kernels' own outputs). megatron's
``CheckpointWithoutOutput`` frees such an output once its consumer has run and
recomputes it, into the same storage, when the gradient reaches the consumer.
:class:`ReleasesOutput` is that, for a module: ``releasable`` computes, and
:func:`release_after` releases once the consumer module has run.
"""

from functools import partial

import torch
from megatron.core.tensor_parallel import CheckpointWithoutOutput


class ReleasesOutput:
    """Mixin for a module whose forward returns ``self.releasable(function, *args)``."""

    pending = None

    def releasable(self, function, *args):
        """``function(*args)``; computed so that :meth:`release` can free it until the next call when a backward will
        follow (gradients on and an input that needs one), else plainly: nothing to recompute, nothing to free."""
        if not (torch.is_grad_enabled() and any(arg.requires_grad for arg in args)):
            return function(*args)
        self.pending = CheckpointWithoutOutput(fp8=None)  # None: no fp8 (its default, False, reads as fp8 on)
        return self.pending.checkpoint(function, *args)

    def release(self, consumer_output: torch.Tensor) -> None:
        """Free the output's memory; recompute it when ``consumer_output``'s gradient arrives (every releasable
        output must be released: its backward needs the recomputation)."""
        if self.pending is not None:
            self.pending.discard_output_and_register_recompute(consumer_output)
            self.pending = None


def _release(releaser: ReleasesOutput, consumer, args, output) -> None:
    releaser.release(output[0] if isinstance(output, tuple) else output)  # megatron's modules: (output, bias)


def release_after(consumer: torch.nn.Module, releaser: ReleasesOutput) -> None:
    """Release ``releaser``'s output each time ``consumer`` (the module whose layers, and any LoRA adapter hooked on
    them, read it) has run forward; recomputed when the gradient reaches ``consumer``'s output."""
    consumer.register_forward_hook(partial(_release, releaser))
