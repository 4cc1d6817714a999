"""The compute kernels nemo-dpo puts into megatron's local layer spec, against plain PyTorch math and megatron's own."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dpo.models.activations import SwiGLU
from nemo_dpo.models.attention import SDPAttention, SharedPromptParams


def config():
    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                             attention_dropout=0.0)


def test_swiglu_matches_autograd_of_the_formula_in_double():
    x = torch.randn(3, 5, 2 * 7, dtype=torch.float64, requires_grad=True)
    gate, up = x.detach().chunk(2, dim=-1)
    swiglu = SwiGLU(config())
    assert torch.equal(swiglu(x), F.silu(gate) * up)
    assert torch.autograd.gradcheck(swiglu, (x,))


def naive_causal_attention(q, k, v):
    """[s, heads, dim] -> [s, heads * dim]; k/v heads repeated for grouped queries."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hst,thd->shd", probs, v).reshape(q.shape[0], -1)


def attention():
    return SDPAttention(config(), layer_number=1, attn_mask_type=None, attention_type="self")


def test_sdpa_attention_is_causal_grouped_query_attention():
    torch.manual_seed(0)
    s, b = 6, 2
    q, k, v = torch.randn(s, b, 4, 8), torch.randn(s, b, 2, 8), torch.randn(s, b, 2, 8)
    out = attention()(q, k, v, None)
    assert out.shape == (s, b, 32)
    for row in range(b):
        torch.testing.assert_close(out[:, row], naive_causal_attention(q[:, row], k[:, row], v[:, row]))


def test_packed_sequences_attend_only_within_themselves():
    """Sequences of 3, 4, 4, 4 (one batch of the kernel), 1 and 4 tokens, then 2 of padding: each attends within
    itself, forward and backward."""
    torch.manual_seed(0)
    bounds = [0, 3, 7, 11, 15, 16, 20]
    q, k, v = (torch.randn(22, heads, 8, requires_grad=True) for heads in (4, 2, 2))
    cu = torch.tensor(bounds, dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4)
    out = attention()(q, k, v, None, packed_seq_params=packed)
    assert out.shape == (20, 32)
    want = torch.cat([naive_causal_attention(q[start:end], k[start:end], v[start:end])
                      for start, end in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(out, want)
    upstream = torch.randn(20, 32)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), upstream), torch.autograd.grad(want, (q, k, v), upstream)):
        torch.testing.assert_close(got, expected)


