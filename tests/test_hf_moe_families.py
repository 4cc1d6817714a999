"""Mixtral and Qwen3-MoE in and out, and expert parallelism, checked against transformers itself.

Three tiny mixture-of-experts models with random weights are made and saved by
transformers (tests/moe_fixtures.py): Mixtral (top-2 of 8, trained with its
load-balancing loss), Qwen3-MoE with norm_topk_prob (tied, its own head size)
and Qwen3-MoE without it (top-3). Loaded from their folders at EP=1, EP=2
(DP=2), TP=2 and PP=2 they give transformers' log-probs over 320 tokens (1e-4),
and so does Mixtral at EP=2 with TP=2 and with PP=2 (4 processes).
Converted with ``hf-to-mcore`` and back with ``mcore-to-hf``, every tensor and
the config fields come back, and transformers loads the folder with no missing
or unexpected weight. Mixtral's DPO step at EP=2 equals the step at EP=1 (loss,
load-balancing loss, every gradient and updated weight), the logged
load-balancing loss is the one transformers' routers give for the policy pass's
tokens, the step without the loss agrees at EP=2 and EP=1 too, the DPO
program runs 3 steps from Mixtral's and Qwen3-MoE's folders at TP=2 and
exports what transformers reproduces, and the EP=2 step's checkpoint, saved at
EP=2, resumes at EP=2 into the second step EP=1 takes, and exports to a folder
transformers reproduces. Three
process launches in all, one per world size (tests/moe_scenarios.py).
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distributed_harness import run_world
from hf_fixtures import hf_log_probs
from moe_fixtures import EXPERTS, MIXTRAL_AUX, SEQUENCE, SETTINGS, VOCAB, router_weights, save_cases
from dense_scenarios import log_probs
from moe_scenarios import convert_export_and_score, layouts_and_training
from nemo_dpo.models.hf.safetensors_io import read_safetensors
from nemo_dpo.training import checkpoint

pytestmark = pytest.mark.slow  # real multi-process runs

TOKENS = torch.randint(3, VOCAB - 10, (2, SEQUENCE), generator=torch.Generator().manual_seed(0))
LAYOUTS = {"EP=2": (1, 1, 2), "TP=2": (2, 1, 1), "PP=2": (1, 2, 1)}
WITH_EP = {"EP=2 TP=2": (2, 1, 2), "EP=2 PP=2": (1, 2, 2)}  # 4 processes
TRAINED = "mixtral"
# config.json fields that define the network, compared between a source and its export.
CONFIG_FIELDS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "rope_parameters", "tie_word_embeddings", "vocab_size", "attention_bias", "num_local_experts",
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                 "decoder_sparse_step", "mlp_only_layers", "output_router_logits", "router_aux_loss_coef"]
TOLERANCE = 1e-5  # EP=2 against EP=1
DPO_FAMILIES = ("mixtral", "qwen3_moe")  # the DPO program from each family's folder at TP=2
DPO_RUN = ["model.tensor_model_parallel_size=2", "model.global_batch_size=4", "model.micro_batch_size=2",
           "trainer.dpo.max_steps=3", "trainer.dpo.limit_val_batches=1",
           "exp_manager.create_tensorboard_logger=false", "model.optim.lr=1e-3"]  # 9e-6 hardly moves a random model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return root, save_cases(str(root / "hf"))


@pytest.fixture(scope="module")
def parallel(work):
    """Per rank of a 2-process launch: the log-probs at EP=2, TP=2 and PP=2, and the EP training runs."""
    root, hf = work
    dirs = {name: folder for name, (_, folder) in hf.items()}
    runs = {name: ["--config-name", "gpt_dpo_hf", f"model.restore_from_path={hf[name][1]}", *DPO_RUN,
                   f"exp_manager.explicit_log_dir={root / 'dpo' / name}"] for name in DPO_FAMILIES}
    return run_world(2, str(root / "two"), layouts_and_training, list(LAYOUTS.values()), dirs, TOKENS,
                     hf[TRAINED][1], str(root / "runs"), runs)


@pytest.fixture(scope="module")
def four(work):
    """Per rank of a 4-process launch: Mixtral's log-probs at EP=2 with TP=2 (DP=2), and with PP=2 (DP=2)."""
    root, hf = work
    layouts = list(WITH_EP.values())
    return run_world(4, str(root / "four"), log_probs, layouts, {TRAINED: hf[TRAINED][1]}, TOKENS)


