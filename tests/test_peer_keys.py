"""NeMo-Aligner's and TRL's config names are answered in their own words: Aligner's command-line forms and
spellings are taken as nemo-dpo's, and every setting of Aligner or TRL without a counterpart is named as such."""

import dataclasses
import os
import re

import pytest
import trl
from omegaconf import OmegaConf

from nemo_dpo import peer_keys
from nemo_dpo.config import ConfigError, load_config, validate
from nemo_dpo.training.trainer import steps_between_validations, validation_batches_used

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
CONF = OmegaConf.load(os.path.join(ROOT, "conf", "gpt_dpo.yaml"))


def answer(override: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config("gpt_dpo", [override])
    return str(err.value)


def answer_after_validation(override: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(load_config("gpt_dpo", [override]), 1)
    return str(err.value)


def has(key: str) -> bool:
    return OmegaConf.select(CONF, key, default="absent") != "absent"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(trl.DPOConfig)])
def test_every_trl_dpo_config_field_points_to_its_key_or_is_named_unsupported(field):
    """Read from TRL's own dataclass: each field (TrainingArguments' too) gets one of the two answers."""
    message = answer(f"{field}=1")
    suggested = re.search(r"\(did you mean '([\w.]+)'\?\)$", message)
    if suggested:
        assert message.startswith(f"unknown config key '{field}'")
        assert has(suggested.group(1)) and suggested.group(1) == peer_keys.TRL_KEYS[field]
    else:
        assert message.startswith(f"TRL's {field} is not supported by nemo-dpo: "), message
        assert len(message) > len(f"TRL's {field} is not supported by nemo-dpo: ") + 10  # a reason, not a shrug


