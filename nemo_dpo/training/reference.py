"""The reference policy: how it runs, and where each batch's reference log-prob sums come from.

A loss that compares with a reference (DPO and its kin) needs, for every
sequence of a microbatch, the sum of the reference's log-probs over its
response (``Microbatch.ref_sums``). One interface, ``attach(microbatches,
split, indices)``, with two sources:

- :class:`OnlineReference`: a forward-only pass with the reference in the
  model, for every training batch. The reference never changes, so validation
  batches are computed once each, and only the ones validation uses.
- :class:`PrecomputedReference`: the table computed once before training
  (``training/reference_cache.py``); a batch just looks its rows up.

The reference runs as a model in one of two ways. :class:`ReferenceWeights`: the
initial weights live in host memory (pinned when there is a GPU) and are copied
into the policy's parameters for the pass, then the policy's weights are copied
back (on CPU the tensors are simply exchanged), so the reference runs through
exactly the same modules, parallel layout and kernels as the policy, without a
second model on the device. :class:`AdaptersOff`: with LoRA the base model *is*
the reference: no copy at all, the adapters are switched off.
"""

from contextlib import contextmanager

import torch

from nemo_dpo.models.lora import adapters_disabled
from nemo_dpo.ranges import OneOf
from nemo_dpo.training.dpo_step import response_sums

REFERENCE_SOURCES = ("online", "precomputed")  # model.dpo.reference_logprobs

RANGES = {"model.dpo.reference_logprobs": OneOf(choices=REFERENCE_SOURCES)}


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class AdaptersOff:
    """LoRA's reference: the same model with its adapters switched off."""

    def __init__(self, model_chunks: list):
        self.model = torch.nn.ModuleList(model_chunks)

    @contextmanager
    def swapped_in(self):
        """Run the block as the reference policy, dropout off."""
        with adapters_disabled(self.model), _eval_mode(self.model):
            yield


class ReferenceWeights:
    """The model's weights at construction (the initial policy), swapped in on demand."""

    def __init__(self, model_chunks: list):
        model = torch.nn.ModuleList(model_chunks)
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


def reference_model(model_chunks: list, lora: bool):
    """How the model (its chunks) runs as the reference: adapters off (LoRA), or the current weights kept aside."""
    return AdaptersOff(model_chunks) if lora else ReferenceWeights(model_chunks)


class OnlineReference:
    """Reference sums from a forward-only pass over the batch's own microbatches (last pipeline stage)."""

    def __init__(self, runs_as_reference, log_probs, cp_group=None):
        """``runs_as_reference``: ReferenceWeights or AdaptersOff; ``log_probs``: ``DPOStep.log_probs``;
        ``cp_group``: the context-parallel group the sums are partial over (None: CP is 1)."""
        self.runs_as_reference, self.log_probs, self.cp_group = runs_as_reference, log_probs, cp_group
        self._validation = {}  # batch indices -> per-microbatch sums: validation batches repeat, the reference not

    def _pass(self, microbatches) -> list:
        with self.runs_as_reference.swapped_in():
            log_probs = self.log_probs(microbatches)
            return [response_sums(lp, mb, self.cp_group) for mb, lp in zip(microbatches, log_probs)]

    def attach(self, microbatches: list, split: str, indices: list) -> None:
        if split == "train":
            sums = self._pass(microbatches)
        else:
            key = (split, tuple(indices))
            if key not in self._validation:
                self._validation[key] = self._pass(microbatches)
            sums = self._validation[key]
        for mb, ref_sums in zip(microbatches, sums):
            mb.ref_sums = ref_sums


class PrecomputedReference:
    """Reference sums looked up in per-split tables ([pairs, 2]: chosen, rejected) computed before training."""

    def __init__(self, tables: dict, microbatcher):
        self.tables, self.microbatcher = tables, microbatcher

    def attach(self, microbatches: list, split: str, indices: list) -> None:
        rows = self.microbatcher.local(list(self.tables[split][indices]))  # this DP rank's pairs, like the batch
        size = self.microbatcher.micro_batch_size
        for i, mb in enumerate(microbatches):
            mb.ref_sums = torch.stack(rows[i * size : (i + 1) * size]).reshape(-1).float().to(mb.tokens.device)
