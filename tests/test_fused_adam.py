"""The optimizer's fused torch Adam steps as torch's per-parameter AdamW did (training/optimizer.py).

One process (a world of one, gloo): a small GPT wrapped in megatron DDP gets
random gradients, large enough to be clipped, in its gradient buffers, and five
optimizer steps are taken with the optimizer nemo-dpo builds. They must match,
to fp32 rounding, (a) ``torch.optim.AdamW`` in its default (per-parameter) form
over copies of the same parameters with the same gradients, groups and clipping,
and (b) the same megatron optimizer with the fused flag taken away (the step as
it was before), for fp32, the distributed optimizer, bf16 with fp32 master
weights (compared on the masters) and Adam with L2 weight decay.
"""

import pytest
import torch

from distributed_harness import run_world

STEPS = 5
LR = 1e-2
TOLERANCE = {"rtol": 2e-6, "atol": 1e-8}  # a few fp32 ulps: the fused kernel rounds its arithmetic in another order


def _build(overrides: list):
    from nemo_dpo.config import load_config
    from nemo_dpo.models.gpt import build_model_chunks, transformer_config
    from nemo_dpo.models.init_weights import init_weights
    from nemo_dpo.training.optimizer import build_optimizer, build_scheduler, wrap_ddp

    cfg = load_config("gpt_dpo", ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
                                  "model.num_attention_heads=4", "model.bias=true", "model.vocab_size=128",
                                  f"model.optim.lr={LR}", *overrides])
    m = cfg.model
    precision = cfg.trainer.precision
    config = transformer_config(m, precision)
    chunks = build_model_chunks(m, m.vocab_size, config)
    for chunk in chunks:
        init_weights(chunk, config, m.seed)
    if config.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    model = wrap_ddp(chunks, config, m.optim)
    optimizer = build_optimizer(model, m.optim, cfg.trainer.gradient_clip_val, config.bf16)
    return model, optimizer, build_scheduler(optimizer, m.optim, STEPS)


def _gradients(model, step: int) -> list:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=generator) * 3 for p in model[0].module.parameters()]


def _set_gradients(model, grads: list) -> None:
    model[0].zero_grad_buffer()
    for param, grad in zip(model[0].module.parameters(), grads):
        param.main_grad.copy_(grad)


def _weights(model) -> list:
    return [p.detach().clone() for p in model[0].module.parameters()]


def _masters(optimizer) -> list:
    """The fp32 parameters the optimizer steps (bf16's master weights, the distributed optimizer's shards)."""
    return [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]


VARIANTS = {"fp32": [], "distributed": ["model.optim.use_distributed_optimizer=true"],
            "bf16": ["trainer.precision=bf16"], "adam": ["model.optim.name=adam"]}


def _with_and_without_fusion() -> dict:
    """{variant: {fused: the optimizer's fp32 parameters after each step, and its flags}}: nemo-dpo's optimizer, and
    the same optimizer with the fused flag taken away."""
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=1234)
    try:
        runs = {}
        for name, overrides in VARIANTS.items():
            runs[name] = {}
            for fused in (True, False):
                model, optimizer, scheduler = _build(overrides)
                groups = optimizer.param_groups
                flags = {(g["fused"], g["foreach"]) for g in groups}
                if not fused:
                    for group in groups:
                        group.update(fused=None, foreach=None)  # torch's default: per parameter on CPU
                weights = []
                for step in range(STEPS):
                    _set_gradients(model, _gradients(model, step))
                    scheduler.step(1)  # as training does: the step's learning rate, each group's weight decay
                    success, grad_norm, _ = optimizer.step()
                    assert success and grad_norm > 1.0  # clipped
                    weights.append(_masters(optimizer))
                runs[name][fused] = {"weights": weights, "flags": flags}
        return runs
    finally:
        destroy_distributed()


def _against_torch_adamw() -> dict:
    """Weights after each step of nemo-dpo's optimizer, and of torch's AdamW on copies of the parameters."""
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=1234)
    try:
        model, optimizer, scheduler = _build([])
        params = list(model[0].module.parameters())
        copies = {p: p.detach().clone() for p in params}
        reference = torch.optim.AdamW([{"params": [copies[p] for p in group["params"]], "betas": group["betas"],
                                         "eps": group["eps"]} for group in optimizer.param_groups])
        ours, theirs = [], []
        for step in range(STEPS):
            grads = _gradients(model, step)
            _set_gradients(model, grads)
            scheduler.step(1)
            optimizer.step()
            for group, own in zip(optimizer.param_groups, reference.param_groups):
                own.update(lr=group["lr"], weight_decay=group["weight_decay"])
            # megatron's clipping: the norm of the per-tensor norms, and a coefficient of max_norm / (norm + 1e-6)
            norm = torch.norm(torch.stack([g.norm() for g in grads])).item()
            coefficient = 1.0 / (norm + 1e-6)
            for param, grad in zip(params, grads):
                copies[param].grad = grad * coefficient if coefficient < 1.0 else grad
            reference.step()
            ours.append(_weights(model))
            theirs.append([copies[p].clone() for p in params])
        return {"ours": ours, "theirs": theirs, "decays": sorted(g["weight_decay"] for g in reference.param_groups)}
    finally:
        destroy_distributed()


def test_the_step_is_torch_adamw_on_the_same_parameters_and_gradients(tmp_path):
    (result,) = run_world(1, str(tmp_path), _against_torch_adamw)
    assert result["decays"] == [0.0, 0.01]  # biases and norms undecayed, the rest decayed
    for step, (ours, theirs) in enumerate(zip(result["ours"], result["theirs"])):
        for index, (got, want) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"step {step + 1} param {index}: {m}")


@pytest.fixture(scope="module")
def fused_and_unfused(tmp_path_factory):
    (runs,) = run_world(1, str(tmp_path_factory.mktemp("fused_adam")), _with_and_without_fusion)
    return runs


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_fused_step_is_the_per_parameter_step(fused_and_unfused, variant):
    runs = fused_and_unfused[variant]
    assert runs[True]["flags"] == {(True, False)}
    for step, (fused, unfused) in enumerate(zip(runs[True]["weights"], runs[False]["weights"])):
        assert {w.dtype for w in fused} == {torch.float32}
        for index, (got, want) in enumerate(zip(fused, unfused)):
            torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"step {step + 1} param {index}: {m}")
