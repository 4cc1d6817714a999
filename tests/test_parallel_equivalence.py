"""TP=2, PP=2, DP=2 and CP=2 (2 real processes each, gloo), and TP=2 x CP=2 (4), reproduce TP=PP=DP=CP=1 exactly.

From the same seed (layout-independent init) and the same global batch, one
optimizer step must give the same loss and every logged statistic (rel 1e-5), the
same gradients and the same updated weights (abs 1e-5) at every layout, for
several architectures and every loss (each of TRL's paired losses inside a
weighted mixture, the options, the reference-free losses, TR-DPO's moved
reference, BCO's state after the step, KTO's KL estimate over microbatches and
DP ranks, online, precomputed and packed); and the global batch split into 1, 2 or
4 microbatches must give the same gradients. Sequence parallelism at TP=2 and
the interleaved schedule at PP=2 (two model chunks per rank) change nothing
either. Layouts of one world size share a launch: megatron's groups are rebuilt
on the same processes.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from distributed_harness import run_world
from nemo_dpo.models.sharding import tp_slice
from parallel_scenarios import AUTO_VARIANTS, LOSS_VARIANTS, VARIANTS, layout_steps

pytestmark = pytest.mark.slow  # real multi-process runs

ALL_VARIANTS = [name for name in VARIANTS if "_sp" not in name]  # sequence parallelism needs TP > 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("equivalence")


@pytest.fixture(scope="module")
def baseline(workdir):
    """Every variant at TP=PP=DP=1, in one process."""
    cache = str(workdir / "tokenizers")
    plan = {"base": ({}, ALL_VARIANTS)}
    (result,) = run_world(1, str(workdir / "base"), layout_steps, plan, str(workdir / "base_logs"), cache)
    return result["base"]


def assert_same_metrics(got: dict, want: dict, what) -> None:
    """Every logged metric but the timings, rel 1e-5; the loss's own statistics (some, like ORPO's log odds ratio, a
    small difference of large terms) to abs 1e-6 rather than 1e-7."""
    assert set(got) == set(want), what
    for key in [k for k in want if not k.startswith("time_") and k != "tokens_per_sec"]:
        absolute = 1e-7 if key in ("loss", "preference_loss", "sft_loss", "reward_margin", "grad_norm") else 1e-6
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=absolute), f"{what}: {key} {got[key]} != {want[key]}"


def _expected(base_tensor, rank_result, name):
    attrs = SimpleNamespace(**rank_result["attrs"][name])
    return tp_slice(base_tensor, attrs, rank_result["tp_rank"], rank_result["tp"])


def assert_same_step(base: dict, ranks: list, variant: str, base_variant: str = None):
    """Every rank's step of ``variant`` is the baseline's step of ``base_variant`` (the same variant by default)."""
    for rank, result in enumerate(ranks):
        got, want = result[variant], base[base_variant or variant]
        assert_same_metrics(got["metrics"], want["metrics"], f"{variant} rank {rank}")
        assert got["loss_state"].keys() == want["loss_state"].keys()
        for name, state in want["loss_state"].items():  # BCO's running mean after the step
            assert got["loss_state"][name] == pytest.approx(state, rel=1e-5, abs=1e-7), (variant, name)
        assert got["reference_source"] == want["reference_source"]
        assert set(got["weights"]) <= set(want["weights"]) and set(got["reference"]) <= set(want["reference"])
        for kind in ("weights", "reference"):
            for name, weight in got[kind].items():
                torch.testing.assert_close(
                    weight, _expected(want[kind][name], got, name), atol=1e-5, rtol=0,
                    msg=lambda m: f"{variant} rank {rank} {kind} {name}: {m}",
                )
        for name, grad in got["grads"].items():
            torch.testing.assert_close(
                grad, _expected(want["grads"][name], got, name), atol=1e-6, rtol=1e-4,
                msg=lambda m: f"{variant} rank {rank} grad {name}: {m}",
            )


def _launch(workdir, tag: str, plan: dict, world_size: int = 2) -> dict:
    """``{layout name: [rank results]}`` of one launch running every layout of ``plan`` in turn."""
    cache = str(workdir / "tokenizers")
    ranks = run_world(world_size, str(workdir / tag), layout_steps, plan, str(workdir / f"{tag}_logs"), cache)
    return {name: [result[name] for result in ranks] for name in plan}


def test_microbatch_split_gives_same_gradients(baseline):
    assert baseline["llama_dpo"]["metrics"]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    for variant in ("llama_dpo_1mb", "llama_dpo_2mb"):
        got, want = baseline[variant], baseline["llama_dpo"]
        assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=1e-6)
        for name, grad in got["grads"].items():
            torch.testing.assert_close(grad, want["grads"][name], atol=1e-6, rtol=1e-4)


def test_lora_starts_at_ln2_and_leaves_the_base_alone(baseline):
    lora = baseline["lora"]
    assert lora["metrics"]["loss"] == torch.tensor(math.log(2)).item()  # B = 0: policy == reference
    assert lora["frozen_before_step"] and set(lora["grads"]) == {n for n in lora["weights"] if "_lora." in n}
    for name, before in lora["frozen_before_step"].items():
        assert torch.equal(lora["weights"][name], before), name  # bitwise unchanged
    assert any(not torch.equal(lora["weights"][n], torch.zeros_like(lora["weights"][n])) for n in lora["grads"] if n.endswith("lora_b"))


def test_chunked_log_probs_and_recomputation_give_the_same_step(baseline):
    """Log-probs in chunks, activations recomputed in backward, and packed rows (with each pair's prompt once, and
    without) change nothing: loss, gradients, weights."""
    for chunked, whole in (
        ("llama_dpo_chunked", "llama_dpo"),
        ("gpt2_ipo_sft_chunked", "gpt2_ipo_sft"),
        ("llama_dpo_recompute_full", "llama_dpo"),
        ("llama_dpo_recompute_selective", "llama_dpo"),
        ("llama_dpo_recompute_elementwise", "llama_dpo"),
        ("llama_dpo_recompute_mlp", "llama_dpo"),
        ("lora_recompute_elementwise", "lora"),
        ("llama_dpo_packed", "llama_dpo"),
        ("llama_dpo_packed_unshared", "llama_dpo"),
        ("gpt2_ipo_sft_packed", "gpt2_ipo_sft"),
    ):
        assert baseline[chunked]["shared_prompts"] == chunked.endswith("_packed"), chunked
        got, want = baseline[chunked], baseline[whole]
        for key in ("loss", "preference_loss", "sft_loss", "reward_margin", "grad_norm"):
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5, abs=1e-7), key
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-5)
        for name, weight in want["weights"].items():
            torch.testing.assert_close(got["weights"][name], weight, atol=1e-5, rtol=0)


def test_loss_family_steps_at_one_process(baseline):
    """What the layouts are compared with: the losses ran, the reference-free ones without any reference, BCO's
    state moved, TR-DPO's reference moved halfway to the stepped policy; packed rows and chunked log-probs give
    the per-sequence values of the plain rows (LD-DPO's shared lengths, WPO's weights, ORPO's whole sequences)."""
    for name in LOSS_VARIANTS:
        assert math.isfinite(baseline[name]["metrics"]["loss"]), name
    for name in ("simpo", "cpo", "orpo"):  # no copy of the weights, no reference pass
        assert baseline[name]["reference_source"] == "ReferenceFree" and baseline[name]["reference_copies"] == 0
        assert baseline[name]["metrics"]["time_reference"] == 0.0
    assert baseline["paired_a"]["reference_source"] == "OnlineReference" and baseline["paired_a"]["reference_copies"] == 1
    state = baseline["paired_a"]["loss_state"]["bco_pair"]
    metrics = baseline["paired_a"]["metrics"]
    assert state == {"mean": pytest.approx((metrics["rewards_chosen_mean"] + metrics["rewards_rejected_mean"]) / 2),
                     "count": 1}
    assert set(metrics) >= {"preference_loss_bco_pair", "bco_reward_shift", "preference_loss_sppo_hard"}
    assert {"dpop_penalty", "wpo_weight"} <= set(baseline["options"]["metrics"])
    trdpo = baseline["trdpo"]
    assert trdpo["reference"].keys() == trdpo["weights"].keys() == trdpo["reference_before"].keys()
    for name, moved in trdpo["reference"].items():
        torch.testing.assert_close(moved, 0.5 * trdpo["weights"][name] + 0.5 * trdpo["reference_before"][name])
    assert any(not torch.equal(trdpo["reference_before"][n], trdpo["weights"][n]) for n in trdpo["weights"])
    kto = baseline["kto"]["metrics"]
    assert kto["kl"] > 0.1 and 0 < kto["desirable_fraction"] < 1  # a KL estimate, and both sides in the batch
    assert {"rewards_chosen_mean", "rewards_rejected_mean", "logps_chosen_mean", "logps_rejected_mean"} <= set(kto)
    for packed, plain in (("options_packed_chunked", "options"), ("orpo_packed_chunked", "orpo"),
                          ("kto_packed_chunked", "kto"), ("kto_precomputed", "kto")):
        got, want = baseline[packed], baseline[plain]
        assert_same_metrics(got["metrics"], want["metrics"], packed)
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-5)


