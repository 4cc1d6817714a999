"""Every loss equals TRL's own implementation on the same inputs (TRL 1.16's code is the oracle, not a transcription).

The paired losses with a reference live inside ``DPOTrainer._compute_loss``,
which takes per-token log-probs from the model's fused LM head: it is driven
here with stand-in models whose fused head returns given per-token log-probs
(policy and reference, and WPO's log sum p^2), on a padded batch of random
prompt and completion lengths. CPO, SimPO and ORPO run TRL's
``get_batch_loss_metrics`` on given logits, so TRL's own log-softmax, masks and
cross-entropy produce their numbers, and ours come from the same logits through
our vocab-parallel log-probs. Losses, logged rewards and gradients must agree
within 1e-6 over several betas. BCO's running mean and DPOP exist in no TRL
1.16 code: BCO's shift is checked as TRL's bco_pair against a reference moved
by delta / beta (the same loss), DPOP by hand in test_losses.py.
"""

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the CPO and ORPO trainers live in trl.experimental
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.callbacks import SyncRefModelCallback  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from nemo_dpo.losses import LOSSES, PreferenceLossConfig  # noqa: E402
from nemo_dpo.losses.logprobs import vocab_parallel_log_probs  # noqa: E402
from nemo_dpo.losses.sequences import sequence_values  # noqa: E402

PAIRS, LENGTH = 6, 14
BETAS = (0.05, 0.1, 0.5, 2.0)
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def interleave(rows: torch.Tensor) -> torch.Tensor:
    """TRL's [chosen..., rejected...] rows as ours: chosen and rejected of each pair next to each other."""
    half = rows.shape[0] // 2
    return torch.stack([rows[:half], rows[half:]], 1).flatten(0, 1)


def build(name, **settings):
    cfg = PreferenceLossConfig(preference_loss=name, **settings)
    return LOSSES[cfg.names[0]](cfg)


# ------------------------------------------------------------------ the paired losses: DPOTrainer._compute_loss


def token_batch(seed: int) -> dict:
    """TRL's padded batch (rows: chosen of each pair, then rejected) with per-token policy and reference log-probs
    (and WPO's log sum p^2) on the completion tokens, zero elsewhere as TRL's fused head gives them."""
    gen = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for pair in range(PAIRS):
        prompt = int(torch.randint(1, 4, (), generator=gen))
        for row in (pair, PAIRS + pair):
            end = prompt + int(torch.randint(1, LENGTH - prompt + 1, (), generator=gen))
            completion[row, prompt:end] = 1
    attention = (completion.cumsum(1) < completion.sum(1, keepdim=True)) | (completion == 1)
    mask = completion[:, 1:].float()

    def per_token(low, high):
        return -(low + (high - low) * torch.rand(2 * PAIRS, LENGTH - 1, generator=gen)) * mask

    return {
        "inputs": {"input_ids": torch.randint(3, 50, (2 * PAIRS, LENGTH), generator=gen),
                   "attention_mask": attention.long(), "completion_mask": completion},
        "policy": per_token(0.05, 2.5), "reference": per_token(0.05, 2.5), "log_sum_sq": per_token(1.0, 3.0),
        "gt_rewards": torch.rand(2 * PAIRS, generator=gen),
    }