def test_a_shared_prompt_row_attends_as_its_whole_sequences_do():
    """Row: prompt (3), chosen (2), rejected (3), padding (1). The chosen sequence is row[0:5], the rejected one the
    prompt then row[5:8]; each row token gets its first sequence's output, gradients reach the shared prompt from
    both sequences."""
    torch.manual_seed(0)
    index = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8])
    bounds = [0, 5, 11, 12]
    row_index = torch.tensor([0, 1, 2, 3, 4, 8, 9, 10, 11])
    whole_row = torch.tensor([0, 9], dtype=torch.int32)
    params = SharedPromptParams(qkv_format="thd", cu_seqlens_q=whole_row, cu_seqlens_kv=whole_row, max_seqlen_q=9,
                                max_seqlen_kv=9, sequence_index=index, sequence_bounds=bounds, row_index=row_index)
    q, k, v = (torch.randn(9, heads, 8, requires_grad=True) for heads in (4, 2, 2))
    out = attention()(q, k, v, None, packed_seq_params=params)
    want = torch.cat([naive_causal_attention(*(x[index[a:b]] for x in (q, k, v))) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(out, want[row_index])
    upstream = torch.randn(12, 32)
    got = torch.autograd.grad(out, (q, k, v), (upstream.index_add(0, torch.tensor([0, 1, 2]), upstream[5:8]))[row_index])
    expected = torch.autograd.grad(want, (q, k, v), upstream)
    for g, e in zip(got, expected):  # the rejected sequence's prompt queries repeat the chosen's: one gradient
        torch.testing.assert_close(g, e)


def test_a_shared_prompt_rows_output_is_freed_after_the_projection_and_the_gradients_are_unchanged():
    """release_after_projection: the row-order copy of attention's output is freed once the projection read it, and
    gathered again from the kernels' outputs in backward; values and gradients as without it."""
    from megatron.core.transformer.transformer_config import TransformerConfig as Config

    from nemo_dpo.distributed import cpu_compat
    from nemo_dpo.models.attention import release_after_projection

    cpu_compat.apply()  # megatron's checkpointing saves the RNG states; on CPU, torch's own (as training does)
    torch.manual_seed(0)
    params = SharedPromptParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32),
                                cu_seqlens_kv=torch.tensor([0, 9], dtype=torch.int32), max_seqlen_q=9, max_seqlen_kv=9,
                                sequence_index=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8]),
                                sequence_bounds=[0, 5, 11, 12], row_index=torch.tensor([0, 1, 2, 3, 4, 8, 9, 10, 11]))
    q, k, v = (torch.randn(9, heads, 8, requires_grad=True) for heads in (4, 2, 2))
    projection = torch.randn(32, 5, requires_grad=True)

    class SelfAttention(torch.nn.Module):  # megatron's shape: core attention, then the output projection
        def __init__(self):
            super().__init__()
            self.core_attention = attention()

        def forward(self):
            self.kept = self.core_attention(q, k, v, None, packed_seq_params=params)
            return self.kept @ projection, None

    results = []
    for release in (False, True):
        module = SelfAttention()
        if release:
            release_after_projection(module)
        out, _ = module()
        assert (module.kept.untyped_storage().nbytes() == 0) == release  # freed until backward
        out.square().sum().backward()  # megatron's recomputation runs under backward(), not autograd.grad
        results.append((out.detach(), *(x.grad for x in (q, k, v, projection))))
        for x in (q, k, v, projection):
            x.grad = None
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_fused_rmsnorm_and_swiglu_compute_what_the_eager_ones_do_at_any_length():
    """The compiled kernels (models/fusion.py) against PyTorch's eager modules, forward and backward, at two
    sequence lengths (the second reuses or recompiles the kernel), with the norm's parameters unchanged."""
    from nemo_dpo.models.fusion import FusedRMSNorm, FusedSwiGLU

    torch.manual_seed(0)
    eager_norm, fused_norm = torch.nn.RMSNorm(24, eps=1e-5), FusedRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        eager_norm.weight.uniform_(0.5, 1.5)
    fused_norm.load_state_dict(eager_norm.state_dict())
    assert list(fused_norm.state_dict()) == ["weight"]
    for length in (7, 13):
        x = torch.randn(length, 2, 24, requires_grad=True)
        upstream = torch.randn(length, 2, 24)
        want = eager_norm(x)
        want_x, want_w = torch.autograd.grad(want, (x, eager_norm.weight), upstream)
        got = fused_norm(x)
        got_x, got_w = torch.autograd.grad(got, (x, fused_norm.weight), upstream)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)

        h = torch.randn(length, 2, 2 * 10, requires_grad=True)
        upstream = torch.randn(length, 2, 10)
        want = SwiGLU(config())(h)
        got = FusedSwiGLU(config())(h)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(got, h, upstream)[0], torch.autograd.grad(want, h, upstream)[0],
                                   atol=1e-6, rtol=1e-5)


def _rope_cases() -> dict:
    """megatron's SelfAttention and models/fusion.py's FusedRotarySelfAttention with the same weights, on an unpacked
    batch, a packed row whose table has a row per token (its position ids) and one whose table does not (megatron's
    per-sequence mapping): outputs, gradients, and which of them rotated in the compiled kernel."""
    from unittest import mock

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.spec_utils import build_module

    from nemo_dpo.config import load_config
    from nemo_dpo.distributed import cpu_compat
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed
    from nemo_dpo.models import fusion
    from nemo_dpo.models.gpt import _layer_spec, transformer_config

    cpu_compat.apply()
    init_distributed(1, 1, seed=1234)
    try:
        m = load_config("gpt_dpo", ["model.fused_elementwise=true", "model.num_query_groups=2",
                                    "model.qk_layernorm=true"]).model  # q/k norms: RoPE comes after them
        config = transformer_config(m)
        spec = _layer_spec(m, config).submodules.self_attention
        fused = build_module(spec, config=config, layer_number=1)
        plain = SelfAttention(config, spec.submodules, layer_number=1, **spec.params)
        plain.load_state_dict(fused.state_dict())
        table = RotaryEmbedding(config.kv_channels, rotary_percent=1.0)
        row = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 5, 12], dtype=torch.int32),
                              cu_seqlens_kv=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen_q=7, max_seqlen_kv=7)
        positions = torch.tensor([0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9])  # the second continues a shared prompt
        cases = {"unpacked": (torch.randn(12, 2, m.hidden_size), table(12), None),
                 "packed, a row per token": (torch.randn(12, 1, m.hidden_size), table(10).index_select(0, positions), row),
                 "packed, megatron's table": (torch.randn(12, 1, m.hidden_size), table(16), row)}
        results = {}
        for name, (hidden, freqs, packed) in cases.items():
            upstream = torch.randn(hidden.shape)
            outs = {}
            for label, module in (("fused", fused), ("plain", plain)):
                x = hidden.clone().requires_grad_()
                with mock.patch.object(fusion, "compiled", wraps=fusion.compiled) as compiled:
                    out, _ = module(x, None, rotary_pos_emb=freqs, packed_seq_params=packed)
                params = dict(module.named_parameters())
                grads = torch.autograd.grad(out, [x, *params.values()], upstream)
                outs[label] = {"out": out.detach(), "grads": dict(zip(["input", *params], grads)),
                               "compiled": [call.args[0].__name__ for call in compiled.call_args_list]}
            results[name] = outs
        return {"results": results, "class": type(fused).__name__}
    finally:
        destroy_distributed()