def test_bf16_with_fp32_master_weights_tracks_fp32(baseline):
    want = baseline["llama_dpo"]
    assert [baseline[v]["fused_log_probs"] for v in ("llama_dpo_bf16_chunked", "llama_dpo_bf16_chunked_fused")] == [
        False, True]  # the log-softmax tail compiled (and RMSNorm, SwiGLU, RoPE)
    for variant in ("llama_dpo_bf16", "llama_dpo_bf16_chunked", "llama_dpo_bf16_chunked_fused"):
        got = baseline[variant]
        assert {w.dtype for w in got["weights"].values()} == {torch.bfloat16}
        assert got["main_param_dtypes"] == {torch.float32}  # the optimizer steps fp32 master weights
        assert {g.dtype for g in got["grads"].values()} == {torch.float32}  # reduced in fp32
        assert got["metrics"]["loss"] == want["metrics"]["loss"]  # ln 2 exactly: policy == reference
        assert got["metrics"]["grad_norm"] == pytest.approx(want["metrics"]["grad_norm"], rel=2e-2)
        for name, weight in want["weights"].items():
            torch.testing.assert_close(got["weights"][name].float(), weight, atol=2e-2, rtol=0)


TP2 = ["llama_dpo", "gpt2_ipo_sft", "rpo_sq_sft_avg", "lora", "lora_recompute_elementwise", "llama_dpo_chunked", *LOSS_VARIANTS]
SP = {"llama_dpo_sp": "llama_dpo", "gpt2_ipo_sft_sp": "gpt2_ipo_sft", "llama_dpo_sp_chunked_packed": "llama_dpo_chunked_packed",
      "llama_dpo_fused_sp_recompute_packed": "llama_dpo"}  # the last: compiled norms whose outputs are recomputed,