def test_trl_names_point_home_from_any_section_and_the_readme_table_lists_them():
    assert answer("model.dpo.beta=0.2").endswith("(did you mean 'model.dpo.ref_policy_kl_penalty'?)")
    assert answer("model.optim.learning_rate=1e-5").endswith("(did you mean 'model.optim.lr'?)")
    assert answer("loss_type=sigmoid").endswith("(did you mean 'model.dpo.preference_loss'?)")
    assert answer("max_prompt_length=256").startswith("TRL's max_prompt_length is not supported by nemo-dpo: a prompt "
                                                      "is cut from the left only as far as")
    table = README.split("## Coming from TRL", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    for field, key in peer_keys.TRL_KEYS.items():
        same_name = key == f"model.dpo.{field}"
        assert any(f"`{field}`" in theirs and (f"`{key}`" in ours or same_name and "<the same name>" in ours)
                   for theirs, ours in rows), f"README's TRL table has no row {field} -> {key}"
    for key in set(peer_keys.TRL_KEYS.values()):
        assert has(key) or key.startswith("model.dpo."), f"{key} is not a config key"  # model.dpo: a loss's option


def test_a_trl_loss_option_is_mapped_once_a_loss_takes_it(tmp_path):
    """model.dpo.<TRL's name>: pointed to when conf has it, said to be unsupported where it has not."""
    with pytest.raises(ConfigError, match=r"\(did you mean 'model.dpo.ld_alpha'\?\)$"):
        load_config("gpt_dpo", ["ld_alpha=0.5"])
    conf = OmegaConf.load(os.path.join(ROOT, "conf", "gpt_dpo.yaml"))
    del conf.model.dpo["ld_alpha"]
    OmegaConf.save(conf, tmp_path / "without_ld_alpha.yaml")
    with pytest.raises(ConfigError) as err:
        load_config("without_ld_alpha", ["ld_alpha=0.5"], tmp_path)
    assert str(err.value) == "TRL's ld_alpha is not supported by nemo-dpo: " + peer_keys.NO_LOSS_TAKES_IT


# The keys of NeMo-Aligner's examples/nlp/gpt/conf/gpt_dpo.yaml (its last release) and of the flags its DPO guide adds.
ALIGNER_KEYS = [
    "trainer.num_nodes", "trainer.devices", "trainer.accelerator", "trainer.precision", "trainer.dpo.max_epochs",
    "trainer.dpo.max_steps", "trainer.dpo.val_check_interval", "trainer.dpo.save_interval",
    "trainer.dpo.limit_train_batches", "trainer.dpo.limit_val_batches", "trainer.dpo.gradient_clip_val",
    "trainer.logger", "trainer.enable_checkpointing", "trainer.use_distributed_sampler", "trainer.max_time",
    "trainer.max_epochs", "trainer.max_steps", "precision",
    "exp_manager.explicit_log_dir", "exp_manager.exp_dir", "exp_manager.name", "exp_manager.max_time_per_run",
    "exp_manager.create_wandb_logger", "exp_manager.wandb_logger_kwargs.project", "exp_manager.wandb_logger_kwargs.name",
    "exp_manager.resume_from_checkpoint", "exp_manager.resume_if_exists", "exp_manager.resume_ignore_no_checkpoint",
    "exp_manager.create_checkpoint_callback", "exp_manager.checkpoint_callback_params.monitor",
    "exp_manager.checkpoint_callback_params.save_top_k", "exp_manager.checkpoint_callback_params.save_nemo_on_train_end",
    "pretrained_checkpoint.restore_from_path", "model.mcore_gpt", "model.micro_batch_size", "model.global_batch_size",
    "model.megatron_amp_O2", "model.dpo.log_prob_forward_micro_batch_size", "model.dpo.ref_policy_kl_penalty",
    "model.dpo.preference_average_log_probs", "model.dpo.sft_average_log_probs", "model.dpo.gt_reward_scale",
    "model.dpo.preference_loss", "model.dpo.preference_loss_weight", "model.dpo.sft_loss_weight", "model.seed",
    "model.peft.peft_scheme", "model.peft.restore_from_path", "model.peft.restore_from_ckpt.checkpoint_dir",
    "model.peft.lora_tuning.target_modules", "model.peft.lora_tuning.adapter_dim",
    "model.peft.lora_tuning.adapter_dropout", "model.peft.lora_tuning.column_init_method",
    "model.peft.lora_tuning.row_init_method", "model.peft.lora_tuning.layer_selection",
    "model.peft.lora_tuning.weight_tying", "model.peft.lora_tuning.position_embedding_strategy", "model.optim.name",
    "model.optim.bucket_cap_mb", "model.optim.overlap_grad_sync", "model.optim.contiguous_grad_buffer",
    "model.optim.lr", "model.optim.weight_decay", "model.optim.betas", "model.optim.sched.name",
    "model.optim.sched.warmup_steps", "model.optim.sched.constant_steps", "model.optim.sched.min_lr",
    "model.data.data_impl", "model.data.splits_string", "model.data.seq_length", "model.data.pad_length_to_multiple_of",
    "model.data.skip_warmup", "model.data.num_workers", "model.data.reset_position_ids",
    "model.data.reset_attention_mask", "model.data.eod_mask_loss", "model.data.index_mapping_dir",
    "model.data.data_prefix", "model.data.default_chosen_reward", "model.data.default_rejected_reward",
    "model.overwrite_base_config.data.data_prefix", "model.transformer_engine",
]



@pytest.mark.parametrize("key", [k for k in ALIGNER_KEYS if not has(k) and k not in peer_keys.ALIGNER_SPELLINGS])
def test_every_aligner_key_that_is_not_ours_is_named_unsupported(key):
    """The others are nemo-dpo keys, or Aligner's spellings of them (accepted: the next test)."""
    message = answer(f"{key}=1")
    assert message.startswith("NeMo-Aligner's ") and " is not supported by nemo-dpo: " in message, message
    assert "unknown config key" not in message


def test_aligner_command_line_forms_and_spellings_are_taken_as_ours():
    cfg = load_config("gpt_dpo", ["++model.micro_batch_size=2", "+model.global_batch_size=64",
                                  "pretrained_checkpoint.restore_from_path=/models/sft.nemo",
                                  "++trainer.dpo.gradient_clip_val=0.5", "exp_manager.name=aligner_run",
                                  "trainer.precision=bf16-mixed", "trainer.dpo.val_check_interval=0.1",
                                  "trainer.dpo.limit_val_batches=1.0",
                                  "model.data.data_prefix={train: [a.jsonl], validation: [b.jsonl], test: [b.jsonl]}"])
    assert (cfg.model.micro_batch_size, cfg.model.global_batch_size) == (2, 64)
    assert cfg.model.restore_from_path == "/models/sft.nemo" and "pretrained_checkpoint" not in cfg
    assert cfg.trainer.gradient_clip_val == 0.5 and cfg.name == "aligner_run" and cfg.trainer.precision == "bf16"
    assert cfg.trainer.dpo.val_check_interval == 0.1 and cfg.trainer.dpo.limit_val_batches == 1.0
    assert list(cfg.model.data.data_prefix.test) == ["b.jsonl"]
    for spelled, ours in ((32, "fp32"), ("32-true", "fp32"), ("bf16-true", "bf16"), ("bf16", "bf16")):
        assert load_config("gpt_dpo", [f"trainer.precision={spelled}"]).trainer.precision == ours
    for spelled, read_as in (("16-mixed", "'16-mixed'"), ("16", "16")):
        assert answer(f"trainer.precision={spelled}").startswith(
            f"trainer.precision must be one of ['fp32', 'bf16'], got {read_as}: fp16 training is not supported by nemo-dpo")
    with pytest.raises(ConfigError, match=r"^pretrained_checkpoint.restore_from_path is NeMo-Aligner's name for "
                                          r"model.restore_from_path: give one of them, not both$"):
        load_config("gpt_dpo", ["pretrained_checkpoint.restore_from_path=/a.nemo", "model.restore_from_path=/b"])


@pytest.mark.parametrize("overrides, world, per_node, message", [
    (["trainer.num_nodes=1", "trainer.devices=8"], 8, "8", None),
    (["trainer.num_nodes=2", "trainer.devices=4"], 8, "4", None),
    (["trainer.devices=8"], 16, "8", None),
    (["trainer.num_nodes=1", "trainer.devices=8"], 2, "2",
     "trainer.devices is 8, but 2 processes were started on this node (torchrun --nproc_per_node 2)"),
    (["trainer.num_nodes=2"], 2, "2",
     "trainer.num_nodes (2) x trainer.devices (2) = 4 processes, but the run has 2"),
    (["trainer.num_nodes=1", "trainer.devices=8"], 2, None,
     "trainer.num_nodes (1) x trainer.devices (8) = 8 processes, but the run has 2"),
    (["trainer.devices=3"], 2, None, "trainer.devices is 3, but the run has 2 processes"),
])
def test_nodes_and_devices_are_checked_against_the_launch(monkeypatch, overrides, world, per_node, message):
    if per_node is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
    cfg = load_config("gpt_dpo", [*overrides, "model.global_batch_size=64", "model.micro_batch_size=2"])
    if message is None:
        validate(cfg, world)
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(cfg, world)
    validate(cfg, world, training=False)  # checking data or converting a model launches nothing


def test_fractions_of_an_epoch_and_of_the_validation_split_as_aligner_reads_them():
    assert steps_between_validations(0.1, 125) == 12 and steps_between_validations(0.001, 125) == 1
    assert steps_between_validations(25, 125) == 25 and steps_between_validations(0, 125) == 0
    assert steps_between_validations(1.0, 125) == 125
    assert validation_batches_used(1.0, 7) == 7 and validation_batches_used(0.5, 7) == 3
    assert validation_batches_used(0.01, 7) == 1 and validation_batches_used(-1, 7) == 7
    assert validation_batches_used(3, 7) == 3 and validation_batches_used(9, 7) == 7
    for value in ("1.5", "-0.5", "0.0"):
        message = answer_after_validation(f"trainer.dpo.val_check_interval={value}")
        assert message.startswith("trainer.dpo.val_check_interval") and value in message
        assert "0 (only at the end) or >= 1 (steps); or in (0, 1] (a fraction of an epoch)" in message
