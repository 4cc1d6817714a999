"""The reference policy: the initial weights, kept off the compute device.

DPO needs log pi_ref for every batch. Rather than a second model on the GPU, the
initial weights live in host memory (pinned when there is a GPU) and are copied
into the policy's parameters for a forward-only pass, then the policy's weights
are copied back. The reference therefore runs through exactly the same modules,
parallel layout and kernels as the policy. With LoRA the base model *is* the
reference: no copy at all, the adapters are switched off.
"""

from contextlib import contextmanager

import torch

from nemo_dpo.models.lora import adapters_disabled


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class BaseModelReference:
    """LoRA's reference: the same model with its adapters switched off."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @contextmanager
    def swapped_in(self):
        """Run the block as the reference policy, dropout off."""
        with adapters_disabled(self.model), _eval_mode(self.model):
            yield


class ReferencePolicy:
    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters()]
        pin = torch.cuda.is_available()
        self.weights = [p.detach().to("cpu", copy=True) for p in self.params]
        # Host buffers the policy's weights wait in while the reference is swapped in.
        self.stash = [torch.empty_like(w) for w in self.weights]
        if pin:
            self.weights = [w.pin_memory() for w in self.weights]
            self.stash = [s.pin_memory() for s in self.stash]
        self.model = model

    @contextmanager
    def swapped_in(self):
        """Run the block as the reference policy (its weights in the model), dropout off."""
        with torch.no_grad():
            for param, stash, ref in zip(self.params, self.stash, self.weights):
                stash.copy_(param)
                param.copy_(ref, non_blocking=True)
        try:
            with _eval_mode(self.model):
                yield
        finally:
            with torch.no_grad():
                for param, stash in zip(self.params, self.stash):
                    param.copy_(stash, non_blocking=True)