def test_seconds_compiling_counts_a_kernels_compiling_and_not_its_later_runs():
    """What the trainer reports as a step's compile time (nemo_dpo/compiled.py): it grows when a function is first
    compiled (forward and backward), not when the compiled kernel runs again at another length."""
    from nemo_dpo.compiled import compiled, seconds_compiling

    def scaled_tanh(x):  # a new function object at every call of the test: never compiled before
        return torch.tanh(x) * 3

    start = seconds_compiling()
    compiled(scaled_tanh)(torch.randn(5, requires_grad=True)).sum().backward()
    after_first = seconds_compiling()
    x = torch.randn(9, requires_grad=True)
    compiled(scaled_tanh)(x).sum().backward()
    assert after_first - start > 0.05
    assert seconds_compiling() == after_first
    torch.testing.assert_close(x.grad, 3 * (1 - torch.tanh(x) ** 2))


def _two_fused_steps(log_dir: str) -> list:
    """What the trainer prints during its first two steps with the fused kernels on."""
    import contextlib
    import io

    from parallel_scenarios import SMALL

    from nemo_dpo.config import load_config
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed
    from nemo_dpo.training.trainer import DPOTrainer

    layout = init_distributed(1, 1, seed=1234)
    try:
        trainer = DPOTrainer(load_config("gpt_dpo", SMALL + [
            "model.fused_elementwise=true", f"model.tokenizer.cache_dir={log_dir}/tok",
            f"exp_manager.explicit_log_dir={log_dir}/run", "exp_manager.create_tensorboard_logger=false"]), layout)
        batch = trainer.cfg.model.global_batch_size
        printed = []
        for step in range(2):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                trainer.train_step(list(range(step * batch, (step + 1) * batch)))
            printed.append(out.getvalue())
        return printed
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_the_trainer_says_how_long_its_first_step_spent_compiling(tmp_path):
    from distributed_harness import run_world

    ((first, second),) = run_world(1, str(tmp_path), _two_fused_steps, str(tmp_path))
    said = re.fullmatch(r"step 1: (\d+\.\d) s of its (\d+\.\d) s compiling fused kernels \(torch.compile, cached on "
                        r"disk for later runs\)\n", first)
    assert said and 0.5 <= float(said[1]) <= float(said[2]), first
    assert second == "", second  # the kernels take any row length: nothing new compiled, nothing said


def test_fused_rope_rotates_as_megatron_does_wherever_it_takes_over(tmp_path):
    """RoPE compiled (model.fused_elementwise) on unpacked rows and on packed rows at their position ids gives
    megatron's attention output and gradients; a table megatron maps sequence by sequence is left to megatron."""
    from distributed_harness import run_world

    (result,) = run_world(1, str(tmp_path), _rope_cases)
    assert result["class"] == "FusedRotarySelfAttention"
    for name, runs in result["results"].items():
        fused, plain = runs["fused"], runs["plain"]
        assert "_rope" not in plain["compiled"]  # (both have the compiled q/k norms)
        assert fused["compiled"].count("_rope") == (name != "packed, megatron's table"), name
        torch.testing.assert_close(fused["out"], plain["out"], atol=1e-6, rtol=1e-5, msg=lambda msg: f"{name}: {msg}")
        for key, want in plain["grads"].items():
            torch.testing.assert_close(fused["grads"][key], want, atol=1e-5, rtol=1e-5,
                                       msg=lambda msg: f"{name}, {key}: {msg}")


