"""Paired preference losses against a reference policy, and the ``model.dpo`` loss settings.

Inputs are per-sequence response log-prob values of the policy (differentiable)
and of the reference (sequences.py), chosen and rejected interleaved. The
reference only ever enters through such sums, which is what lets them be
computed once and cached. With l = log pi(y|x) (the response sum; its mean over
tokens with ``preference_average_log_probs``), u = l - l_ref the log-ratio of a
response, beta = ``ref_policy_kl_penalty`` and h = u_chosen - u_rejected, the
implicit reward of a response is beta u, and ``model.dpo.preference_loss``
names one loss or a weighted mixture of them (TRL's names; ``sigmoid`` is
``dpo``). Each is one small function of a microbatch's :class:`Pairs` below;
the README's loss table gives every formula and the convention it follows.

Options that change what the losses see (TRL's keys, applied in this order):
LD-DPO (``ld_alpha``) weights each response's tokens beyond the shorter
response's length by alpha in l; f-DPO (``f_divergence_type``) replaces u by
the derivative f'(pi/pi_ref) of an f-divergence in the margin; DPOP
(``dpop_lambda``) subtracts lambda max(0, l_ref - l) of the chosen response
from the margin; WPO (``use_weighting``) multiplies each pair's loss by the
policy's length-normalised probability of both responses (no gradient).

Every loss is a mean over the pairs it is given, so averaging equal-sized
microbatches and data-parallel ranks gives the global-batch mean. The ones that
pool over a batch (``aot`` sorts, ``sft`` averages over its tokens) do so over a
microbatch, as TRL does over each batch it is given.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from nemo_dpo.losses.base import CORE_STATISTICS, Loss, finish, pooled_nll, split
from nemo_dpo.losses.kto import LOSSES as KTO_LOSSES
from nemo_dpo.losses.reference_free import LOSSES as REFERENCE_FREE_LOSSES
# sequence_sums and per_sequence are the losses' helpers for callers that hold per-token values
from nemo_dpo.losses.sequences import LOGPS, SHARED_LOGPS, WPO_LOGPS, per_sequence, sequence_sums  # noqa: F401
from nemo_dpo.losses.statistics import Statistic
from nemo_dpo.ranges import Flag, Integer, ListOf, OneOf, OneOrMany, Real, check

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class Pairs:
    """One microbatch as every paired loss sees it: [pairs] tensors, (chosen, rejected) tuples."""

    beta: float
    label_smoothing: float
    logps: tuple  # l: LD-weighted with ld_alpha, per token with preference_average_log_probs
    ref_logps: tuple
    ratios: tuple  # u = l - l_ref
    scores: tuple  # f'(pi/pi_ref) of f_divergence_type; u itself for reverse_kl
    margin: torch.Tensor  # scores chosen - rejected, minus the DPOP penalty
    dpop_penalty: torch.Tensor | None  # lambda max(0, l_ref - l) of the chosen response (dpop_lambda > 0)
    counts: tuple  # response tokens
    sums: tuple  # the policy's plain response sums (SFT)
    gt_margin: torch.Tensor  # gt_reward_scale x (r_chosen - r_rejected), the data's rewards
    discopop_tau: float


def _smoothed_sigmoid(p: Pairs, x):
    """-(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x) (conservative DPO's label smoothing)."""
    eps = p.label_smoothing
    return -(1 - eps) * F.logsigmoid(p.beta * x) - eps * F.logsigmoid(-p.beta * x)


def dpo(p):  # Rafailov et al. 2023; label smoothing: Mitchell 2023 (cDPO)
    return _smoothed_sigmoid(p, p.margin)


def ipo(p):  # Azar et al. 2023, on l as configured (sums by default, as NeMo-Aligner)
    return (p.margin - 1.0 / (2.0 * p.beta)) ** 2


def _bernoulli_kl(p_logp, q_logp):
    """KL(P || Q) of two-outcome distributions given as stacked (log P(1), log P(0))."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(0)


def _model_and_truth(p):  # Nemotron-4 RPO: the model's preference distribution and the data's
    model_logp = torch.stack([F.logsigmoid(p.beta * p.margin), F.logsigmoid(-p.beta * p.margin)])
    truth_logp = torch.stack([F.logsigmoid(p.gt_margin), F.logsigmoid(-p.gt_margin)])
    return model_logp, truth_logp


def rpo_fwd_kl(p):
    return _bernoulli_kl(*_model_and_truth(p))


def rpo_bwd_kl(p):
    return _bernoulli_kl(*reversed(_model_and_truth(p)))


def rpo_sq(p):
    return (p.beta * p.margin - p.gt_margin) ** 2


def hinge(p):  # SLiC (Zhao et al. 2023)
    return torch.relu(1 - p.beta * p.margin)


def robust(p):  # Chowdhury et al. 2024: unbiased under labels flipped with probability eps
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(p.beta * p.margin) + eps * F.logsigmoid(-p.beta * p.margin)) / (1 - 2 * eps)


def exo_pair(p):  # Ji et al. 2024 (EXO): KL(model's pair distribution || (1 - eps, eps))
    eps = p.label_smoothing
    x = p.beta * p.margin
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


def nca_pair(p):  # Chen et al. 2024 (NCA): absolute rewards, not only their difference
    chosen, rejected = p.beta * p.ratios[0], p.beta * p.ratios[1]
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def sppo_hard(p):  # Wu et al. 2024 (SPPO) with winner probability 1, loser 0
    return (p.ratios[0] - 0.5 / p.beta) ** 2 + (p.ratios[1] + 0.5 / p.beta) ** 2


def _sorted_dpo(p, chosen, rejected):
    return _smoothed_sigmoid(p, torch.sort(chosen).values - torch.sort(rejected).values)


def aot(p):  # Melnyk et al. 2024 (AOT): the sorted policy margins dominate the sorted reference margins
    return _sorted_dpo(p, p.logps[0] - p.logps[1], p.ref_logps[0] - p.ref_logps[1])


def aot_unpaired(p):  # AOT on sorted chosen and rejected log-ratios separately
    return _sorted_dpo(p, p.ratios[0], p.ratios[1])


def apo_zero(p):  # D'Oosterlinck et al. 2024 (APO-zero): chosen up, rejected down
    return (1 - torch.sigmoid(p.beta * p.ratios[0])) + torch.sigmoid(p.beta * p.ratios[1])


def apo_down(p):  # APO-down: both down, rejected more
    return torch.sigmoid(p.beta * p.ratios[0]) + (1 - torch.sigmoid(p.beta * (p.ratios[0] - p.ratios[1])))


def discopop(p):  # Chan Lu et al. 2024 (DiscoPOP): logistic and exponential losses mixed by sigmoid(x / tau)
    x = p.beta * p.margin
    mix = torch.sigmoid(x / p.discopop_tau)
    return -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix


def sigmoid_norm(p):  # DPO on scores divided by the response lengths
    return -F.logsigmoid(p.beta * (p.scores[0] / p.counts[0].clamp(min=1) - p.scores[1] / p.counts[1].clamp(min=1)))


def sft(p):  # NLL per token over the microbatch's chosen tokens, the same for every pair (MPO's third loss)
    return pooled_nll(p.sums[0], p.counts[0]).expand_as(p.margin)


class BcoPair:
    """BCO on pairs (Jung et al. 2024): chosen as class 1 and rejected as class 0 of a binary classifier whose
    logit is the reward minus delta, the running mean of the global batches' mean reward of the steps before.

    delta is training state: updated after every optimizer step from the step's averaged rewards (the same
    on every rank and at every layout), checkpointed in ``nemo_dpo.json``.
    """

    statistics = (Statistic("bco_reward_shift", "bco_reward_shift", per_pair=False),)

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def __call__(self, p):
        chosen, rejected = p.beta * p.ratios[0] - self.mean, p.beta * p.ratios[1] - self.mean
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)

    def stats(self, p) -> dict:
        return {"bco_reward_shift": torch.tensor(self.mean, dtype=torch.float64)}

    def end_step(self, metrics: dict) -> None:
        batch_mean = (metrics["rewards_chosen_mean"] + metrics["rewards_rejected_mean"]) / 2
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


# model.dpo.preference_loss -> a per-pair loss of Pairs (a class: one instance, with state, per run)
TERMS = {
    "dpo": dpo, "ipo": ipo, "rpo_fwd_kl": rpo_fwd_kl, "rpo_bwd_kl": rpo_bwd_kl, "rpo_sq": rpo_sq, "sigmoid": dpo,
    "hinge": hinge, "robust": robust, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "bco_pair": BcoPair, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired, "apo_zero": apo_zero,
    "apo_down": apo_down, "discopop": discopop, "sigmoid_norm": sigmoid_norm, "sft": sft,
}
PREFERENCE_LOSSES = tuple(TERMS)
NAMES = PREFERENCE_LOSSES + tuple(REFERENCE_FREE_LOSSES) + tuple(KTO_LOSSES)
# Which losses each option applies to (TRL's rules: f-DPO and DPOP change the chosen-minus-rejected margin; WPO
# weights pairs, which aot's sorting separates).
F_DIVERGENCE_LOSSES = ("dpo", "sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm", "sft")
DPOP_LOSSES = ("dpo", "sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop")
SORTING_LOSSES = ("aot", "aot_unpaired")

RANGES = {
    "model.dpo.preference_loss": OneOrMany(each=OneOf(choices=NAMES)),
    "model.dpo.ref_policy_kl_penalty": Real(gt=0),
    "model.dpo.preference_average_log_probs": Flag(),
    "model.dpo.sft_average_log_probs": Flag(),
    "model.dpo.preference_loss_weight": Real(ge=0),
    "model.dpo.sft_loss_weight": Real(ge=0),
    "model.dpo.gt_reward_scale": Real(ge=0),
    "model.dpo.label_smoothing": Real(ge=0, lt=0.5),  # at 0.5 the loss no longer prefers either response
    "model.dpo.preference_loss_weights": ListOf(each=Real(ge=0), nullable=True),
    "model.dpo.f_divergence_type": OneOf(choices=F_DIVERGENCES),
    "model.dpo.f_alpha_divergence_coef": Real(gt=0),
    "model.dpo.ld_alpha": Real(ge=0, le=1, nullable=True),
    "model.dpo.use_weighting": Flag(),
    "model.dpo.dpop_lambda": Real(ge=0),
    "model.dpo.discopop_tau": Real(gt=0),
    "model.dpo.simpo_gamma": Real(ge=0),
    "model.dpo.cpo_alpha": Real(ge=0),
    "model.dpo.sync_ref_model": Flag(),
    "model.dpo.ref_model_mixup_alpha": Real(ge=0, le=1),
    "model.dpo.ref_model_sync_steps": Integer(ge=1),
    "model.dpo.desirable_weight": Real(ge=0),
    "model.dpo.undesirable_weight": Real(ge=0),
}


@dataclass(frozen=True)
class PreferenceLossConfig:
    """The ``model.dpo`` loss settings (TRL's field names where TRL has the option), with their checks."""

    preference_loss: str | tuple = "dpo"
    ref_policy_kl_penalty: float = 0.1
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = False
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    gt_reward_scale: float = 1.0
    label_smoothing: float = 0.0
    preference_loss_weights: tuple | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    dpop_lambda: float = 0.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def names(self) -> tuple:
        """The loss names: one, or the mixture's."""
        return (self.preference_loss,) if isinstance(self.preference_loss, str) else tuple(self.preference_loss)

    def __post_init__(self):
        for field in fields(self):
            key = f"model.dpo.{field.name}"
            check(key, getattr(self, field.name), RANGES[key])
        names = self.names
        alone = [name for name in names if name in REFERENCE_FREE_LOSSES or name in KTO_LOSSES]
        if len(set(names)) < len(names) or (alone and len(names) > 1):
            raise ValueError(f"model.dpo.preference_loss: a list is a mixture of distinct paired losses with a "
                             f"reference {list(PREFERENCE_LOSSES)}, got {list(names)}")
        if "exo_pair" in names and self.label_smoothing == 0:
            raise ValueError("model.dpo.label_smoothing must be in (0, 0.5) for exo_pair (EXO's epsilon; the paper "
                             "uses 1e-3), got 0.0")
        if "orpo" in names and self.label_smoothing != 0:
            raise ValueError(f"model.dpo.label_smoothing must be 0 for orpo (it has none), got {self.label_smoothing}")
        if "kto" in names:
            self._check_kto()
        weights = self.preference_loss_weights
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"model.dpo.preference_loss_weights must be null or {len(names)} numbers >= 0, one per "
                             f"name of model.dpo.preference_loss {list(names)}, got {weights!r}")
        self._check_applies("f_divergence_type", self.f_divergence_type != "reverse_kl", F_DIVERGENCE_LOSSES)
        self._check_applies("dpop_lambda", self.dpop_lambda != 0, DPOP_LOSSES)
        self._check_applies("use_weighting", self.use_weighting,
                            [n for n in PREFERENCE_LOSSES if n not in SORTING_LOSSES])
        self._check_applies("ld_alpha", self.ld_alpha is not None, PREFERENCE_LOSSES)
        self._check_applies("sync_ref_model", self.sync_ref_model, PREFERENCE_LOSSES)
        for key in ("desirable_weight", "undesirable_weight"):
            self._check_applies(key, getattr(self, key) != 1.0, tuple(KTO_LOSSES))

    def _check_kto(self) -> None:
        """KTO's settings: TRL's loss on the completions' summed log-probs, with nothing of the paired losses'."""
        for key, unset in (("label_smoothing", 0.0), ("sft_loss_weight", 0.0), ("preference_average_log_probs", False)):
            if getattr(self, key) != unset:
                raise ValueError(f"model.dpo.{key} must be {unset} for kto (TRL's KTO has no such option), got "
                                 f"{getattr(self, key)!r}")

    def _check_applies(self, key: str, is_set: bool, losses) -> None:
        others = [name for name in self.names if name not in losses]
        if is_set and others:
            raise ValueError(f"model.dpo.{key}={getattr(self, key)!r} does not apply to {others}; it applies to "
                             f"{list(losses)}")

    @classmethod
    def from_cfg(cls, dpo_cfg) -> "PreferenceLossConfig":
        """The loss settings of the ``model.dpo`` config section (ValueError naming a bad one)."""
        def plain(value):
            return value if isinstance(value, (str, int, float, bool, type(None))) else tuple(value)

        return cls(**{field.name: plain(dpo_cfg[field.name]) for field in fields(cls)})


