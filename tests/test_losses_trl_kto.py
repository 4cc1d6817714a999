"""KTO equals TRL's own KTOTrainer loss code on the same inputs (TRL 1.16's code is the oracle, not a transcription).

TRL computes KTO inside ``KTOTrainer._compute_loss``, from per-token log-probs
its models' fused LM head returns: here stand-in models return given per-token
log-probs of the completions and of the KL completions (policy and reference), on
a padded batch of random prompt and completion lengths and random labels. Ours
runs the KL estimate's own code (training/kl_estimate.py) on the same values laid
out as our items (completion, KL completion), then the loss. Loss, gradient,
the KL estimate and every per-side metric TRL logs must agree within 1e-6, over
several betas and desirable/undesirable weights, and with a batch of one side only.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from nemo_dpo.data.batching import Microbatch
from nemo_dpo.losses import build_loss
from nemo_dpo.losses.sequences import LOGPS, sequence_values
from nemo_dpo.losses.statistics import local_sums
from nemo_dpo.training.kl_estimate import KLEstimate

EXAMPLES, LENGTH = 8, 14
BETAS = (0.05, 0.1, 0.5, 2.0)
WEIGHTS = ((1.0, 1.0), (1.33, 1.0), (1.0, 0.6), (0.5, 2.0))
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def example_batch(seed: int, labels=None) -> dict:
    """TRL's padded KTO batch: completions and KL completions (random lengths), labels, and per-token log-probs of
    policy and reference on their completion tokens (zero elsewhere, as TRL's fused head gives them)."""
    gen = torch.Generator().manual_seed(seed)

    def masks():
        completion = torch.zeros(EXAMPLES, LENGTH, dtype=torch.long)
        for row in range(EXAMPLES):
            prompt = int(torch.randint(1, 4, (), generator=gen))
            end = prompt + int(torch.randint(1, LENGTH - prompt + 1, (), generator=gen))
            completion[row, prompt:end] = 1
        attention = (completion.cumsum(1) < completion.sum(1, keepdim=True)) | (completion == 1)
        return completion, attention.long()

    def per_token(mask, low=0.05, high=2.5):
        return -(low + (high - low) * torch.rand(EXAMPLES, LENGTH - 1, generator=gen)) * mask[:, 1:].float()

    completion, attention = masks()
    kl_completion, kl_attention = masks()
    if labels is None:
        labels = torch.rand(EXAMPLES, generator=gen) < 0.5
        labels[:2] = torch.tensor([True, False])  # both sides
    return {
        "inputs": {"input_ids": torch.randint(3, 50, (EXAMPLES, LENGTH), generator=gen), "attention_mask": attention,
                   "completion_mask": completion, "KL_input_ids": torch.randint(3, 50, (EXAMPLES, LENGTH), generator=gen),
                   "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion, "label": labels},
        "policy": per_token(completion), "reference": per_token(completion),
        # The policy a little above the reference on the KL completions: a positive estimate, not clamped to 0
        "policy_kl": per_token(kl_completion, high=2.0), "reference_kl": per_token(kl_completion),
    }


class FusedHead:
    """A stand-in model whose fused LM head returns the given per-token log-probs: the KL completions' for the KL
    input ids, the completions' otherwise."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, log_probs, kl_log_probs, kl_input_ids):
        self.log_probs, self.kl_log_probs, self.kl_input_ids = log_probs, kl_log_probs, kl_input_ids

    def __call__(self, input_ids=None, labels=None, fused_lm_head=False, **inputs):
        log_probs = self.kl_log_probs if input_ids is self.kl_input_ids else self.log_probs
        zeros = torch.zeros_like(log_probs).detach()
        return FusedCausalLMOutput(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_kto(batch, beta, desirable_weight, undesirable_weight):
    """TRL's loss, its logged metrics and the gradient of the loss w.r.t. the policy's per-token log-probs."""
    policy = batch["policy"].clone().requires_grad_(True)
    kl_ids = batch["inputs"]["KL_input_ids"]
    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(
        model=FusedHead(policy, batch["policy_kl"], kl_ids), ref_model=FusedHead(batch["reference"],
                                                                                 batch["reference_kl"], kl_ids),
        accelerator=CPU, aux_loss_enabled=False, precompute_ref_logps=False, calculate_KL=True, loss_type="kto",
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    loss = KTOTrainer._compute_loss(trainer, trainer.model, dict(batch["inputs"]), return_outputs=False)
    loss.backward()
    return loss.detach(), {k: v[0] for k, v in trainer._metrics["train"].items()}, policy.grad


def items(rows, kl_rows):
    """Our layout: each example's completion next to its KL completion."""
    return torch.stack([rows, kl_rows], 1).flatten(0, 1)


def ours_kto(batch, beta, desirable_weight, undesirable_weight):
    """Our KL estimate and loss on the same values; the loss, its metrics (reduced as the step reduces them) and the
    gradient w.r.t. the completions' per-token log-probs."""
    cfg = SimpleNamespace(preference_loss="kto", ref_policy_kl_penalty=beta, desirable_weight=desirable_weight,
                          undesirable_weight=undesirable_weight)
    loss = build_loss({**_defaults(), **vars(cfg)})
    inputs = batch["inputs"]
    mask = items(inputs["completion_mask"][:, 1:], inputs["KL_completion_mask"][:, 1:]).float()
    labels = inputs["label"].float().repeat_interleave(2)
    mb = Microbatch(tokens=mask.long(), labels=mask.long(), loss_mask=mask, position_ids=mask.long(),
                    gt_rewards=labels)
    mb.reference = sequence_values((LOGPS,), items(batch["reference"], batch["reference_kl"]), mask)
    layout = SimpleNamespace(is_last_stage=True, dp_group=None, cp_group=None, device=torch.device("cpu"))
    policy = batch["policy"].clone().requires_grad_(True)
    policy_tokens = items(policy, batch["policy_kl"])
    KLEstimate(loss, lambda microbatches: [policy_tokens.detach()], layout).attach([mb])
    value, stats = loss(sequence_values((LOGPS,), policy_tokens, mask), mb.reference, mask.sum(-1), labels)
    value.backward()
    sums, counts = local_sums(loss.statistics, [stats]).tolist()
    metrics = {stat.metric: total / count for stat, total, count in zip(loss.statistics, sums, counts) if count}
    return value.detach(), metrics, policy.grad


def _defaults() -> dict:
    from nemo_dpo.config import load_config

    return dict(load_config("gpt_dpo", []).model.dpo)


METRICS = {"rewards_chosen_mean": "rewards/chosen", "rewards_rejected_mean": "rewards/rejected",
           "logps_chosen_mean": "logps/chosen", "logps_rejected_mean": "logps/rejected", "kl": "kl"}


def assert_same(batch, trl_result, ours_result):
    trl_loss, trl_metrics, trl_grad = trl_result
    loss, metrics, grad = ours_result
    torch.testing.assert_close(loss, trl_loss, **TOLERANCE)
    for ours_key, trl_key in METRICS.items():
        assert (ours_key in metrics) == (trl_key in trl_metrics), ours_key
        if ours_key in metrics:
            assert metrics[ours_key] == pytest.approx(trl_metrics[trl_key], rel=1e-6, abs=1e-6), ours_key
    # TRL sums every position, its fused head gives the gradient to completion tokens only: compare those
    mask = batch["inputs"]["completion_mask"][:, 1:].float()
    torch.testing.assert_close(grad * mask, trl_grad * mask, **TOLERANCE)


@pytest.mark.parametrize("weights", WEIGHTS, ids=[f"{d}-{u}" for d, u in WEIGHTS])
@pytest.mark.parametrize("beta", BETAS)
def test_kto_equals_trls_ktotrainer(beta, weights):
    batch = example_batch(seed=10 * BETAS.index(beta) + WEIGHTS.index(weights))
    result = ours_kto(batch, beta, *weights)
    assert result[1]["kl"] > 0  # the estimate is used, not clamped away
    assert_same(batch, trl_kto(batch, beta, *weights), result)


@pytest.mark.parametrize("desirable", (True, False))
def test_a_batch_of_one_side(desirable):
    """TRL leaves out the metrics of a side the batch lacks; so does the step."""
    batch = example_batch(seed=3, labels=torch.full((EXAMPLES,), desirable))
    assert_same(batch, trl_kto(batch, 0.1, 1.2, 0.8), ours_kto(batch, 0.1, 1.2, 0.8))


def test_a_negative_estimate_is_clamped_to_zero():
    """z0 = max(0, mean KL log-ratio), as TRL clamps it: a policy below the reference on the KL completions."""
    batch = example_batch(seed=5)
    batch["policy_kl"] = batch["reference_kl"] * 1.5  # log-probs are negative: policy below the reference
    result = ours_kto(batch, 0.1, 1.0, 1.0)
    assert result[1]["kl"] == 0.0
    assert_same(batch, trl_kto(batch, 0.1, 1.0, 1.0), result)