# compiled RoPE on shared-prompt rows
PP2 = ["llama_dpo", "gpt2_ipo_sft", "rpo_fwd_kl", "gpt2_ipo_sft_chunked", "llama_dpo_packed", "llama_dpo_4_layers",
       *LOSS_VARIANTS, "options_packed_chunked", "llama_dpo_auto", "llama_dpo_recompute_elementwise"]
DP2 = ["llama_dpo", "rpo_bwd_kl", "dpo_label_smoothing", "llama_dpo_distopt", *LOSS_VARIANTS, "kto_precomputed",
       "llama_dpo_auto"]
# LD-DPO's shared lengths, WPO and ORPO's whole sequences take masks made before the split (unpacked and packed).
# (The plain Llama-like step at CP=2 is in the TP=2 x CP=2 launch; here its unpacked rows run chunked, precomputed,
# with LoRA and with the loss options.)
CP2 = ["gpt2_ipo_sft", "llama_dpo_packed", "gpt2_ipo_sft_packed", "llama_dpo_chunked", "llama_dpo_precomputed",
       "lora", "options", "orpo_packed_chunked", "kto_packed_chunked", *AUTO_VARIANTS]


@pytest.fixture(scope="module")
def two(workdir):
    """Every 2-process layout (TP=2, PP=2 and its interleaved schedule, DP=2, CP=2) in one launch."""
    return _launch(workdir, "two", {
        "tp2": ({"tp": 2}, TP2 + list(SP) + ["llama_dpo_fused_sp"]),
        "pp2": ({"pp": 2}, PP2),
        "pp2_vpp2": ({"pp": 2, "vpp": 2}, ["llama_dpo_4_layers", "llama_dpo_4_layers_recompute"]),
        "dp2": ({}, DP2),
        "cp2": ({"cp": 2}, CP2),
    })


@pytest.fixture(scope="module")
def tp2(two):
    return two["tp2"]


def test_tensor_parallel_2(baseline, tp2):
    for variant in TP2:
        assert_same_step(baseline, tp2, variant)
    # Vocab-parallel log-probs equal a full log_softmax + gather, values and gradients; log sum p^2 too.
    for result in tp2:
        lp = result["logprobs"]
        full = lp["full_logits"].clone().requires_grad_(True)
        logits = full.clone()
        logits[..., lp["vocab"]:] = float("-inf")
        want = torch.log_softmax(logits, -1).gather(-1, lp["target"].unsqueeze(-1)).squeeze(-1)
        (want * lp["upstream"]).sum().backward()
        torch.testing.assert_close(lp["log_probs"], want.detach(), atol=1e-5, rtol=0)
        log_sum_sq = torch.log((torch.softmax(logits, -1) ** 2).sum(-1))
        torch.testing.assert_close(lp["log_sum_sq"], log_sum_sq.detach(), atol=1e-5, rtol=0)
        lo, hi = lp["shard"]
        torch.testing.assert_close(lp["local_grad"], full.grad[..., lo:hi], atol=1e-5, rtol=0)