@pytest.fixture(scope="module")
def single(work, parallel):
    """In one process: each folder converted, exported and scored at TP=1, EP=1; the EP=2 checkpoint exported."""
    root, hf = work
    dirs = {name: folder for name, (_, folder) in hf.items()}
    checkpoints = {TRAINED: str(_saved_step(root)),
                   **{f"dpo_{name}": str(root / "dpo" / name / "checkpoints" / "step_3") for name in DPO_FAMILIES}}
    (out,) = run_world(1, str(root / "one"), convert_export_and_score, dirs, str(root / "mcore"),
                       str(root / "exported"), checkpoints, str(root / "trained_exported"), TOKENS)
    return out


def _saved_step(root):
    return root / "runs" / "ep2" / "checkpoints" / "step_1"


def _check_close(got, want, label, atol=1e-4):
    torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{label}: {m}")
    return (got - want).abs().max().item()


def _whole(per_rank: list, label: str) -> dict:
    """One {global name: tensor} from the ranks' dicts: EP ranks hold different experts, the rest on both alike."""
    whole = {}
    for tensors in per_rank:
        for name, tensor in tensors.items():
            if name in whole:
                assert torch.equal(whole[name], tensor), f"{label}: {name} differs between data-parallel ranks"
            whole[name] = tensor
    return whole


def _router_logits(model, tokens) -> list:
    with torch.no_grad():
        return [logits.double() for logits in model(tokens, output_router_logits=True).router_logits]


def test_routers_are_decisive(work):
    """The k-th and (k+1)-th expert of every token are far apart, so rounding cannot swap them."""
    _, hf = work
    for name, (model, _) in hf.items():
        k = model.config.num_experts_per_tok
        gaps = [logits.topk(k + 1).values for logits in _router_logits(model, TOKENS)]
        smallest = min((top[:, k - 1] - top[:, k]).min().item() for top in gaps)
        # rounding moves these logits by ~1e-6 between implementations and layouts
        assert smallest > 1e-4, f"{name}: two experts of a token are {smallest:.1e} apart in router logits"
        assert len(router_weights(model)) == model.config.num_hidden_layers


def test_log_probs_match_transformers_at_ep1_ep2_tp2_pp2(work, parallel, single):
    _, hf = work
    runs = {"EP=1": single["folders"], **{label: _last_stage(parallel, sizes) for label, sizes in LAYOUTS.items()}}
    assert parallel[1]["log_probs"][LAYOUTS["EP=2"]], "at EP=2 (DP=2) both ranks score the batch"
    table = {}
    for name, (model, _) in hf.items():
        want = hf_log_probs(model, TOKENS)
        assert want.std() > 0.5, f"{name}: the test model is too close to uniform to test anything"
        table[name] = {label: _check_close(scores[name], want, f"{name} {label}") for label, scores in runs.items()}
        _check_close(parallel[1]["log_probs"][LAYOUTS["EP=2"]][name], want, f"{name} EP=2 rank 1")
    print("\nmax |log-prob difference| vs transformers over", TOKENS.numel() - TOKENS.shape[0], "tokens")
    for name, row in table.items():
        print(f"  {name:18s}" + "".join(f"  {label} {diff:.2e}" for label, diff in row.items()))


def test_log_probs_match_transformers_with_ep2_and_tp2_or_pp2(work, four):
    """EP's token exchange inside TP's and PP's: the experts' tokens gathered over TP ranks in unequal shares."""
    _, hf = work
    want = hf_log_probs(hf[TRAINED][0], TOKENS)
    reporting = {"EP=2 TP=2": (0, 2), "EP=2 PP=2": (2, 3)}  # first TP rank of each DP rank / the last stage's ranks
    for label, sizes in WITH_EP.items():
        ranks = [rank for rank, out in enumerate(four) if out[sizes]]
        assert ranks == list(reporting[label]), label
        diff = max(_check_close(four[rank][sizes][TRAINED], want, f"{TRAINED} {label}") for rank in ranks)
        print(f"\n{TRAINED} {label}: max |log-prob difference| vs transformers {diff:.2e}")


