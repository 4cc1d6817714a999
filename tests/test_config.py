"""Bad configuration fails before any work starts, with a message naming the key and the values."""

import os
import subprocess
import sys

import pytest

from nemo_dpo.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(overrides, world_size=1):
    validate(load_config("gpt_dpo", overrides), world_size)


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("model.dpo.ref_policy_kl_penaly=0.2", "model.dpo.ref_policy_kl_penalty"),  # a typo
        ("model.dpo.beta=0.2", "model.dpo.ref_policy_kl_penalty"),  # TRL's name for it
        ("model.optim.sched.warmup=3", "model.optim.sched.warmup_steps"),
        ("model.lr=1e-5", "model.optim.lr"),  # the right name in another section
        ("modle.seed=3", "model"),
    ],
)
def test_a_misspelled_key_gets_a_suggestion(override, suggestion):
    key = override.split("=")[0].split(".")[0] if override.startswith("modle") else override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}' .*did you mean '{suggestion}'\?"):
        load_config("gpt_dpo", [override])
    with pytest.raises(ConfigError) as err:
        load_config("gpt_dpo", ["zzz=1"])
    assert "did you mean" not in str(err.value)


def test_defaults_are_valid_for_one_and_two_processes():
    check([], 1)
    check([], 2)


@pytest.mark.parametrize(
    "overrides, world_size, pattern",
    [
        (["model.tensor_model_parallel_size=2"], 3, r"world size 3 is not divisible by model.tensor_model_parallel_size \(2\) x model.pipeline_model_parallel_size \(1\)"),
        (["model.pipeline_model_parallel_size=3"], 4, r"world size 4 .* model.pipeline_model_parallel_size \(3\) = 3"),
        (["model.num_attention_heads=6", "model.hidden_size=120", "model.tensor_model_parallel_size=4"], 4, r"model.num_attention_heads \(6\) is not divisible by model.tensor_model_parallel_size \(4\)"),
        (["model.hidden_size=130"], 1, r"model.hidden_size \(130\) is not divisible by model.num_attention_heads \(4\)"),
        (["model.num_query_groups=3"], 1, r"model.num_query_groups \(3\) must divide model.num_attention_heads \(4\)"),
        (["model.global_batch_size=30"], 2, r"model.global_batch_size \(30\) is not divisible by model.micro_batch_size \(4\) x data-parallel size \(2\) = 8"),
        (["model.dpo.preference_loss=kto"], 1, r"model.dpo.preference_loss must be one of \['dpo', 'ipo', 'rpo_fwd_kl', 'rpo_bwd_kl', 'rpo_sq', 'sigmoid', 'hinge', 'robust', 'exo_pair', 'nca_pair', 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', 'discopop', 'sigmoid_norm', 'sft', 'simpo', 'cpo', 'orpo'\], got 'kto'"),
        (["model.data.data_prefix.train=/nonexistent/train.jsonl"], 1, r"model.data.data_prefix.train: file /nonexistent/train.jsonl does not exist"),
        (["model.data.data_prefix.validation=/nonexistent/val.jsonl"], 1, r"model.data.data_prefix.validation: file /nonexistent/val.jsonl does not exist"),
        (["model.num_layers=3", "model.pipeline_model_parallel_size=2"], 2, r"model.num_layers \(3\) is not divisible by model.pipeline_model_parallel_size \(2\)"),
        (["model.activation=relu"], 1, r"model.activation must be one of \['gelu', 'gelu_tanh', 'swiglu'\], got 'relu'"),
        (["model.optim.name=sgd"], 1, r"model.optim.name must be one of .*got 'sgd'"),
        (["model.optim.sched.name=WarmupHold"], 1, r"model.optim.sched.name must be 'CosineAnnealing', got 'WarmupHold'"),
        (["model.data.overflow=wrap"], 1, r"model.data.overflow must be one of \['truncate_prompt', 'drop'\], got 'wrap'"),
        (["model.encoder_seq_length=128"], 1, r"model.encoder_seq_length \(128\) exceeds model.max_position_embeddings \(64\)"),
        (["model.tokenizer.model=/no/such/tokenizer.model"], 1, r"model.tokenizer.model: /no/such/tokenizer.model does not exist"),
        (["trainer.dpo.nan_policy=ignore"], 1, r"trainer.dpo.nan_policy must be 'skip_step' or 'stop', got 'ignore'"),
        (["trainer.distributed_timeout_minutes=0"], 1, r"trainer.distributed_timeout_minutes must be positive, got 0"),
        (["model.data.on_bad_record=drop"], 1, r"model.data.on_bad_record must be one of \['error', 'skip'\], got 'drop'"),
        (["model.make_vocab_size_divisible_by=90", "model.tensor_model_parallel_size=4", "model.ffn_hidden_size=512"], 4, r"model.make_vocab_size_divisible_by \(90\) must be divisible by model.tensor_model_parallel_size \(4\)"),
        (["model.dpo.preference_loss=[dpo,orpo]"], 1, r"model.dpo.preference_loss: a list is a mixture of distinct paired losses with a reference"),
        (["model.dpo.ld_alpha=2"], 1, r"model.dpo.ld_alpha must be in \[0, 1\], or null for none, got 2"),
        (["model.dpo.sync_ref_model=true", "model.dpo.reference_logprobs=precomputed"], 1, r"model.dpo.sync_ref_model=true moves the reference during training, so its log-probs cannot be precomputed"),
        (["model.dpo.sync_ref_model=true", "model.peft.peft_scheme=lora"], 1, r"model.dpo.sync_ref_model=true needs reference weights to move, but with model.peft.peft_scheme=lora the reference is the frozen base"),
    ],
)
def test_bad_values_are_named(overrides, world_size, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check(overrides, world_size)


def test_unknown_key_and_wrong_type_and_bad_syntax():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dpo.beta'"):
        load_config("gpt_dpo", ["model.dpo.beta=0.1"])
    with pytest.raises(ConfigError, match=r"model.micro_batch_size: expected int, got 'four'"):
        load_config("gpt_dpo", ["model.micro_batch_size=four"])
    with pytest.raises(ConfigError, match=r"model.dpo.sft_average_log_probs: expected a boolean, got 1"):
        load_config("gpt_dpo", ["model.dpo.sft_average_log_probs=1"])
    with pytest.raises(ConfigError, match=r"override 'model.seed' is not of the form key=value"):
        load_config("gpt_dpo", ["model.seed"])
    with pytest.raises(ConfigError, match=r"no_such_config.yaml not found"):
        load_config("no_such_config")


def test_overrides_apply():
    cfg = load_config("gpt_dpo", ["model.dpo.preference_loss=ipo", "model.optim.lr=5e-4", "model.optim.weight_decay=0"])
    assert cfg.model.dpo.preference_loss == "ipo"
    assert cfg.model.optim.lr == 5e-4
    assert cfg.model.optim.weight_decay == 0  # an int where a float is expected is fine


def test_preference_loss_takes_a_list_and_no_other_string_key_does():
    check(["model.dpo.preference_loss=[dpo,bco_pair,sft]", "model.dpo.preference_loss_weights=[0.8,0.2,1.0]"])
    with pytest.raises(ConfigError, match=r"model.optim.name: expected str, got \['adamw'\]"):
        load_config("gpt_dpo", ["model.optim.name=[adamw]"])


@pytest.mark.slow
def test_cli_fails_fast_with_the_message(tmp_path):
    """The training script exits with status 2 before initialising anything."""
    env = {**os.environ, "WORLD_SIZE": "3"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_dpo.py"), "model.tensor_model_parallel_size=2",
         f"exp_manager.explicit_log_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "config error: world size 3 is not divisible by model.tensor_model_parallel_size (2)" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written