def test_fused_elementwise_auto_fuses_from_hidden_size_512():
    from types import SimpleNamespace

    from nemo_dpo.models.fusion import wanted

    assert [wanted(SimpleNamespace(fused_elementwise="auto", hidden_size=h)) for h in (64, 511, 512, 4096)] == [
        False, False, True, True]
    assert wanted(SimpleNamespace(fused_elementwise=True, hidden_size=64))
    assert not wanted(SimpleNamespace(fused_elementwise=False, hidden_size=4096))


def test_the_local_layer_spec_takes_the_fused_modules_as_the_setting_says():
    from types import SimpleNamespace

    from nemo_dpo.config import load_config
    from megatron.core.transformer.attention import SelfAttention

    from nemo_dpo.models.fusion import FusedRotarySelfAttention, FusedSwiGLU
    from nemo_dpo.models.gpt import _layer_spec
    from nemo_dpo.models.norm import FusedTorchNorm, TorchNorm

    swiglu = SimpleNamespace(use_te_activation_func=True)
    for setting, norm, activation, attention in (
        ("true", FusedTorchNorm, FusedSwiGLU, FusedRotarySelfAttention),
        ("false", TorchNorm, SwiGLU, SelfAttention),
        ("auto", TorchNorm, SwiGLU, SelfAttention),  # auto: the default model is hidden 128
        ("true model.context_parallel_size=2", FusedTorchNorm, FusedSwiGLU, SelfAttention),  # CP: megatron's RoPE
        ("true model.position_embedding_type=learned_absolute", FusedTorchNorm, FusedSwiGLU, SelfAttention),
    ):
        overrides = [f"model.fused_elementwise={setting.split()[0]}", *setting.split()[1:], "model.recompute_modules=null"]
        spec = _layer_spec(load_config("gpt_dpo", overrides).model, swiglu).submodules
        assert spec.input_layernorm is norm and spec.pre_mlp_layernorm is norm, setting
        assert spec.mlp.submodules.activation_func is activation, setting
        assert spec.self_attention.module is attention, setting


def test_the_recomputed_swiglu_output_is_freed_after_its_consumer_and_the_gradients_are_unchanged():
    from nemo_dpo.distributed import cpu_compat
    from nemo_dpo.models.activations import _OutputReleasingActivation

    cpu_compat.apply()  # megatron's checkpointing saves the RNG states; on CPU, torch's own (as training does)
    torch.manual_seed(0)
    x, w = torch.randn(6, 2 * 8, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    (F.silu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1] @ w).square().sum().backward()
    want = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None

    activation = _OutputReleasingActivation(SwiGLU(config()))
    hidden = activation(x)
    out = hidden @ w  # the consumer keeps ``hidden`` for w's gradient
    activation.release(out)
    assert hidden.untyped_storage().nbytes() == 0  # released until backward
    out.square().sum().backward()
    torch.testing.assert_close((x.grad, w.grad), want)
    with torch.no_grad():  # no backward coming: nothing is checkpointed, nothing released
        assert activation(x).untyped_storage().nbytes() == 6 * 8 * 4


def test_a_released_norm_output_is_freed_after_its_consumer_and_the_gradients_are_unchanged():
    from nemo_dpo.distributed import cpu_compat
    from nemo_dpo.models.fusion import FusedRMSNorm
    from nemo_dpo.models.norm import OutputReleasedFusedRMSNorm, OutputReleasedLayerNorm, OutputReleasedRMSNorm

    cpu_compat.apply()  # megatron's checkpointing saves the RNG states; on CPU, torch's own (as training does)
    for plain, released in ((torch.nn.RMSNorm, OutputReleasedRMSNorm), (torch.nn.LayerNorm, OutputReleasedLayerNorm),
                            (FusedRMSNorm, OutputReleasedFusedRMSNorm)):
        torch.manual_seed(0)
        x, w = torch.randn(6, 8, requires_grad=True), torch.randn(8, 3, requires_grad=True)
        norm = plain(8)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        (norm(x) @ w).square().sum().backward()
        want = x.grad.clone(), w.grad.clone(), norm.weight.grad.clone()
        x.grad = w.grad = None

        again = released(8)
        again.load_state_dict(norm.state_dict())  # the same parameters under the same names
        hidden = again(x)
        out = hidden @ w  # the consumer keeps ``hidden`` for w's gradient
        again.release(out)
        assert hidden.untyped_storage().nbytes() == 0, plain  # released until backward
        out.square().sum().backward()
        torch.testing.assert_close((x.grad, w.grad, again.weight.grad), want)
        with torch.no_grad():  # no backward coming: nothing checkpointed, nothing to release
            assert again(x).untyped_storage().nbytes() == 6 * 8 * 4 and again.pending is None


