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
        ({"preference_loss": "bco"}, "model.dpo.preference_loss"),
        ({"ref_policy_kl_penalty": 0.0}, "model.dpo.ref_policy_kl_penalty"),
        ({"label_smoothing": 0.5}, "model.dpo.label_smoothing"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PreferenceLossConfig(**kwargs)


# ---------------------------------------------------------------- the loss family's pieces without a TRL oracle

from nemo_dpo.losses import LOSSES, build_loss  # noqa: E402
from nemo_dpo.losses.logprobs import (  # noqa: E402
    chunked_log_probs,
    chunked_log_sum_sq_probs,
    vocab_parallel_log_probs,
    vocab_parallel_log_sum_sq_probs,
)
from nemo_dpo.losses.sequences import (  # noqa: E402
    LOGPS,
    SHARED_LOGPS,
    shared_prefix_mask,
    sequence_values,
    whole_sequence_mask,
)


def build(**kwargs):
    cfg = PreferenceLossConfig(**kwargs)
    return LOSSES[cfg.names[0]](cfg)


def call(loss, policy=POLICY, reference=REF):
    return loss({LOGPS: sums(policy)}, {LOGPS: sums(reference)}, COUNTS, GT)


def test_dpop_penalises_a_chosen_response_below_the_reference():
    """Smaug's DPO-positive: -log sigmoid(beta (h - lambda max(0, l_ref(chosen) - l(chosen))))."""
    beta, lam = 0.5, 3.0
    loss, stats = call(build(ref_policy_kl_penalty=beta, dpop_lambda=lam))
    chosen_policy = [-2.0 - 0.5, -0.2 - 0.4]  # pair 1's chosen is above its reference (-2.7), pair 2's too (-1.0)
    chosen_ref = [-2.0 - 0.7, -0.5 - 0.5]
    penalties = [lam * max(0.0, r - p) for p, r in zip(chosen_policy, chosen_ref)]
    assert penalties == [0.0, 0.0]
    assert loss.item() == pytest.approx(mean([-logsigmoid(beta * m) for m in MARGINS]), rel=1e-6)
    # A policy whose chosen responses fell below the reference pays the penalty inside the sigmoid.
    low = POLICY - 0.3 * MASK  # every response token 0.3 less likely: chosen sums drop by 0.6
    loss, stats = call(build(ref_policy_kl_penalty=beta, dpop_lambda=lam), policy=low)
    penalties = [lam * max(0.0, r - (p - 0.6)) for p, r in zip(chosen_policy, chosen_ref)]
    assert penalties == pytest.approx([3 * 0.4, 3 * 0.2])
    want = mean([-logsigmoid(beta * (m - pen)) for m, pen in zip(MARGINS, penalties)])
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["dpop_penalty"].tolist() == pytest.approx(penalties, abs=1e-5)


def test_bco_running_mean_updates_after_each_step_and_round_trips():
    beta = 0.5
    loss = build(preference_loss="bco_pair", ref_policy_kl_penalty=beta)
    value, stats = call(loss)  # delta = 0 before any step
    want = mean([-logsigmoid(beta * c) - logsigmoid(-beta * r) for c, r in zip(CHOSEN, REJECTED)])
    assert value.item() == pytest.approx(want, rel=1e-6) and stats["bco_reward_shift"].item() == 0
    loss.end_step({"rewards_chosen_mean": 0.4, "rewards_rejected_mean": -0.2})  # step mean 0.1
    loss.end_step({"rewards_chosen_mean": 0.6, "rewards_rejected_mean": 0.2})  # step mean 0.4
    assert loss.state_dict() == {"bco_pair": {"mean": pytest.approx(0.25), "count": 2}}
    value, stats = call(loss)
    want = mean([-logsigmoid(beta * c - 0.25) - logsigmoid(-(beta * r - 0.25)) for c, r in zip(CHOSEN, REJECTED)])
    assert value.item() == pytest.approx(want, rel=1e-6) and stats["bco_reward_shift"].item() == pytest.approx(0.25)
    restored = build(preference_loss=["dpo", "bco_pair"], ref_policy_kl_penalty=beta)
    with pytest.raises(ValueError, match="no state of bco_pair"):
        restored.load_state_dict({})
    restored.load_state_dict(loss.state_dict())
    assert restored.state_dict() == loss.state_dict()
    assert build().state_dict() == {}  # a loss without state saves none


def test_mixture_logs_each_part_and_weights_them():
    loss, stats = call(build(preference_loss=["dpo", "ipo"], preference_loss_weights=(0.25, 2.0),
                             ref_policy_kl_penalty=0.5))
    dpo = mean([-logsigmoid(0.5 * m) for m in MARGINS])
    ipo = mean([(m - 1.0) ** 2 for m in MARGINS])
    assert stats["preference_loss_dpo"].item() == pytest.approx(dpo, rel=1e-6)
    assert stats["preference_loss_ipo"].item() == pytest.approx(ipo, rel=1e-6)
    assert loss.item() == pytest.approx(0.25 * dpo + 2.0 * ipo, rel=1e-6)
    metrics = {s.metric for s in build(preference_loss=["dpo", "ipo"]).statistics}
    assert {"preference_loss_dpo", "preference_loss_ipo"} <= metrics
    assert "preference_loss_dpo" not in {s.metric for s in build().statistics}  # one loss logs what it always did


def test_shared_prefix_and_whole_sequence_masks_are_the_same_packed_and_unpacked():
    """Pair 1: responses of 2 and 2 tokens, pair 2: 2 and 2; then a pair of 3 and 1 tokens."""
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0.0]])
    shared = shared_prefix_mask(mask)
    assert shared.tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert whole_sequence_mask(mask).tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    # The same four sequences packed into one row (last token of each predicts nothing), plus 3 padding tokens.
    lengths = [5, 3, 3, 3]
    packed_mask = torch.cat([mask[i, :n] for i, n in enumerate(lengths)] + [torch.zeros(3)]).unsqueeze(0)
    segment_ids = torch.tensor([[i for i, n in enumerate(lengths) for _ in range(n)] + [0, 0, 0]])
    values = torch.arange(1.0, packed_mask.shape[1] + 1).unsqueeze(0)
    unpacked_values = torch.zeros_like(mask)
    start = 0
    for i, n in enumerate(lengths):
        unpacked_values[i, :n] = values[0, start : start + n]
        start += n
    for fn in (shared_prefix_mask, whole_sequence_mask):
        torch.testing.assert_close(sequence_sums(values, fn(packed_mask, segment_ids, 4), segment_ids, 4),
                                   sequence_sums(unpacked_values, fn(mask)))
    got = sequence_values([LOGPS, SHARED_LOGPS, "sequence_logps", "sequence_tokens"], values, packed_mask,
                          segment_ids, 4)
    assert got["sequence_tokens"].tolist() == [4, 2, 2, 2]  # every token but the last of each sequence