class FusedHead:
    """A stand-in model whose fused LM head returns the given per-token log-probs (and log sum p^2)."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq=None):
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def __call__(self, labels=None, fused_lm_head=False, **inputs):
        zeros = torch.zeros_like(self.log_probs).detach()
        return FusedCausalLMOutput(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                                   log_sum_sq_probs=self.log_sum_sq)


def trl_paired(batch, loss_type, beta, label_smoothing=0.0, loss_weights=None, ld_alpha=None,
               f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False, discopop_tau=0.05,
               ref_shift=0.0, backward=True):
    """TRL's loss, its logged metrics and the gradient of the loss w.r.t. the policy's per-token log-probs.

    ``ref_shift``: added to every reference sum (TRL's precomputed-reference path). ``backward=False``: no gradient
    (None), where TRL's own backward fails.
    """
    policy = batch["policy"].clone().requires_grad_(True)
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=FusedHead(policy, batch["log_sum_sq"]), ref_model=FusedHead(batch["reference"]), accelerator=CPU,
        aux_loss_enabled=False, precompute_ref_logps=False, beta=beta, label_smoothing=label_smoothing,
        loss_types=list(loss_type), loss_weights=loss_weights or [1.0] * len(loss_type), ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=use_weighting, args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = dict(batch["inputs"])
    if ref_shift:
        trainer.precompute_ref_logps = True
        sums = batch["reference"].sum(1) + ref_shift
        inputs.update(ref_chosen_logps=sums[:PAIRS], ref_rejected_logps=sums[PAIRS:])
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    if backward:
        loss.backward()
    return loss.detach(), {k: v[0] for k, v in trainer._metrics["train"].items()}, policy.grad


def ours_paired(batch, loss):
    """Our loss, stats and gradient w.r.t. the same per-token log-probs, from the values the loss declares."""
    mask = interleave(batch["inputs"]["completion_mask"][:, 1:].float())
    policy = interleave(batch["policy"]).clone().requires_grad_(True)
    values = sequence_values(loss.policy_values, policy, mask, log_sum_sq=interleave(batch["log_sum_sq"]))
    reference = sequence_values(loss.reference_values, interleave(batch["reference"]), mask)
    value, stats = loss(values, reference, mask.sum(-1), batch["gt_rewards"])
    value.backward()
    return value.detach(), stats, policy.grad


def assert_same(batch, trl_result, ours_result, rewards=True):
    """Loss, logged rewards (``rewards``) and gradient (where TRL has one) agree."""
    trl_loss, metrics, trl_grad = trl_result
    loss, stats, grad = ours_result
    torch.testing.assert_close(loss, trl_loss, **TOLERANCE)
    for ours_key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"), ("correct", "rewards/accuracies")):
        if rewards:
            assert stats[ours_key].double().mean().item() == pytest.approx(metrics[trl_key], rel=1e-6,
                                                                            abs=1e-6), ours_key
    if trl_grad is not None:
        # TRL sums every position, its fused head gives the gradient to completion tokens only: compare those
        mask = interleave(batch["inputs"]["completion_mask"][:, 1:].float())
        torch.testing.assert_close(grad * mask, interleave(trl_grad) * mask, **TOLERANCE)


# (our name, TRL's name, label smoothing) for every paired loss with a reference that TRL has
PAIRED = [
    ("sigmoid", "sigmoid", 0.0), ("dpo", "sigmoid", 0.0), ("hinge", "hinge", 0.0), ("robust", "robust", 0.1),
    ("exo_pair", "exo_pair", 1e-3), ("nca_pair", "nca_pair", 0.0), ("bco_pair", "bco_pair", 0.0),
    ("sppo_hard", "sppo_hard", 0.0), ("aot", "aot", 0.0), ("aot", "aot", 0.2), ("aot_unpaired", "aot_unpaired", 0.1),
    ("apo_zero", "apo_zero", 0.0), ("apo_down", "apo_down", 0.0), ("discopop", "discopop", 0.0),
    ("sigmoid_norm", "sigmoid_norm", 0.0), ("sft", "sft", 0.0),
]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name,trl_name,eps", PAIRED, ids=[f"{n}-{e}" for n, _, e in PAIRED])
def test_paired_loss_equals_trl(name, trl_name, eps, beta):
    batch = token_batch(seed=100 * PAIRED.index((name, trl_name, eps)) + BETAS.index(beta))
    assert_same(batch, trl_paired(batch, [trl_name], beta, eps),
                ours_paired(batch, build(name, ref_policy_kl_penalty=beta, label_smoothing=eps)))


@pytest.mark.parametrize("beta", BETAS)
def test_ipo_per_token_is_trls_ipo(beta):
    """TRL's IPO divides each response's log-ratio by its length: ours with preference_average_log_probs=true
    (whose logged rewards are then per token too, where TRL logs the summed ones)."""
    batch = token_batch(seed=7)
    ours = build("ipo", ref_policy_kl_penalty=beta, preference_average_log_probs=True)
    assert_same(batch, trl_paired(batch, ["ipo"], beta), ours_paired(batch, ours), rewards=False)


@pytest.mark.parametrize("tau", (0.05, 0.5))
def test_discopop_tau(tau):
    batch = token_batch(seed=11)
    assert_same(batch, trl_paired(batch, ["discopop"], 0.5, discopop_tau=tau),
                ours_paired(batch, build("discopop", ref_policy_kl_penalty=0.5, discopop_tau=tau)))


F_DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.3),
                 ("alpha_divergence", 1.0)]
F_LOSSES = [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.1), ("exo_pair", 1e-3), ("discopop", 0.0),
            ("sigmoid_norm", 0.0), ("sft", 0.0)]


@pytest.mark.parametrize("beta", (0.1, 1.0))
@pytest.mark.parametrize("kind,coef", F_DIVERGENCES)
@pytest.mark.parametrize("name,eps", F_LOSSES)
def test_f_divergence_equals_trl(name, eps, kind, coef, beta):
    batch = token_batch(seed=13)
    options = {"f_divergence_type": kind, "f_alpha_divergence_coef": coef}
    assert_same(batch, trl_paired(batch, [name], beta, eps, **options),
                ours_paired(batch, build(name, ref_policy_kl_penalty=beta, label_smoothing=eps, **options)))


@pytest.mark.parametrize("ld_alpha", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("name,trl_name,eps", PAIRED, ids=[f"{n}-{e}" for n, _, e in PAIRED])
def test_ld_dpo_equals_trl(name, trl_name, eps, ld_alpha):
    """LD-DPO: the step gives the loss the shared-length sums it asks for, and the weighting is TRL's."""
    batch = token_batch(seed=17)
    ours = build(name, ref_policy_kl_penalty=0.3, label_smoothing=eps, ld_alpha=ld_alpha)
    assert_same(batch, trl_paired(batch, [trl_name], 0.3, eps, ld_alpha=ld_alpha), ours_paired(batch, ours))


WPO_LOSSES = [c for c in PAIRED if c[0] not in ("aot", "aot_unpaired", "sft")]


@pytest.mark.parametrize("name,trl_name,eps", WPO_LOSSES, ids=[f"{n}-{e}" for n, _, e in WPO_LOSSES])
def test_wpo_weighting_equals_trl(name, trl_name, eps):
    """WPO (not with aot, which sorts; TRL 1.16 cannot weight its sft: an in-place product on an expanded tensor).
    TRL's backward fails for hinge (the in-place product on relu's output), so there the gradient is not compared."""
    batch = token_batch(seed=19)
    ours = build(name, ref_policy_kl_penalty=0.2, label_smoothing=eps, use_weighting=True)
    trl = trl_paired(batch, [trl_name], 0.2, eps, use_weighting=True, backward=name != "hinge")
    assert_same(batch, trl, ours_paired(batch, ours))


@pytest.mark.parametrize("options", [{}, {"ld_alpha": 0.6}, {"use_weighting": True, "names": ["sigmoid", "bco_pair", "robust"]},
                                     {"f_divergence_type": "js_divergence", "names": ["sigmoid", "hinge", "sft"]}])
def test_weighted_mixture_equals_trl(options):
    """MPO's recipe and other weighted mixtures (TRL's loss_type list with loss_weights)."""
    options = dict(options)
    names = options.pop("names", ["sigmoid", "bco_pair", "sft"])
    batch = token_batch(seed=23)
    ours = build(names, ref_policy_kl_penalty=0.1, preference_loss_weights=(0.8, 0.2, 1.0), **options)
    _, stats, _ = result = ours_paired(batch, ours)
    assert_same(batch, trl_paired(batch, names, 0.1, loss_weights=[0.8, 0.2, 1.0], **options), result)
    parts = [stats[f"preference_loss_{name}"].item() for name in names]
    assert stats["preference_loss"].item() == pytest.approx(0.8 * parts[0] + 0.2 * parts[1] + parts[2], rel=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_bco_running_mean_is_trls_bco_against_a_shifted_reference(beta):
    """BCO's logit is the reward minus delta = beta u - delta = beta (u - delta / beta): TRL's bco_pair with every
    reference sum moved by delta / beta."""
    batch = token_batch(seed=29)
    ours = build("bco_pair", ref_policy_kl_penalty=beta)
    ours.load_state_dict({"bco_pair": {"mean": 0.37, "count": 3}})
    trl_loss, _, trl_grad = trl_paired(batch, ["bco_pair"], beta, ref_shift=0.37 / beta)
    loss, stats, grad = ours_paired(batch, ours)
    torch.testing.assert_close(loss, trl_loss, **TOLERANCE)
    mask = interleave(batch["inputs"]["completion_mask"][:, 1:].float())
    torch.testing.assert_close(grad * mask, interleave(trl_grad) * mask, **TOLERANCE)
    assert stats["bco_reward_shift"].item() == pytest.approx(0.37)


# ------------------------------------------------------------------ CPO, SimPO, ORPO: their trainers' loss code


def logits_batch(seed: int, vocab: int = 13) -> dict:
    """TRL's chosen/rejected batch (prompt labels -100, right padding) and logits for [chosen; rejected]."""
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.zeros(PAIRS, LENGTH, dtype=torch.long)
        labels = torch.full((PAIRS, LENGTH), -100)
        attention = torch.zeros(PAIRS, LENGTH, dtype=torch.long)
        for pair in range(PAIRS):
            gen_pair = torch.Generator().manual_seed(seed * 1000 + pair)  # the same prompt on both sides
            prompt = int(torch.randint(1, 5, (), generator=gen_pair))
            end = prompt + int(torch.randint(1, LENGTH - prompt + 1, (), generator=gen))
            ids[pair, :end] = torch.randint(1, vocab, (end,), generator=gen)
            ids[pair, :prompt] = torch.randint(1, vocab, (prompt,), generator=gen_pair)
            labels[pair, prompt:end] = ids[pair, prompt:end]
            attention[pair, :end] = 1
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    return {"batch": batch, "logits": 3 * torch.randn(2 * PAIRS, LENGTH, vocab, generator=gen)}


def trl_reference_free(trainer_class, data, **attributes):
    logits = data["logits"].clone().requires_grad_(True)
    trainer = object.__new__(trainer_class)
    trainer.__dict__.update(is_encoder_decoder=False, accelerator=CPU, aux_loss_enabled=False, pad_token_id=0,
                            padding_value=0, **attributes)
    model = lambda *args, **kwargs: SimpleNamespace(logits=logits)  # noqa: E731
    loss, metrics = trainer.get_batch_loss_metrics(model, data["batch"], train_eval="train")
    loss.backward()
    return loss.detach(), {k: float(v) for k, v in metrics.items()}, logits.grad


def ours_reference_free(data, loss):
    """Our loss from the same logits: vocab-parallel log-probs of the next tokens, summed as the loss declares."""
    batch = data["batch"]
    ids = interleave(torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]))
    labels = interleave(torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    logits = interleave(data["logits"]).clone().requires_grad_(True)
    token_log_probs = vocab_parallel_log_probs(logits[:, :-1], ids[:, 1:], logits.shape[-1], None)
    mask = (labels[:, 1:] != -100).float()
    value, stats = loss(sequence_values(loss.policy_values, token_log_probs, mask), None, mask.sum(-1), None)
    value.backward()
    return value.detach(), stats, logits.grad


def assert_same_reference_free(trl_result, ours_result, extra=()):
    trl_loss, metrics, trl_grad = trl_result
    loss, stats, grad = ours_result
    torch.testing.assert_close(loss, trl_loss, **TOLERANCE)
    keys = (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
            ("reward_margin", "rewards/margins"), ("correct", "rewards/accuracies")) + tuple(extra)
    for ours_key, trl_key in keys:
        assert stats[ours_key].double().mean().item() == pytest.approx(metrics[trl_key], rel=1e-6, abs=1e-6), ours_key
    torch.testing.assert_close(grad, interleave(trl_grad), **TOLERANCE)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", (0.0, 0.1))
@pytest.mark.parametrize("cpo_alpha", (0.0, 1.0, 0.5))
def test_cpo_equals_trl(cpo_alpha, eps, beta):
    data = logits_batch(seed=31)
    trl = trl_reference_free(CPOTrainer, data, loss_type="sigmoid", beta=beta, label_smoothing=eps,
                             cpo_alpha=cpo_alpha, simpo_gamma=0.5, alpha=0.0)
    ours = ours_reference_free(data, build("cpo", ref_policy_kl_penalty=beta, label_smoothing=eps,
                                           cpo_alpha=cpo_alpha))
    assert_same_reference_free(trl, ours, [("nll_loss", "nll_loss")] if cpo_alpha else [])


@pytest.mark.parametrize("beta", (0.1, 2.0, 2.5))
@pytest.mark.parametrize("gamma", (0.0, 0.5, 1.6))
@pytest.mark.parametrize("eps", (0.0, 0.1))
def test_simpo_equals_trl(gamma, eps, beta):
    """SimPO is TRL's CPOTrainer with loss_type=simpo and no NLL term (cpo_alpha=0)."""
    data = logits_batch(seed=37)
    trl = trl_reference_free(CPOTrainer, data, loss_type="simpo", beta=beta, label_smoothing=eps, cpo_alpha=0.0,
                             simpo_gamma=gamma, alpha=0.0)
    ours = ours_reference_free(data, build("simpo", ref_policy_kl_penalty=beta, label_smoothing=eps,
                                           simpo_gamma=gamma))
    assert_same_reference_free(trl, ours)
    assert ours[1]["simpo_margin"].mean().item() == pytest.approx(
        trl[1]["rewards/margins"] - gamma, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed", (41, 43))
def test_orpo_equals_trl(seed, beta):
    data = logits_batch(seed=seed)
    trl = trl_reference_free(ORPOTrainer, data, beta=beta)
    ours = ours_reference_free(data, build("orpo", ref_policy_kl_penalty=beta))
    assert_same_reference_free(trl, ours, [("nll_loss", "nll_loss"), ("log_odds_ratio", "log_odds_ratio"),
                                           ("log_odds_chosen", "log_odds_chosen")])


def test_reference_free_losses_ask_for_no_reference():
    for name in ("simpo", "cpo", "orpo"):
        loss = build(name)
        assert not loss.needs_reference and loss.reference_values == ()
    assert build(["sigmoid", "sft"]).needs_reference


# ------------------------------------------------------------------ TR-DPO: the reference's update


@pytest.mark.parametrize("alpha", (0.0, 0.6, 1.0))
def test_trdpo_mixes_the_reference_as_trls_callback(alpha):
    from nemo_dpo.training.reference import ReferenceWeights

    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    reference = ReferenceWeights(policy)  # the weights at construction
    trl_reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    trl_reference.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param))
    reference.mix_in(alpha)
    SyncRefModelCallback._sync_target_model(policy, trl_reference, alpha)
    for ours, theirs in zip(reference.weights, trl_reference.parameters()):
        assert torch.equal(ours, theirs.detach())