def test_sequence_parallelism_at_tp2_gives_the_step_without_it(baseline, tp2):
    """Norms (and row-parallel biases) see a slice of the sequence per TP rank; their gradients are summed over TP."""
    for variant, without in SP.items():
        assert_same_step(baseline, tp2, variant, without)
    assert all(result["llama_dpo_sp_chunked_packed"]["shared_prompts"] for result in tp2)  # each prompt once


def test_fused_norms_swiglu_and_rope_give_the_eager_step(baseline, tp2):
    """model.fused_elementwise=true (compiled RMSNorm, SwiGLU and RoPE) at TP=2 with sequence parallelism, on padded
    and on shared-prompt rows: the step of the eager single process."""
    assert_same_step(baseline, tp2, "llama_dpo_fused_sp", "llama_dpo")
    for result in tp2:
        assert result["llama_dpo_fused_sp"]["attention"] == {"FusedRotarySelfAttention"}
        assert result["llama_dpo_fused_sp_recompute_packed"]["attention"] == {"FusedRotarySelfAttention"}
        assert result["llama_dpo_fused_sp_recompute_packed"]["shared_prompts"]
        assert result["llama_dpo"]["attention"] == {"SelfAttention"}


def test_pipeline_parallel_2_and_its_interleaved_schedule(baseline, two):
    for variant in PP2:
        assert_same_step(baseline, two["pp2"], variant)
    assert all(result["llama_dpo_packed"]["shared_prompts"] for result in two["pp2"])  # each prompt once
    # Two model chunks of one layer per rank: layers 0 and 2 on rank 0, 1 and 3 on rank 1 (tied embeddings).
    assert_same_step(baseline, two["pp2_vpp2"], "llama_dpo_4_layers")
    # The shipped recomputation of the norms' and SwiGLU's outputs under both schedules.
    assert_same_step(baseline, two["pp2_vpp2"], "llama_dpo_4_layers_recompute", "llama_dpo_4_layers")
    for rank, result in enumerate(two["pp2_vpp2"]):
        layers = {int(name.split(".")[2]) for name in result["llama_dpo_4_layers"]["weights"] if ".layers." in name}
        assert layers == {rank, rank + 2}


def test_data_parallel_2_and_context_parallel_2(baseline, workdir, two):
    """CP=2: RoPE and learned positions, packed or not, chunked log-probs, the precomputed reference, LoRA, the
    per-sequence values of LD-DPO, WPO and the reference-free ORPO, and KTO's KL estimate (summed over CP)."""
    for variant in DP2:
        assert_same_step(baseline, two["dp2"], variant)
    for variant in CP2:
        assert_same_step(baseline, two["cp2"], variant)
    # A CP rank holds parts of sequences: packed rows there hold every sequence whole, prompts unshared.
    assert all(result["llama_dpo_packed"]["packed"] and not result["llama_dpo_packed"]["shared_prompts"]
               for result in two["cp2"])
    # The precomputed reference table is the same at CP=2 as at CP=1.
    tables = [torch.load(workdir / logs / "llama_dpo_precomputed" / "reference_logprobs.pt", weights_only=True)
              for logs in ("base_logs/base", "two_logs/cp2")]
    for split in ("train", "validation"):
        torch.testing.assert_close(tables[1][split], tables[0][split], atol=1e-5, rtol=1e-6)


def test_auto_packing_packs_the_default_data_and_steps_as_packing_does(baseline):
    """model.data.packing=auto (with packing_min_saving=0) chooses packing for the mixed lengths of the default data
    (its layouts are compared in the launches above), and then steps as model.data.packing=true does."""
    for variant in AUTO_VARIANTS:
        assert baseline[variant]["packed"] and not baseline[variant.removesuffix("_auto")]["packed"], variant
    assert_same_metrics(baseline["llama_dpo_auto"]["metrics"], baseline["llama_dpo_packed"]["metrics"], "auto")


def test_tensor_parallel_2_by_context_parallel_2(baseline, workdir):
    variants = ["llama_dpo", "gpt2_ipo_sft_packed_chunked"]
    launch = _launch(workdir, "tp2cp2", {"tp2_cp2": ({"tp": 2, "cp": 2}, variants)}, world_size=4)
    for variant in variants:
        assert_same_step(baseline, launch["tp2_cp2"], variant)
