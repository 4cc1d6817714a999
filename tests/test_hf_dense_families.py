"""Llama 3, Qwen2 and Qwen3 in and out, checked against transformers itself.

Seven tiny models with random weights are made and saved by transformers
(tests/dense_fixtures.py): Llama 3 with its long-context RoPE scaling, once with
biases and a head size of its own, Llama with linear and YaRN scaling, Qwen2
tied and untied, Qwen3. Loaded from their folders at TP=1, TP=2 and PP=2 they
give transformers' log-probs over 320 tokens, far past the 64 positions the
scaled RoPE was "pretrained" on (1e-4). Converted with ``hf-to-mcore`` and back
with ``mcore-to-hf``, every tensor, the config fields and generation_config.json
come back, and transformers loads the folder with no missing or unexpected
weight. One model per family is trained for 3 DPO steps at TP=2 straight from
its folder; exported, it loads in transformers and gives our log-probs (1e-4).
Four process launches in all (tests/dense_scenarios.py).
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dense_fixtures import DPO_RUNS, SCALED, SEQUENCE, VOCAB, save_cases
from distributed_harness import run_world
from dense_scenarios import convert_and_score, export_and_score, log_probs, train
from hf_fixtures import hf_log_probs
from nemo_dpo.models.hf.safetensors_io import read_safetensors
from nemo_dpo.training import checkpoint

pytestmark = pytest.mark.slow  # real multi-process runs

TOKENS = torch.randint(3, VOCAB - 10, (2, SEQUENCE), generator=torch.Generator().manual_seed(0))
# config.json fields that define the network, compared between a source and its export.
CONFIG_FIELDS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "rope_parameters", "tie_word_embeddings", "vocab_size", "attention_bias", "mlp_bias",
                 "use_sliding_window", "sliding_window", "layer_types"]
RUN = ["model.tensor_model_parallel_size=2", "model.global_batch_size=8", "model.micro_batch_size=2",
       "trainer.dpo.max_steps=3", "trainer.dpo.limit_val_batches=1", "exp_manager.create_tensorboard_logger=false",
       "model.optim.lr=1e-3"]  # gpt_dpo_hf.yaml's 9e-6 would hardly move a random model in 3 steps


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return root, save_cases(str(root / "hf"))


@pytest.fixture(scope="module")
def converted(work):
    """TP=1 log-probs from each folder, after converting each to a checkpoint and exporting that."""
    root, hf = work
    dirs = {name: folder for name, (_, folder) in hf.items()}
    (scores,) = run_world(1, str(root / "tp1"), convert_and_score, dirs, str(root / "mcore"), str(root / "exported"), TOKENS)
    return scores


@pytest.fixture(scope="module")
def trained(work):
    """One DPO run per family at TP=2 from its folder, exported, with the checkpoints' TP=1 log-probs."""
    root, hf = work
    runs = {name: ["--config-name", "gpt_dpo_hf", f"model.restore_from_path={hf[name][1]}", *RUN,
                   f"exp_manager.explicit_log_dir={root / 'dpo' / name}"] for name in DPO_RUNS}
    consoles = run_world(2, str(root / "dpo_out"), train, runs)[0]
    checkpoints = {name: str(root / "dpo" / name / "checkpoints" / "step_3") for name in DPO_RUNS}
    (scores,) = run_world(1, str(root / "dpo_score"), export_and_score, checkpoints, str(root / "dpo_exported"), TOKENS)
    return consoles, checkpoints, scores


def _check_close(got, want, label):
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{label}: {m}")
    return (got - want).abs().max().item()


