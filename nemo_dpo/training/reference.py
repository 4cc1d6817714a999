"""The reference policy: the initial weights, kept off the compute device.

DPO needs log pi_ref for every batch. Rather than a second model on the GPU, the
initial weights live in host memory (pinned when there is a GPU) and are copied
into the policy's parameters for a forward-only pass, then the policy's weights
are copied back (on CPU the tensors are simply exchanged). The reference therefore runs through exactly the same modules,
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
        self.weights = [p.detach().to("cpu", copy=True) for p in self.params]
        # On a GPU the policy's weights wait in pinned host buffers while the reference is
        # in; on CPU both live in the same memory and the tensors are swapped, not copied.
        self.on_host = all(p.device.type == "cpu" for p in self.params)
        self.stash = None
        if not self.on_host:
            self.weights = [w.pin_memory() for w in self.weights]
            self.stash = [torch.empty_like(w).pin_memory() for w in self.weights]
        self.model = model

    def _exchange(self, entering: bool) -> None:
        with torch.no_grad():
            if self.on_host:
                for param, ref in zip(self.params, self.weights):
                    param.data, ref.data = ref.data, param.data
            elif entering:
                for param, stash, ref in zip(self.params, self.stash, self.weights):
                    stash.copy_(param)
                    param.copy_(ref, non_blocking=True)
            else:
                for param, stash in zip(self.params, self.stash):
                    param.copy_(stash, non_blocking=True)

    @contextmanager
    def swapped_in(self):
        """Run the block as the reference policy (its weights in the model), dropout off."""
        self._exchange(entering=True)
        try:
            with _eval_mode(self.model):
                yield
        finally:
            self._exchange(entering=False)
