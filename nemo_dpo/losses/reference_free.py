"""Preference losses without a reference policy: SimPO, CPO and ORPO.

They compare the policy's own log-likelihoods of the chosen and the rejected
response, so they ask for no reference values (``reference_values`` is empty):
the trainer then keeps no reference weights, runs no reference pass and
computes no cache. Their implicit reward of a response is beta l, with l its
log-likelihood as the loss uses it (per token for SimPO and ORPO, as the papers
define them), and beta = ``ref_policy_kl_penalty`` (TRL's ``beta`` of these
trainers). CPO's and ORPO's NLL term is a per-token mean over the chosen
sequences' tokens of the microbatch, pooled, as a cross-entropy over them (TRL)
computes it: CPO's over the responses, ORPO's over prompt and response (as the
ORPO authors' code and TRL do; the paper writes it over the response).
"""

import math

import torch
import torch.nn.functional as F

from nemo_dpo.losses.base import CORE_STATISTICS, Loss, finish, pooled_nll, split
from nemo_dpo.losses.sequences import LOGPS, SEQUENCE_LOGPS, SEQUENCE_TOKENS, per_sequence
from nemo_dpo.losses.statistics import Statistic


class ReferenceFreeLoss(Loss):
    reference_values = ()

    def __init__(self, cfg):
        """``cfg``: the ``model.dpo`` loss settings (preference.PreferenceLossConfig)."""
        self.cfg = cfg

    def _smoothed_sigmoid(self, margin):
        """-(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x), eps = ``label_smoothing``."""
        beta, eps = self.cfg.ref_policy_kl_penalty, self.cfg.label_smoothing
        return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)

    def _finish(self, preference, policy, counts, logps, extra):
        beta = self.cfg.ref_policy_kl_penalty
        with torch.no_grad():
            chosen, rejected = split(logps.detach())
            rewards = (beta * chosen, beta * rejected)
        return finish(self.cfg, preference, policy[LOGPS], counts, rewards, extra)


class SimPO(ReferenceFreeLoss):
    """Meng et al. 2024: -log sigmoid(beta (l_chosen - l_rejected) - gamma), l the per-token mean log-prob and
    gamma = ``simpo_gamma`` the target reward margin (no NLL term: TRL's CPOTrainer with cpo_alpha=0)."""

    statistics = CORE_STATISTICS + (Statistic("simpo_margin", "simpo_margin", per_pair=True),)

    def __call__(self, policy, reference, counts, gt_rewards):
        logps = per_sequence(policy[LOGPS], counts, average=True)
        chosen, rejected = split(logps)
        margin = chosen - rejected - self.cfg.simpo_gamma / self.cfg.ref_policy_kl_penalty
        preference = self._smoothed_sigmoid(margin).mean()
        simpo_margin = self.cfg.ref_policy_kl_penalty * margin  # beta (l_c - l_r) - gamma: > 0 once past the target
        return self._finish(preference, policy, counts, logps, {"simpo_margin": simpo_margin})


class CPO(ReferenceFreeLoss):
    """Xu et al. 2024: -log sigmoid(beta (l_chosen - l_rejected)) + ``cpo_alpha`` x NLL of the chosen responses;
    l the response sums (per token with ``preference_average_log_probs``)."""

    statistics = CORE_STATISTICS + (Statistic("nll_loss", "nll_loss", per_pair=False),)

    def __call__(self, policy, reference, counts, gt_rewards):
        logps = per_sequence(policy[LOGPS], counts, self.cfg.preference_average_log_probs)
        chosen, rejected = split(logps)
        nll = pooled_nll(split(policy[LOGPS])[0], split(counts)[0])
        preference = self._smoothed_sigmoid(chosen - rejected).mean() + self.cfg.cpo_alpha * nll
        return self._finish(preference, policy, counts, logps, {"nll_loss": nll})


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPO(ReferenceFreeLoss):
    """Hong et al. 2024: NLL of the chosen sequences - beta log sigmoid(log odds(chosen) - log odds(rejected)),
    odds(y) = P(y) / (1 - P(y)) with log P(y) the response's per-token mean log-prob."""

    policy_values = (LOGPS, SEQUENCE_LOGPS, SEQUENCE_TOKENS)
    statistics = CORE_STATISTICS + (
        Statistic("nll_loss", "nll_loss", per_pair=False),
        Statistic("log_odds_ratio", "log_odds_ratio", per_pair=True),  # log sigmoid of the log odds ratio (TRL's)
        Statistic("log_odds_chosen", "log_odds_chosen", per_pair=True),  # the log odds ratio itself (TRL's name)
    )

    def __call__(self, policy, reference, counts, gt_rewards):
        logps = per_sequence(policy[LOGPS], counts, average=True)
        chosen, rejected = split(logps)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = pooled_nll(split(policy[SEQUENCE_LOGPS])[0], split(policy[SEQUENCE_TOKENS])[0])
        preference = nll - self.cfg.ref_policy_kl_penalty * ratio.mean()
        extra = {"nll_loss": nll, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
        return self._finish(preference, policy, counts, logps, extra)


LOSSES = {"simpo": SimPO, "cpo": CPO, "orpo": ORPO}
