"""The reference policy: how it runs, and where each batch's reference values come from.

A loss that compares with a reference (DPO and its kin) needs, for every
sequence of a microbatch, the per-sequence values it declares in
``reference_values`` (the response's log-prob sum, and for LD-DPO its
shared-length part; losses/sequences.py), in ``Microbatch.reference``. One
interface, ``attach(microbatches, split, indices) -> seconds``, with three
sources, chosen by the trainer from the loss object:

- :class:`OnlineReference`: a forward-only pass with the reference in the
  model, for every training batch. Validation batches are computed once each,
  and only the ones validation uses, until the reference moves (TR-DPO).
- :class:`PrecomputedReference`: the table computed once before training
  (``training/reference_cache.py``); a batch just looks its rows up.
- :class:`ReferenceFree`: for a loss with ``needs_reference`` false (SimPO, CPO,
  ORPO): nothing is built, run or stored, and no time is spent.

The reference runs as a model in one of two ways. :class:`ReferenceWeights`: the
initial weights live in host memory (pinned when there is a GPU) and are copied
into the policy's parameters for the pass, then the policy's weights are copied
back (on CPU the tensors are simply exchanged), so the reference runs through
exactly the same modules, parallel layout and kernels as the policy, without a
second model on the device. :class:`AdaptersOff`: with LoRA the base model *is*
the reference: no copy at all, the adapters are switched off.

TR-DPO (``model.dpo.sync_ref_model``) moves the reference every
``ref_model_sync_steps`` steps towards the policy, ref = alpha policy + (1 -
alpha) ref (Gorbatovski et al. 2024); its weights are then training state,
saved in checkpoints as sharded tensors next to the model's.
"""

from contextlib import contextmanager

import torch

from nemo_dpo.models.lora import adapters_disabled
from nemo_dpo.ranges import OneOf
from nemo_dpo.training.checkpoint import sharded_like_model
from nemo_dpo.training.dpo_step import response_values
from nemo_dpo.training.progress import clock

REFERENCE_SOURCES = ("online", "precomputed")  # model.dpo.reference_logprobs
REFERENCE_KEY = "reference"  # the TR-DPO reference's weights in a checkpoint

RANGES = {"model.dpo.reference_logprobs": OneOf(choices=REFERENCE_SOURCES)}


def check_reference_config(model_cfg) -> None:
    """A moving reference (TR-DPO) only where it can move."""
    dpo = model_cfg.dpo
    if dpo.sync_ref_model and dpo.reference_logprobs == "precomputed":
        raise ValueError("model.dpo.sync_ref_model=true moves the reference during training, so its log-probs cannot "
                         "be precomputed: use model.dpo.reference_logprobs=online (or sync_ref_model=false)")
    if dpo.sync_ref_model and model_cfg.peft.peft_scheme == "lora":
        raise ValueError("model.dpo.sync_ref_model=true needs reference weights to move, but with "
                         "model.peft.peft_scheme=lora the reference is the frozen base: use sync_ref_model=false")


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

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @contextmanager
    def swapped_in(self):
        """Run the block as the reference policy, dropout off."""
        with adapters_disabled(self.model), _eval_mode(self.model):
            yield


class ReferenceWeights:
    """The model's weights at construction (the initial policy), swapped in on demand."""

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

    def mix_in(self, alpha: float) -> None:
        """reference = alpha x policy + (1 - alpha) x reference, parameter by parameter (TR-DPO)."""
        with torch.no_grad():
            for param, ref in zip(self.params, self.weights):
                ref.mul_(1.0 - alpha).add_(param.detach().to(ref.device), alpha=alpha)

    def sharded_state(self) -> dict:
        """The weights as sharded tensors named ``reference.<parameter>``, for checkpoints."""
        return sharded_like_model(self.model, dict(zip(self.params, self.weights)), REFERENCE_KEY + ".")


def reference_model(model, lora: bool):
    """How ``model`` runs as the reference: adapters off (LoRA), or the current weights kept aside."""
    return AdaptersOff(model) if lora else ReferenceWeights(model)


class OnlineReference:
    """Reference values from a forward-only pass over the batch's own microbatches (last pipeline stage)."""

    def __init__(self, runs_as_reference, log_probs, values: tuple):
        """``runs_as_reference``: ReferenceWeights or AdaptersOff; ``log_probs``: ``DPOStep.log_probs``;
        ``values``: the loss's ``reference_values``."""
        self.runs_as_reference, self.log_probs, self.values = runs_as_reference, log_probs, values
        self._validation = {}  # batch indices -> per-microbatch values: validation batches repeat, the reference not

    def _pass(self, microbatches) -> list:
        with self.runs_as_reference.swapped_in():
            return [response_values(self.values, lp, mb) for mb, lp in zip(microbatches, self.log_probs(microbatches))]

    def attach(self, microbatches: list, split: str, indices: list) -> float:
        start = clock()
        if split == "train":
            values = self._pass(microbatches)
        else:
            key = (split, tuple(indices))
            if key not in self._validation:
                self._validation[key] = self._pass(microbatches)
            values = self._validation[key]
        for mb, reference in zip(microbatches, values):
            mb.reference = reference
        return clock() - start

    def mix_in(self, alpha: float) -> None:
        """TR-DPO's update of the reference weights; validation's values are computed afresh afterwards."""
        self.runs_as_reference.mix_in(alpha)
        self._validation.clear()


class PrecomputedReference:
    """Reference values looked up in per-split tables computed before training: [pairs, 2 x values], each value's
    (chosen, rejected) columns in turn."""

    def __init__(self, tables: dict, microbatcher, values: tuple):
        self.tables, self.microbatcher, self.values = tables, microbatcher, values

    def attach(self, microbatches: list, split: str, indices: list) -> float:
        start = clock()
        rows = self.microbatcher.local(list(self.tables[split][indices]))  # this DP rank's pairs, like the batch
        size = self.microbatcher.micro_batch_size
        for i, mb in enumerate(microbatches):
            table = torch.stack(rows[i * size : (i + 1) * size]).float().to(mb.tokens.device)
            mb.reference = {name: table[:, 2 * j : 2 * j + 2].reshape(-1) for j, name in enumerate(self.values)}
        return clock() - start


class ReferenceFree:
    """No reference at all (a loss whose ``needs_reference`` is false): microbatches get none, in no time."""

    def attach(self, microbatches: list, split: str, indices: list) -> float:
        return 0.0