def _last_stage(parallel, sizes):
    """The log-probs of a layout: rank 0 reports them, except at PP=2 where the last stage (rank 1) does."""
    rank = 1 if sizes[1] == 2 else 0
    assert not parallel[1 - rank]["log_probs"][sizes] or sizes[2] > 1
    return parallel[rank]["log_probs"][sizes]


def test_import_then_export_reproduces_tensors_and_config(work, single):
    root, hf = work
    for name, (model, folder) in hf.items():
        saved = checkpoint.read_metadata(root / "mcore" / name)["config"]["model"]
        for key, value in SETTINGS[name].items():
            assert saved[key] == value, f"{name}: the converted checkpoint's model.{key}"
        out = root / "exported" / name
        source, exported = read_safetensors(f"{folder}/model.safetensors"), read_safetensors(f"{out}/model.safetensors")
        assert set(exported) == set(source), name
        for key, tensor in source.items():
            assert torch.equal(exported[key], tensor), f"{name}: {key}"
        want, got = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(out)
        for field in CONFIG_FIELDS:
            assert getattr(got, field, None) == getattr(want, field, None), f"{name}: config.json {field}"
        loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert type(loaded) is type(model), name
        assert not info["missing_keys"] and not info["unexpected_keys"], f"{name}: {info}"
        torch.testing.assert_close(hf_log_probs(loaded.eval(), TOKENS), hf_log_probs(model, TOKENS), atol=0, rtol=0)


def _run(parallel, key):
    return [rank["training"][key] for rank in parallel]


def _compare_steps(got_ranks, got_step, want_ranks, want_step, label):
    """Loss, load-balancing loss, gradients and new weights of a step: EP=2 ranks against EP=1's (within 1e-5)."""
    got, want = got_ranks[0]["steps"][got_step], want_ranks[0]["steps"][want_step]
    for metric in ("loss", "moe_aux_loss", "accuracy", "reward_margin"):
        if metric == "moe_aux_loss" and metric not in want["metrics"]:  # trained without the loss
            assert metric not in got["metrics"]
            continue
        # relative for the loss terms; the margin is a small difference of larger rewards, within 1e-6
        assert got["metrics"][metric] == pytest.approx(want["metrics"][metric], rel=TOLERANCE, abs=1e-6), metric
    diffs = {}
    for part in ("grads", "weights"):
        ours = _whole([r["steps"][got_step][part] for r in got_ranks], f"{label} {part}")
        theirs = _whole([r["steps"][want_step][part] for r in want_ranks], f"EP=1 {part}")
        assert set(ours) == set(theirs)
        assert any(".local_experts.7." in n for n in ours), "the EP ranks' experts are numbered globally"
        diffs[part] = max(_check_close(ours[n], theirs[n], f"{label} {part} {n}", TOLERANCE) for n in theirs)
    return diffs


