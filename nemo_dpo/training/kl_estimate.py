"""KTO's reference point: the policy's KL divergence from the reference, estimated once per global batch.

KTO compares each completion's log-ratio with z0 = max(0, mean of l - l_ref over
mismatched prompt/completion pairs), without gradient (losses/kto.py). TRL's
KTOTrainer takes that mean over each device's batch and averages it over the
processes (``gather_for_metrics``): one number for all the examples that share
an optimizer step when there is no gradient accumulation. Here it is always one
number per global batch: the mean over every KL completion of the batch, summed
over this rank's microbatches and over the data-parallel ranks (one all-reduce
of a sum and a count, in float64), so the step is the same at any DP, TP, PP, CP
and number of microbatches; it equals TRL's with one microbatch per DP rank, and
with gradient accumulation it is TRL's per-microbatch estimates pooled.

Since it must be known before the first microbatch's loss, it is computed in a
forward-only pass of the policy (weights and dropout as they are, like TRL's
no-grad KL forward) over the batch's microbatches before the batch's own pass;
the reference's values of the KL completions come with the reference's values
of the batch (``Microbatch.reference``), online or precomputed.
"""

import torch
import torch.distributed as dist

from nemo_dpo.losses.base import split
from nemo_dpo.losses.sequences import LOGPS
from nemo_dpo.training.dpo_step import response_values


class KLEstimate:
    def __init__(self, loss, log_probs, layout):
        """``loss``: a loss with ``estimates_kl`` (KTO); ``log_probs``: ``DPOStep.log_probs`` (the policy,
        forward only); ``layout``: this rank's place in the grid."""
        self.loss, self.log_probs, self.layout = loss, log_probs, layout

    def attach(self, microbatches: list) -> None:
        """Estimate z0 for the global batch of which ``microbatches`` are this rank's share (reference values
        attached) and give it to the loss; every rank of the batch's pipeline takes part."""
        outputs = self.log_probs(microbatches)  # the last pipeline stage's; an empty list elsewhere
        if not self.layout.is_last_stage:
            return  # no loss here
        total = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        for mb, log_probs in zip(microbatches, outputs):
            policy = response_values((LOGPS,), log_probs, mb, self.layout.cp_group)[LOGPS]
            ratios = split(policy)[1].double() - split(mb.reference[LOGPS])[1].double()  # the KL completions
            total += torch.stack([ratios.sum(), ratios.new_tensor(ratios.numel())])
        if self.layout.dp_group is not None:
            dist.all_reduce(total, group=self.layout.dp_group)
        self.loss.set_kl((total[0] / total[1]).clamp(min=0).float())
