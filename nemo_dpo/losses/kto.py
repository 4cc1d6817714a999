"""KTO (Ethayarajh et al. 2024): learning from single completions labelled desirable or undesirable.

Kahneman-Tversky's value of a completion against a reference point: with l the
completion's summed log-prob, u = l - l_ref its log-ratio, beta =
``ref_policy_kl_penalty`` and z0 the reference point,

    desirable:    desirable_weight   x (1 - sigmoid(beta (u - z0)))
    undesirable:  undesirable_weight x (1 - sigmoid(beta (z0 - u)))

averaged over the examples (TRL's KTOTrainer, ``loss_type="kto"``, whose field
names the weights keep). z0 is the policy's KL divergence from the reference,
estimated on mismatched prompt/completion pairs: the mean of l - l_ref over the
KL completions (data/unpaired.py), without gradient, clamped at 0. It is one
number for the whole global batch, so it needs every microbatch and every
data-parallel rank before any loss is computed: the trainer estimates it in a
forward-only pass of the policy before the batch's pass
(training/kl_estimate.py) and gives it to :meth:`KTO.set_kl`.

Items arrive as pairs do: even sequences are the examples' completions, odd ones
their KL completions, and the data's reward is the label (1.0 desirable). The
implicit reward of a completion is beta u, logged per side (TRL's
``rewards/chosen`` and ``rewards/rejected``: desirable and undesirable) over the
examples of that side in the global batch, with their summed log-probs and z0.
"""

import torch

from nemo_dpo.losses.base import Loss, split
from nemo_dpo.losses.sequences import LOGPS
from nemo_dpo.losses.statistics import Statistic


class KTO(Loss):
    estimates_kl = True
    statistics = (
        Statistic("loss", "loss", per_pair=False),
        Statistic("preference_loss", "preference_loss", per_pair=False),
        Statistic("rewards_chosen_mean", "rewards", per_pair=True, where="desirable"),
        Statistic("rewards_rejected_mean", "rewards", per_pair=True, where="undesirable"),
        Statistic("logps_chosen_mean", "logps", per_pair=True, where="desirable"),
        Statistic("logps_rejected_mean", "logps", per_pair=True, where="undesirable"),
        Statistic("desirable_fraction", "desirable", per_pair=True),
        Statistic("kl", "kl", per_pair=False),  # z0, TRL's name
    )

    def __init__(self, cfg):
        """``cfg``: the ``model.dpo`` loss settings (preference.PreferenceLossConfig)."""
        self.cfg = cfg
        self.kl = None

    def set_kl(self, kl: torch.Tensor) -> None:
        """The reference point z0 of the global batch whose microbatches come next."""
        self.kl = kl

    def __call__(self, policy, reference, counts, gt_rewards):
        if self.kl is None:
            raise RuntimeError("KTO's reference point was not estimated before the loss (training/kl_estimate.py)")
        cfg, beta = self.cfg, self.cfg.ref_policy_kl_penalty
        logps, _ = split(policy[LOGPS])
        ref_logps, _ = split(reference[LOGPS])
        desirable = split(gt_rewards)[0] > 0.5
        ratios = logps - ref_logps
        kl = self.kl.to(ratios.dtype)
        losses = torch.where(desirable, cfg.desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl))),
                             cfg.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios))))
        preference = losses.mean()
        loss = cfg.preference_loss_weight * preference
        with torch.no_grad():
            stats = {
                "loss": loss.detach().clone(),  # the schedule scales the returned loss in place
                "preference_loss": preference.detach(),
                "rewards": beta * ratios.detach(),
                "logps": logps.detach(),
                "desirable": desirable,
                "undesirable": ~desirable,
                "kl": kl.detach(),
            }
        return loss, stats


LOSSES = {"kto": KTO}