def test_log_sum_sq_probs_whole_and_chunked():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, generator=gen), torch.randn(16, 8, generator=gen)
    logits = hidden @ weight.t()
    want = torch.log((torch.softmax(logits[..., :12], -1) ** 2).sum(-1))  # 4 rows of vocabulary padding
    torch.testing.assert_close(vocab_parallel_log_sum_sq_probs(logits, 12, None), want)
    torch.testing.assert_close(chunked_log_sum_sq_probs(hidden, weight, 12, 3, None), want)


@pytest.mark.parametrize("vocab", [60, 64])  # 60: the last 4 rows of the output weight are vocabulary padding
def test_the_fused_log_softmax_tail_gives_the_eager_values_and_gradients(vocab):
    """chunked_log_probs(fused=True) (the tail compiled, bf16 logits) against the eager tail: log-probs to fp32
    rounding, the gradients to bf16 rounding (each is rounded to bf16 once, from fp32 values that differ by
    rounding), padding rows without probability or gradient; with TP it refuses."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 32, generator=gen).bfloat16()
    weight = (torch.randn(64, 32, generator=gen) * 0.3).bfloat16()
    target, grad_out = torch.randint(0, vocab, (2, 37), generator=gen), torch.randn(2, 37, generator=gen)
    grads = {}
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        log_probs = chunked_log_probs(h, w, target, vocab, 16, None, fused)  # a short last chunk
        log_probs.backward(grad_out)
        grads[fused] = log_probs.detach(), h.grad, w.grad
    (want_lp, want_h, want_w), (got_lp, got_h, got_w) = grads[False], grads[True]
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-6, atol=1e-6)
    assert got_h.dtype == got_w.dtype == torch.bfloat16
    torch.testing.assert_close(got_h, want_h, rtol=2**-7, atol=want_h.abs().max().item() * 2**-7)
    torch.testing.assert_close(got_w, want_w, rtol=2**-7, atol=want_w.abs().max().item() * 2**-7)
    assert not got_w[vocab:].any()  # padding rows: no probability, so no gradient
    with pytest.raises(ValueError, match="tensor parallel size 1"):
        chunked_log_probs(hidden, weight, target, vocab, 16, object(), fused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_log_probs_backward_runs_at_the_output_layers_precision(dtype):
    """The chunked output layer's gradients are the one-shot path's (output layer, then log-probs), whose backward
    takes the logits' gradient in the weight's dtype: the hidden states' gradient, and with it every gradient below
    the output layer, to the last bit in bf16 too; the output weight's up to the rounding of the chunks' sum."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 32, generator=gen).to(dtype)
    weight = (torch.randn(64, 32, generator=gen) * 0.3).to(dtype)
    target, grad_out = torch.randint(0, 60, (2, 37), generator=gen), torch.randn(2, 37, generator=gen)
    grads = {}
    for name, run in (("whole", lambda h, w: vocab_parallel_log_probs(h @ w.t(), target, 60, None)),
                      ("chunked", lambda h, w: chunked_log_probs(h, w, target, 60, 16, None))):  # a short last chunk
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        log_probs = run(h, w)
        log_probs.backward(grad_out)
        grads[name] = log_probs.detach(), h.grad, w.grad
    (want_lp, want_h, want_w), (got_lp, got_h, got_w) = grads["whole"], grads["chunked"]
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-6, atol=1e-6)
    assert got_h.dtype == got_w.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got_h, want_h)
        scale = want_w.abs().max().item()  # each chunk's product is rounded to bf16 before the sum
        torch.testing.assert_close(got_w, want_w, rtol=2**-7, atol=scale * 2**-7)
    else:
        torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preference_loss": ("dpo", "simpo")}, "model.dpo.preference_loss: a list is a mixture of distinct paired"),
        ({"preference_loss": ("dpo", "dpo")}, r"model.dpo.preference_loss must be one of .*, or a non-empty list of distinct such values, got \('dpo', 'dpo'\)"),
        ({"preference_loss": ("dpo", "sft"), "preference_loss_weights": (1.0,)},
         r"model.dpo.preference_loss_weights must be null or 2 numbers >= 0, .* got \(1.0,\)"),
        ({"preference_loss_weights": (-1.0,)}, r"model.dpo.preference_loss_weights must be null or a non-empty list of values, each a finite number >= 0, got \(-1.0,\)"),
        ({"preference_loss": "exo_pair"}, r"model.dpo.label_smoothing must be in \(0, 0.5\) for exo_pair"),
        ({"preference_loss": "orpo", "label_smoothing": 0.1}, r"model.dpo.label_smoothing must be 0 for orpo \(it has none\), got 0.1"),
        ({"f_divergence_type": "kl"}, r"model.dpo.f_divergence_type must be one of \['reverse_kl', .*got 'kl'"),
        ({"f_alpha_divergence_coef": 0.0}, "model.dpo.f_alpha_divergence_coef must be a finite number > 0, got 0.0"),
        ({"ld_alpha": 1.5}, r"model.dpo.ld_alpha must be in \[0, 1\] or null, got 1.5"),
        ({"dpop_lambda": -1.0}, "model.dpo.dpop_lambda must be a finite number >= 0, got -1.0"),
        ({"discopop_tau": 0.0}, "model.dpo.discopop_tau must be a finite number > 0, got 0.0"),
        ({"simpo_gamma": -0.5}, "model.dpo.simpo_gamma must be a finite number >= 0, got -0.5"),
        ({"cpo_alpha": float("nan")}, "model.dpo.cpo_alpha must be a finite number >= 0, got nan"),
        ({"ref_model_mixup_alpha": 1.2}, r"model.dpo.ref_model_mixup_alpha must be in \[0, 1\], got 1.2"),
        ({"ref_model_sync_steps": 0}, "model.dpo.ref_model_sync_steps must be >= 1, got 0"),
        ({"preference_loss": "rpo_sq", "f_divergence_type": "js_divergence"},
         r"model.dpo.f_divergence_type='js_divergence' does not apply to \['rpo_sq'\]"),
        ({"preference_loss": "nca_pair", "dpop_lambda": 1.0}, r"model.dpo.dpop_lambda=1.0 does not apply to \['nca_pair'\]"),
        ({"preference_loss": ("dpo", "aot"), "use_weighting": True},
         r"model.dpo.use_weighting=True does not apply to \['aot'\]"),
        ({"preference_loss": "simpo", "ld_alpha": 0.5}, r"model.dpo.ld_alpha=0.5 does not apply to \['simpo'\]"),
        ({"preference_loss": "cpo", "sync_ref_model": True}, r"model.dpo.sync_ref_model=True does not apply to \['cpo'\]"),
    ],
)
def test_new_settings_name_key_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreferenceLossConfig(**kwargs)


def test_build_loss_reads_the_config_section_with_a_list():
    from omegaconf import OmegaConf

    section = OmegaConf.create({f.name: getattr(PreferenceLossConfig(), f.name)
                                for f in PreferenceLossConfig.__dataclass_fields__.values()})
    section.preference_loss = ["sigmoid", "bco_pair", "sft"]
    section.preference_loss_weights = [0.8, 0.2, 1.0]
    loss = build_loss(section)
    assert loss.names == ("sigmoid", "bco_pair", "sft") and loss.weights == (0.8, 0.2, 1.0)
    section.preference_loss, section.preference_loss_weights = "orpo", None
    assert type(build_loss(section)).__name__ == "ORPO" and not build_loss(section).needs_reference
