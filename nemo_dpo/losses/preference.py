"""Preference losses over a batch of (chosen, rejected) pairs.

Inputs are per-sequence sums of response log-probabilities, for the policy
(differentiable) and the reference, with their response token counts, chosen
and rejected interleaved (even entries chosen, odd rejected). The reference only
ever enters through its sums, which is what lets them be computed once and cached.
The implicit reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)).

Losses (``model.dpo.preference_loss``), with h = log-ratio margin
(chosen minus rejected, before beta) and beta = ``ref_policy_kl_penalty``:

- ``dpo``:  -log sigmoid(beta h); with label smoothing eps (conservative DPO,
  Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- ``ipo``:  (h - 1 / (2 beta))^2  (Azar et al. 2023).
- ``rpo_fwd_kl`` / ``rpo_bwd_kl``: KL between the model's preference
  distribution sigmoid(beta h) and the ground-truth one sigmoid(s (r_c - r_r)),
  forward KL(model || truth) and backward KL(truth || model), with
  s = ``gt_reward_scale`` and r the rewards given in the data (Nemotron-4 RPO).
- ``rpo_sq``: (beta h - s (r_c - r_r))^2.

Every loss is a mean over the pairs it is given, so averaging equal-sized
microbatches and data-parallel ranks gives the global-batch mean.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from nemo_dpo.losses.statistics import Statistic
from nemo_dpo.ranges import Flag, OneOf, Real, check

PREFERENCE_LOSSES = ("dpo", "ipo", "rpo_fwd_kl", "rpo_bwd_kl", "rpo_sq")

RANGES = {
    "model.dpo.preference_loss": OneOf(choices=PREFERENCE_LOSSES),
    "model.dpo.ref_policy_kl_penalty": Real(gt=0),
    "model.dpo.preference_average_log_probs": Flag(),
    "model.dpo.sft_average_log_probs": Flag(),
    "model.dpo.preference_loss_weight": Real(ge=0),
    "model.dpo.sft_loss_weight": Real(ge=0),
    "model.dpo.gt_reward_scale": Real(ge=0),
    "model.dpo.label_smoothing": Real(ge=0, lt=0.5),  # at 0.5 the loss no longer prefers either response
}


@dataclass(frozen=True)
class PreferenceLossConfig:
    preference_loss: str = "dpo"
    ref_policy_kl_penalty: float = 0.1
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = False
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    gt_reward_scale: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        for field in fields(self):
            key = f"model.dpo.{field.name}"
            check(key, getattr(self, field.name), RANGES[key])

    @classmethod
    def from_cfg(cls, dpo_cfg) -> "PreferenceLossConfig":
        """The loss settings of the ``model.dpo`` config section (ValueError naming a bad one)."""
        return cls(**{field.name: dpo_cfg[field.name] for field in fields(cls)})


def sequence_sums(token_values: torch.Tensor, loss_mask: torch.Tensor, segment_ids=None, num_sequences: int = 0):
    """Per-sequence sums of per-token values over response tokens (``loss_mask``), chosen/rejected interleaved.

    Unpacked, a row is a sequence; packed rows hold several, told apart by
    ``segment_ids`` (sequence index per token), ``num_sequences`` in all.
    """
    masked = token_values * loss_mask
    if segment_ids is None:
        return masked.sum(-1)
    return masked.new_zeros(num_sequences).index_add(0, segment_ids.flatten(), masked.flatten())


def per_sequence(sums: torch.Tensor, counts: torch.Tensor, average: bool) -> torch.Tensor:
    """Sums, or means over the response tokens."""
    return sums / counts.clamp(min=1) if average else sums


def _split(rows: torch.Tensor):
    return rows[0::2], rows[1::2]


def preference_loss(
    cfg: PreferenceLossConfig,
    policy_sums: torch.Tensor,
    ref_sums: torch.Tensor,
    counts: torch.Tensor,
    gt_rewards: torch.Tensor,
):
    """Total loss and per-pair statistics for one microbatch.

    All inputs are [2 * pairs]: response log-prob sums of policy and reference,
    response token counts, and the data's rewards.
    Returns (loss, stats) where loss is a scalar to backpropagate and stats holds
    detached per-pair tensors for logging.
    """
    policy = per_sequence(policy_sums, counts, cfg.preference_average_log_probs)
    ref = per_sequence(ref_sums, counts, cfg.preference_average_log_probs)
    beta = cfg.ref_policy_kl_penalty
    chosen_ratio, rejected_ratio = _split(policy - ref)
    margin = chosen_ratio - rejected_ratio
    gt_chosen, gt_rejected = _split(gt_rewards.float())
    gt_margin = cfg.gt_reward_scale * (gt_chosen - gt_rejected)

    name = cfg.preference_loss
    if name == "dpo":
        eps = cfg.label_smoothing
        pref = -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    elif name == "ipo":
        pref = (margin - 1.0 / (2.0 * beta)) ** 2
    elif name in ("rpo_fwd_kl", "rpo_bwd_kl"):
        model_logp = torch.stack([F.logsigmoid(beta * margin), F.logsigmoid(-beta * margin)])
        truth_logp = torch.stack([F.logsigmoid(gt_margin), F.logsigmoid(-gt_margin)])
        p, q = (model_logp, truth_logp) if name == "rpo_fwd_kl" else (truth_logp, model_logp)
        pref = (p.exp() * (p - q)).sum(0)
    else:  # rpo_sq
        pref = (beta * margin - gt_margin) ** 2
    pref = pref.mean()

    sft = torch.zeros_like(pref)
    if cfg.sft_loss_weight != 0:
        chosen_logp, _ = _split(per_sequence(policy_sums, counts, cfg.sft_average_log_probs))
        sft = -chosen_logp.mean()

    loss = cfg.preference_loss_weight * pref + cfg.sft_loss_weight * sft
    with torch.no_grad():
        rewards_chosen, rewards_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        stats = {
            "loss": loss.detach().clone(),  # the schedule scales the returned loss in place
            "preference_loss": pref.detach(),
            "sft_loss": sft.detach(),
            "rewards_chosen": rewards_chosen,
            "rewards_rejected": rewards_rejected,
            "correct": rewards_chosen > rewards_rejected,
            "reward_margin": rewards_chosen.double() - rewards_rejected.double(),
        }
    return loss, stats


class PreferenceLoss:
    """The losses above behind the interface the training step uses.

    ``needs_reference``: the loss takes the reference's sums, so a reference must
    be built and run. ``statistics``: what is logged of each microbatch's stats.
    """

    needs_reference = True
    statistics = (
        Statistic("loss", "loss", per_pair=False),
        Statistic("preference_loss", "preference_loss", per_pair=False),
        Statistic("sft_loss", "sft_loss", per_pair=False),
        Statistic("accuracy", "correct", per_pair=True),  # chosen reward above rejected
        Statistic("rewards_chosen_mean", "rewards_chosen", per_pair=True),
        Statistic("rewards_rejected_mean", "rewards_rejected", per_pair=True),
        Statistic("reward_margin", "reward_margin", per_pair=True),
    )

    def __init__(self, cfg: PreferenceLossConfig):
        self.cfg = cfg

    @classmethod
    def from_cfg(cls, dpo_cfg) -> "PreferenceLoss":
        return cls(PreferenceLossConfig.from_cfg(dpo_cfg))

    def __call__(self, policy_sums, ref_sums, counts, gt_rewards):
        return preference_loss(self.cfg, policy_sums, ref_sums, counts, gt_rewards)