def test_dpo_step_at_ep2_equals_ep1(parallel):
    ep2, ep1 = _run(parallel, "ep2"), _run(parallel, "ep1")
    assert ep2[0]["steps"][0]["metrics"]["moe_aux_loss"] > 0
    diffs = _compare_steps(ep2, 0, ep1, 0, "EP=2")
    grads = ep1[0]["steps"][0]["grads"]
    assert all(grads[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"].abs().max() > 0
               for e in range(EXPERTS)), "every expert takes part in the step"
    print(f"\nDPO step at EP=2 vs EP=1: max |grad difference| {diffs['grads']:.2e}, "
          f"max |weight difference| {diffs['weights']:.2e}")


def test_dpo_step_at_ep2_equals_ep1_without_the_load_balancing_loss(parallel):
    """In packed rows with each pair's prompt once: the experts see the row's tokens."""
    ep2, ep1 = _run(parallel, "ep2_no_aux"), _run(parallel, "ep1_no_aux")
    assert all(rank["shared_prompts"] for rank in ep2 + ep1)
    assert "moe_aux_loss" not in ep1[0]["steps"][0]["metrics"]
    diffs = _compare_steps(ep2, 0, ep1, 0, "EP=2 without the loss")
    with_loss = _run(parallel, "ep1")[0]["steps"][0]["grads"]
    router = "decoder.layers.0.mlp.router.weight"
    assert (ep1[0]["steps"][0]["grads"][router] - with_loss[router]).abs().max() > 1e-6, "the loss reaches the router"
    print(f"\nDPO step at EP=2 vs EP=1 without the load-balancing loss: max |grad difference| {diffs['grads']:.2e}")


def test_dpo_from_each_family_at_tp2_then_export_matches_transformers(work, parallel, single):
    root, hf = work
    for name in DPO_FAMILIES:
        status, console = parallel[0]["dpo"][name]
        assert status == 0, console[-3000:]
        out = root / "trained_exported" / f"dpo_{name}"
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert type(model) is type(hf[name][0]), name
        assert not info["missing_keys"] and not info["unexpected_keys"], f"{name}: {info}"
        theirs = hf_log_probs(model.eval(), TOKENS)
        diff = _check_close(single["checkpoints"][f"dpo_{name}"], theirs, f"{name} after DPO at TP=2")
        assert (theirs - hf_log_probs(hf[name][0], TOKENS)).abs().max() > 1e-3, f"{name}: training changed nothing"
        print(f"\n{name} after 3 DPO steps at TP=2: max |log-prob difference| vs transformers {diff:.2e}")


def test_logged_load_balancing_loss_is_the_policy_pass_routers_loss(work, parallel):
    """coeff x sum over layers of E/(k T^2) sum_e (sum_t p_te) c_e, from transformers' router logits for the
    policy pass's microbatches, averaged over microbatches and DP ranks: the reference pass adds nothing."""
    _, hf = work
    model = hf[TRAINED][0]
    k = model.config.num_experts_per_tok
    per_rank = []
    for rank in _run(parallel, "ep1"):
        (microbatches,) = rank["tokens"][:1]
        values = []
        for tokens in microbatches:
            total = 0.0
            for logits in _router_logits(model, tokens):
                counts = torch.bincount(logits.topk(k).indices.flatten(), minlength=EXPERTS).double()
                n = logits.shape[0]
                total += EXPERTS / (k * n * n) * (torch.softmax(logits, -1).sum(0) * counts).sum().item()
            values.append(total)
        per_rank.append(sum(values) / len(values))
    want = MIXTRAL_AUX * sum(per_rank) / len(per_rank)
    for key in ("ep1", "ep2"):
        got = _run(parallel, key)[0]["steps"][0]["metrics"]["moe_aux_loss"]
        assert got == pytest.approx(want, rel=1e-5), key
    print(f"\nlogged moe_aux_loss {got:.6f}, from transformers' routers {want:.6f}")


def test_checkpoint_saved_at_ep2_resumes_at_ep2_and_exports(work, parallel, single):
    root, hf = work
    ep2, resumed, ep1 = _run(parallel, "ep2"), _run(parallel, "ep2_resumed"), _run(parallel, "ep1")
    assert [r["start"] for r in resumed] == [1, 1]
    saved = _whole([r["steps"][0]["weights"] for r in ep2], "EP=2 after step 1")
    loaded = _whole([r["weights_at_start"] for r in resumed], "EP=2 resumed")
    assert set(loaded) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    _compare_steps(resumed, 0, ep1, 1, "EP=2 resumed")  # the second step, from the checkpoint and in-process

    out = root / "trained_exported" / TRAINED
    exported = AutoConfig.from_pretrained(out)
    assert exported.output_router_logits and exported.router_aux_loss_coef == MIXTRAL_AUX
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model) is type(hf[TRAINED][0])
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = hf_log_probs(model.eval(), TOKENS)
    diff = _check_close(single["checkpoints"][TRAINED], theirs, "the EP=2 checkpoint's export")
    assert (theirs - hf_log_probs(hf[TRAINED][0], TOKENS)).abs().max() > 1e-3, "training changed nothing"
    print(f"\nEP=2 checkpoint exported: max |log-prob difference| vs transformers {diff:.2e}")
