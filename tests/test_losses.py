"""Preference losses against values computed by hand (plain floats, from the papers' formulas)."""

import math

import pytest
import torch

from nemo_dpo.losses.preference import PreferenceLossConfig, per_sequence, preference_loss, sequence_sums

# Two pairs, rows interleaved (chosen, rejected, chosen, rejected), 3 token positions.
POLICY = torch.tensor(
    [
        [-1.0, -2.0, -0.5],
        [-1.5, -1.0, -3.0],
        [-0.2, -0.4, -9.0],
        [-0.3, -0.1, -9.0],
    ]
)
REF = torch.tensor(
    [
        [-1.2, -2.0, -0.7],
        [-1.0, -1.1, -2.0],
        [-0.5, -0.5, -9.0],
        [-0.1, -0.2, -9.0],
    ]
)
MASK = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
GT = torch.tensor([1.0, 0.0, 0.8, 0.3])

# Response log-ratios log pi - log pi_ref, summed over masked tokens, by hand:
# pair 1: chosen (-2.0+2.0) + (-0.5+0.7) = 0.2 ; rejected (-1.0+1.1) + (-3.0+2.0) = -0.9
# pair 2: chosen (-0.2+0.5) + (-0.4+0.5) = 0.4 ; rejected (-0.3+0.1) + (-0.1+0.2) = -0.1
CHOSEN, REJECTED = [0.2, 0.4], [-0.9, -0.1]
MARGINS = [c - r for c, r in zip(CHOSEN, REJECTED)]  # 1.1, 0.5
GT_MARGINS = [1.0 - 0.0, 0.8 - 0.3]


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


def mean(xs):
    return sum(xs) / len(xs)


COUNTS = MASK.sum(-1)


def sums(values):
    return sequence_sums(values, MASK)


def run(**kwargs):
    loss, stats = preference_loss(PreferenceLossConfig(**kwargs), sums(POLICY), sums(REF), COUNTS, GT)
    return loss.item(), stats


def test_dpo():
    beta = 0.5
    loss, stats = run(preference_loss="dpo", ref_policy_kl_penalty=beta)
    assert loss == pytest.approx(mean([-logsigmoid(beta * m) for m in MARGINS]), rel=1e-6)
    assert stats["rewards_chosen"].tolist() == pytest.approx([beta * c for c in CHOSEN], rel=1e-6)
    assert stats["rewards_rejected"].tolist() == pytest.approx([beta * r for r in REJECTED], rel=1e-6)


def test_dpo_label_smoothing():
    beta, eps = 0.5, 0.2
    loss, _ = run(preference_loss="dpo", ref_policy_kl_penalty=beta, label_smoothing=eps)
    want = mean([-(1 - eps) * logsigmoid(beta * m) - eps * logsigmoid(-beta * m) for m in MARGINS])
    assert loss == pytest.approx(want, rel=1e-6)


def test_ipo():
    beta = 0.25
    loss, _ = run(preference_loss="ipo", ref_policy_kl_penalty=beta)
    assert loss == pytest.approx(mean([(m - 1 / (2 * beta)) ** 2 for m in MARGINS]), rel=1e-6)


def _bernoulli_kl(p_logit, q_logit):
    """KL(Bern(sigmoid(p)) || Bern(sigmoid(q)))."""
    p, q = 1 / (1 + math.exp(-p_logit)), 1 / (1 + math.exp(-q_logit))
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


@pytest.mark.parametrize("name", ["rpo_fwd_kl", "rpo_bwd_kl"])
def test_rpo_kl(name):
    beta, scale = 0.5, 2.0
    loss, _ = run(preference_loss=name, ref_policy_kl_penalty=beta, gt_reward_scale=scale)
    terms = []
    for m, g in zip(MARGINS, GT_MARGINS):
        model, truth = beta * m, scale * g
        terms.append(_bernoulli_kl(model, truth) if name == "rpo_fwd_kl" else _bernoulli_kl(truth, model))
    assert loss == pytest.approx(mean(terms), rel=1e-5)


def test_rpo_sq():
    beta, scale = 0.5, 2.0
    loss, _ = run(preference_loss="rpo_sq", ref_policy_kl_penalty=beta, gt_reward_scale=scale)
    assert loss == pytest.approx(mean([(beta * m - scale * g) ** 2 for m, g in zip(MARGINS, GT_MARGINS)]), rel=1e-6)


def test_average_log_probs_and_sft():
    beta = 0.5
    loss, stats = run(
        preference_loss="dpo",
        ref_policy_kl_penalty=beta,
        preference_average_log_probs=True,
        sft_loss_weight=0.3,
        preference_loss_weight=2.0,
        sft_average_log_probs=False,
    )
    margins = [m / 2 for m in MARGINS]  # every response has 2 masked tokens
    pref = mean([-logsigmoid(beta * m) for m in margins])
    sft = -mean([-2.0 - 0.5, -0.2 - 0.4])  # chosen responses' summed log-probs
    assert stats["preference_loss"].item() == pytest.approx(pref, rel=1e-6)
    assert stats["sft_loss"].item() == pytest.approx(sft, rel=1e-6)
    assert loss == pytest.approx(2.0 * pref + 0.3 * sft, rel=1e-6)
    _, stats = run(sft_loss_weight=1.0, sft_average_log_probs=True)
    assert stats["sft_loss"].item() == pytest.approx(-mean([-1.25, -0.3]), rel=1e-6)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    loss, stats = preference_loss(PreferenceLossConfig(), sums(POLICY), sums(POLICY), COUNTS, GT)
    assert loss.item() == torch.tensor(math.log(2)).item()  # ln 2, exactly, in fp32
    assert stats["rewards_chosen"].abs().max().item() == 0
    assert stats["rewards_rejected"].abs().max().item() == 0


def test_gradient_reaches_only_response_tokens():
    policy = POLICY.clone().requires_grad_(True)
    loss, _ = preference_loss(PreferenceLossConfig(), sums(policy), sums(REF), COUNTS, GT)
    loss.backward()
    assert (policy.grad[MASK == 0] == 0).all()
    assert (policy.grad[MASK == 1] != 0).all()


def test_average_guards_empty_responses():
    assert per_sequence(sequence_sums(POLICY, torch.zeros_like(MASK)), torch.zeros(4), average=True).tolist() == [0.0] * 4


def test_packed_rows_sum_by_segment():
    """Two packed rows holding the same four sequences as the unpacked batch give the same sums."""
    mask = MASK.reshape(2, 6)  # row 0: sequences 0 and 1; row 1: sequences 2 and 3
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]])
    values = POLICY.reshape(2, 6)
    torch.testing.assert_close(sequence_sums(values, mask, segment_ids, num_sequences=4), sums(POLICY))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"preference_loss": "kto"}, "model.dpo.preference_loss"),
        ({"ref_policy_kl_penalty": 0.0}, "model.dpo.ref_policy_kl_penalty"),
        ({"label_smoothing": 0.5}, "model.dpo.label_smoothing"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PreferenceLossConfig(**kwargs)