def test_recompute_modules_swiglu_puts_the_activation_recomputing_mlp_in_the_spec():
    from types import SimpleNamespace

    from megatron.core.transformer.mlp import MLP

    from nemo_dpo.config import load_config
    from nemo_dpo.models.activations import ActivationRecomputingMLP
    from nemo_dpo.models.gpt import _layer_spec

    swiglu = SimpleNamespace(use_te_activation_func=True)
    for overrides, mlp in ((["model.recompute_modules=[swiglu]"], ActivationRecomputingMLP),
                           ([], ActivationRecomputingMLP),  # model.recompute_modules=auto
                           (["model.recompute_modules=null"], MLP), (["model.recompute_modules=[layernorm]"], MLP),
                           (["model.recompute_modules=[swiglu]", "model.activations_checkpoint_granularity=full"], MLP)):
        assert _layer_spec(load_config("gpt_dpo", overrides).model, swiglu).submodules.mlp.module is mlp, overrides


def test_recompute_modules_auto_names_what_applies_to_the_model():
    from nemo_dpo.config import load_config
    from nemo_dpo.models.gpt import check_recompute, recompute_modules, recompute_settings

    for overrides, want in (([], ["swiglu", "layernorm"]),
                            (["model.activation=gelu", "model.normalization=LayerNorm"], ["layernorm"]),
                            (["model.num_moe_experts=4"], ["layernorm"]),
                            (["model.recompute_modules=null"], []),
                            (["model.recompute_modules=[mlp,layernorm]"], ["mlp", "layernorm"])):
        model_cfg = load_config("gpt_dpo", overrides).model
        assert recompute_modules(model_cfg) == want, overrides
        check_recompute(model_cfg)  # auto never names what the model lacks
    # Megatron gets only its own modules; auto adds none of them to selective.
    auto_selective = load_config("gpt_dpo", ["model.activations_checkpoint_granularity=selective"]).model
    assert recompute_settings(auto_selective) == {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    assert recompute_settings(load_config("gpt_dpo", []).model) == {}


def test_recompute_modules_layernorm_puts_the_norm_recomputing_layer_in_the_spec():
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_layer import TransformerLayer

    from nemo_dpo.config import load_config
    from nemo_dpo.models.gpt import _layer_spec
    from nemo_dpo.models.norm import (FusedTorchNorm, NormRecomputingTransformerLayer, OutputReleasedFusedTorchNorm,
                                      OutputReleasedTorchNorm, TorchNorm)

    swiglu = SimpleNamespace(use_te_activation_func=True)
    for overrides, layer, norm in (
            (["model.recompute_modules=[layernorm]", "model.fused_elementwise=true"], NormRecomputingTransformerLayer,
             OutputReleasedFusedTorchNorm),
            (["model.recompute_modules=[layernorm]"], NormRecomputingTransformerLayer, OutputReleasedTorchNorm),
            (["model.fused_elementwise=true", "model.recompute_modules=null"], TransformerLayer, FusedTorchNorm),
            (["model.fused_elementwise=true"], NormRecomputingTransformerLayer, OutputReleasedFusedTorchNorm),  # auto
            (["model.recompute_modules=[layernorm]", "model.activations_checkpoint_granularity=full"],
             TransformerLayer, TorchNorm)):
        spec = _layer_spec(load_config("gpt_dpo", [*overrides, "model.qk_layernorm=true"]).model, swiglu)
        assert spec.module is layer and spec.submodules.input_layernorm is norm, overrides
        assert spec.submodules.pre_mlp_layernorm is norm, overrides
        fused = "model.fused_elementwise=true" in overrides  # q/k norms are read inside attention: never released
        assert spec.submodules.self_attention.submodules.q_layernorm is (FusedTorchNorm if fused else TorchNorm)
