"""The interface every loss has, and the pieces all of them share.

The training step calls a loss once per microbatch as
``loss(policy, reference, counts, gt_rewards) -> (loss, stats)``: ``policy`` and
``reference`` are ``{value name: [sequences]}`` (sequences.py; ``reference`` is
None for a reference-free loss), ``counts`` the response token counts and
``gt_rewards`` the data's rewards. A loss declares what it needs and what it
logs, so the step, the reference and the trainer work with any of them:

- ``policy_values`` / ``reference_values``: the per-sequence values it is given;
  ``needs_reference`` is whether it has reference values at all (a reference-free
  loss never gets reference weights, a reference pass or a cache).
- ``statistics``: the entries of its stats logged as metrics (statistics.py).
- ``estimates_kl``: KTO's: before each global batch's pass the trainer estimates
  the policy's KL divergence from the reference on the batch's KL completions
  (training/kl_estimate.py) and gives it to the loss's ``set_kl``.
- ``end_step(metrics)``: called after each optimizer update with the step's
  averaged metrics, for a loss with training state (BCO's running reward mean);
  ``state_dict()`` / ``load_state_dict()`` carry that state through checkpoints
  as plain JSON data.
"""

import torch

from nemo_dpo.losses.sequences import LOGPS, per_sequence
from nemo_dpo.losses.statistics import Statistic

# What every loss logs, in this order: its value and parts, and the implicit rewards it compares.
CORE_STATISTICS = (
    Statistic("loss", "loss", per_pair=False),
    Statistic("preference_loss", "preference_loss", per_pair=False),
    Statistic("sft_loss", "sft_loss", per_pair=False),
    Statistic("accuracy", "correct", per_pair=True),  # chosen reward above rejected
    Statistic("rewards_chosen_mean", "rewards_chosen", per_pair=True),
    Statistic("rewards_rejected_mean", "rewards_rejected", per_pair=True),
    Statistic("reward_margin", "reward_margin", per_pair=True),
)


def split(rows: torch.Tensor):
    """(chosen, rejected) of interleaved per-sequence rows."""
    return rows[0::2], rows[1::2]


def pooled_nll(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token over all the given responses' tokens together (one pool, as a
    cross-entropy over the microbatch's chosen tokens computes it)."""
    return -sums.sum() / counts.sum().clamp(min=1)


def finish(cfg, preference: torch.Tensor, policy_sums, counts, rewards: tuple, extra: dict):
    """(total loss, stats) of a microbatch: ``preference_loss_weight`` x the preference part + ``sft_loss_weight`` x
    the NLL of the chosen responses (a mean over pairs; per token with ``sft_average_log_probs``).

    ``rewards``: each pair's (chosen, rejected) implicit rewards, for the logged rewards and accuracy;
    ``extra``: the loss's own statistics.
    """
    sft = torch.zeros_like(preference)
    if cfg.sft_loss_weight != 0:
        chosen_logp, _ = split(per_sequence(policy_sums, counts, cfg.sft_average_log_probs))
        sft = -chosen_logp.mean()
    loss = cfg.preference_loss_weight * preference + cfg.sft_loss_weight * sft
    with torch.no_grad():
        rewards_chosen, rewards_rejected = rewards[0].detach(), rewards[1].detach()
        stats = {
            "loss": loss.detach().clone(),  # the schedule scales the returned loss in place
            "preference_loss": preference.detach(),
            "sft_loss": sft.detach(),
            "rewards_chosen": rewards_chosen,
            "rewards_rejected": rewards_rejected,
            "correct": rewards_chosen > rewards_rejected,
            "reward_margin": rewards_chosen.double() - rewards_rejected.double(),
            **{key: value.detach() for key, value in extra.items()},
        }
    return loss, stats


class Loss:
    """What the training step relies on; a loss overrides what differs (see the module docstring)."""

    policy_values = (LOGPS,)
    reference_values = (LOGPS,)
    statistics = CORE_STATISTICS
    estimates_kl = False

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_values)

    def end_step(self, metrics: dict) -> None:
        """After an optimizer update; ``metrics``: the step's statistics averaged over the global batch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