def f_divergence_scores(cfg: PreferenceLossConfig, ratios: torch.Tensor) -> torch.Tensor:
    """f'(t) at t = pi/pi_ref = exp(u), up to a constant that cancels in the margin (Wang et al. 2023, f-DPO)."""
    kind, alpha = cfg.f_divergence_type, cfg.f_alpha_divergence_coef
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return ratios
    if kind == "forward_kl":
        return 1 - torch.exp(-ratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(ratios)
    # TRL's alpha-divergence: (t^(alpha - 1) - 1) / (alpha - 1); the exponent is capped where fp32 exp overflows.
    return (torch.exp(torch.clamp((alpha - 1) * ratios, max=80.0)) - 1) / (alpha - 1)


class PreferenceLoss(Loss):
    """The paired losses with a reference, one or a weighted mixture, with the options above."""

    def __init__(self, cfg: PreferenceLossConfig):
        self.cfg = cfg
        self.names = cfg.names
        self.terms = [TERMS[name]() if isinstance(TERMS[name], type) else TERMS[name] for name in self.names]
        self.weights = cfg.preference_loss_weights or (1.0,) * len(self.names)
        values = (LOGPS, SHARED_LOGPS) if cfg.ld_alpha is not None else (LOGPS,)
        self.reference_values = values
        self.policy_values = values + ((WPO_LOGPS,) if cfg.use_weighting else ())
        statistics = list(CORE_STATISTICS)
        if len(self.names) > 1:
            statistics += [Statistic(f"preference_loss_{name}", f"preference_loss_{name}", per_pair=False)
                           for name in self.names]
        for term in self.terms:
            statistics += getattr(term, "statistics", ())
        if cfg.dpop_lambda > 0:
            statistics.append(Statistic("dpop_penalty", "dpop_penalty", per_pair=True))
        if cfg.use_weighting:
            statistics.append(Statistic("wpo_weight", "wpo_weight", per_pair=True))
        self.statistics = tuple(statistics)

    def _log_likelihoods(self, values: dict, counts: torch.Tensor) -> torch.Tensor:
        """l per sequence: LD-DPO's shared part + alpha x the tail, then per token if so configured."""
        logps = values[LOGPS]
        if self.cfg.ld_alpha is not None:
            shared = values[SHARED_LOGPS]
            logps = shared + self.cfg.ld_alpha * (logps - shared)
        return per_sequence(logps, counts, self.cfg.preference_average_log_probs)

    def pairs(self, policy: dict, reference: dict, counts, gt_rewards) -> Pairs:
        cfg = self.cfg
        logps, ref_logps = self._log_likelihoods(policy, counts), self._log_likelihoods(reference, counts)
        ratios = logps - ref_logps
        scores = f_divergence_scores(cfg, ratios)
        chosen_score, rejected_score = split(scores)
        margin = chosen_score - rejected_score
        penalty = None
        if cfg.dpop_lambda > 0:  # Pal et al. 2024 (Smaug), DPO-positive: the chosen response must not fall below
            chosen, _ = split(logps)
            ref_chosen, _ = split(ref_logps)
            penalty = cfg.dpop_lambda * torch.clamp(ref_chosen - chosen, min=0)
            margin = margin - penalty
        gt_chosen, gt_rejected = split(gt_rewards.float())
        return Pairs(
            beta=cfg.ref_policy_kl_penalty, label_smoothing=cfg.label_smoothing, logps=split(logps),
            ref_logps=split(ref_logps), ratios=split(ratios), scores=(chosen_score, rejected_score), margin=margin,
            dpop_penalty=penalty,
            counts=split(counts), sums=split(policy[LOGPS]), gt_margin=cfg.gt_reward_scale * (gt_chosen - gt_rejected),
            discopop_tau=cfg.discopop_tau,
        )

    def wpo_weights(self, policy: dict, counts):
        """exp of the mean per-token aligned log-prob of each response, chosen x rejected (Zhou et al. 2024, WPO)."""
        weights = torch.exp(policy[WPO_LOGPS] / counts.clamp(min=1))
        chosen, rejected = split(weights)
        return chosen * rejected

    def __call__(self, policy: dict, reference: dict, counts, gt_rewards):
        p = self.pairs(policy, reference, counts, gt_rewards)
        weights = self.wpo_weights(policy, counts) if self.cfg.use_weighting else None
        extra, preference = {}, None
        for name, term, weight in zip(self.names, self.terms, self.weights):
            per_pair = term(p)
            if weights is not None:
                per_pair = per_pair * weights
            part = per_pair.mean()
            preference = weight * part if preference is None else preference + weight * part
            if len(self.names) > 1:
                extra[f"preference_loss_{name}"] = part
            if hasattr(term, "stats"):
                extra.update(term.stats(p))
        if p.dpop_penalty is not None:
            extra["dpop_penalty"] = p.dpop_penalty
        if weights is not None:
            extra["wpo_weight"] = weights
        with torch.no_grad():
            rewards = (p.beta * p.ratios[0].detach(), p.beta * p.ratios[1].detach())
        return finish(self.cfg, preference, policy[LOGPS], counts, rewards, extra)

    def end_step(self, metrics: dict) -> None:
        for term in self.terms:
            if hasattr(term, "end_step"):
                term.end_step(metrics)

    def state_dict(self) -> dict:
        return {name: term.state_dict() for name, term in zip(self.names, self.terms) if hasattr(term, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for name, term in zip(self.names, self.terms):
            if hasattr(term, "load_state_dict"):
                if name not in state:
                    raise ValueError(f"no state of {name} (saved {sorted(state)}): it was saved by another loss")
                term.load_state_dict(state[name])


def preference_loss(cfg: PreferenceLossConfig, policy_sums, ref_sums, counts, gt_rewards):
    """One microbatch's (loss, stats) from response log-prob sums alone (a loss without options that need more):
    the functional form of :class:`PreferenceLoss`. All inputs are [2 * pairs], chosen/rejected interleaved."""
    return PreferenceLoss(cfg)({LOGPS: policy_sums}, {LOGPS: ref_sums}, counts, gt_rewards)