def _plain_rope_log_probs(model):
    """transformers' log-probs for the same weights with RoPE unscaled (to show the scaling matters here)."""
    config = model.config.__class__.from_dict({**model.config.to_dict(), "rope_parameters": {
        "rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]}})
    plain = type(model)(config).eval()
    plain.load_state_dict(model.state_dict())
    return hf_log_probs(plain, TOKENS)


def test_log_probs_match_transformers_at_tp1_tp2_and_pp2(work, converted):
    root, hf = work
    dirs = {name: folder for name, (_, folder) in hf.items()}
    # a rendezvous port per layout: re-initialising on the launch's port, a rank can meet the last layout's store
    ranks = run_world(2, str(root / "tp2_pp2"), log_probs, [(2, 1), (1, 2)], dirs, TOKENS)
    runs = {"TP=1": converted, "TP=2": ranks[0][(2, 1)], "PP=2": ranks[1][(1, 2)]}
    assert not ranks[1][(2, 1)] and not ranks[0][(1, 2)]  # only the last stage's first TP rank reports
    table = {}
    for name, (model, _) in hf.items():
        want = hf_log_probs(model, TOKENS)
        assert want.std() > 0.5, f"{name}: the test model is too close to uniform to test anything"
        if name in SCALED:
            assert (_plain_rope_log_probs(model) - want).abs().max() > 0.1, f"{name}: the scaling changes nothing"
        table[name] = {label: _check_close(scores[name], want, f"{name} {label}") for label, scores in runs.items()}
    print("\nmax |log-prob difference| vs transformers over", TOKENS.numel() - TOKENS.shape[0], "tokens")
    for name, row in table.items():
        print(f"  {name:22s}" + "".join(f"  {label} {diff:.2e}" for label, diff in row.items()))


def test_import_then_export_reproduces_tensors_config_and_generation_config(work, converted):
    root, hf = work
    for name, (model, folder) in hf.items():
        out = root / "exported" / name
        source, exported = read_safetensors(f"{folder}/model.safetensors"), read_safetensors(f"{out}/model.safetensors")
        assert set(exported) == set(source), name
        for key, tensor in source.items():
            assert torch.equal(exported[key], tensor), f"{name}: {key}"
        want, got = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(out)
        for field in CONFIG_FIELDS:
            assert getattr(got, field, None) == getattr(want, field, None), f"{name}: config.json {field}"
        assert (out / "generation_config.json").read_bytes() == (root / "hf" / name / "generation_config.json").read_bytes()
        assert (root / "mcore" / name / "generation_config.json").is_file()  # the checkpoint keeps it
        loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert type(loaded) is type(model), name
        assert not info["missing_keys"] and not info["unexpected_keys"], f"{name}: {info}"
        torch.testing.assert_close(hf_log_probs(loaded.eval(), TOKENS), hf_log_probs(model, TOKENS), atol=0, rtol=0)


def test_dpo_from_each_family_then_export_matches_transformers(work, trained):
    root, hf = work
    consoles, checkpoints, ours = trained
    for name, settings in DPO_RUNS.items():
        status, console = consoles[name]
        assert status == 0, console[-3000:]
        assert "warning: the run has 3 steps" in console and "model.optim.sched.warmup_steps=10" in console
        saved = checkpoint.read_metadata(checkpoints[name])["config"]["model"]
        for key, value in settings.items():
            assert saved[key] == value, f"{name}: the checkpoint's model.{key}"
        out = root / "dpo_exported" / name
        want, got = AutoConfig.from_pretrained(hf[name][1]), AutoConfig.from_pretrained(out)
        for field in CONFIG_FIELDS:
            assert getattr(got, field, None) == getattr(want, field, None), f"{name}: config.json {field}"
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert type(model) is type(hf[name][0]), name
        assert not info["missing_keys"] and not info["unexpected_keys"], f"{name}: {info}"
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
        theirs = hf_log_probs(model.eval(), TOKENS)
        diff = _check_close(ours[name], theirs, f"{name} after DPO")
        print(f"\n{name} after 3 DPO steps at TP=2: max |log-prob difference| vs transformers {diff:.2e}")
        assert (theirs - hf_log_probs(hf[name][0], TOKENS)).abs().max() > 1e-3, f"{name}: training changed nothing"
