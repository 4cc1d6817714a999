"""Bad configuration fails before any work starts, with a message naming the key and the values."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import DictConfig, OmegaConf

from nemo_dpo.cli import train as train_cli
from nemo_dpo.config import RANGE_OWNERS, RANGES, ConfigError, load_config, prepare, validate

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
    validate(load_config("gpt_dpo_lora"), 2)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_fine_tuning_config_is_valid_and_lists_only_what_differs():
    """conf/gpt_dpo_hf.yaml: NeMo-Aligner's fine-tuning optimizer for pretrained starts, on top of gpt_dpo.yaml."""
    base = load_config("gpt_dpo")
    for world_size in (1, 2, 8):
        validate(load_config("gpt_dpo_hf"), world_size)
    raw = OmegaConf.load(os.path.join(ROOT, "conf", "gpt_dpo_hf.yaml"))
    assert raw.pop("base_config") == "gpt_dpo"
    for key, value in _leaves(raw):
        assert OmegaConf.select(base, key) != value, f"gpt_dpo_hf.yaml repeats gpt_dpo.yaml's {key}: {value!r}"
    tuned = load_config("gpt_dpo_hf").model
    assert tuned.optim.lr == 9e-6 and tuned.optim.sched.warmup_steps == 10 and tuned.dpo.ref_policy_kl_penalty == 0.1


@pytest.mark.parametrize(
    "overrides, world_size, pattern",
    [
        (["model.tensor_model_parallel_size=2"], 3, r"world size 3 is not divisible by model.tensor_model_parallel_size \(2\) x model.pipeline_model_parallel_size \(1\)"),
        (["model.pipeline_model_parallel_size=3"], 4, r"world size 4 .* model.pipeline_model_parallel_size \(3\) = 3"),
        (["model.num_attention_heads=6", "model.hidden_size=120", "model.tensor_model_parallel_size=4"], 4, r"model.num_attention_heads \(6\) is not divisible by model.tensor_model_parallel_size \(4\)"),
        (["model.hidden_size=130"], 1, r"model.hidden_size \(130\) is not divisible by model.num_attention_heads \(4\); set model.kv_channels"),
        (["model.kv_channels=0"], 1, r"model.kv_channels must be >= 1 or null, got 0"),
        (["model.kv_channels=abc"], 1, r"model.kv_channels must be >= 1 or null, got 'abc'"),
        (["model.kv_channels=33"], 1, r"RoPE rotates pairs of channels: the head size must be even, got 33 \(model.kv_channels=33"),
        (["model.rope_scaling={rope_type: dynamic, factor: 2.0}"], 1, r"model.rope_scaling: rope_type must be one of \['linear', 'llama3', 'yarn'\] \(or rope_scaling null\), got 'dynamic'"),
        (["model.rope_scaling=4"], 1, r"model.rope_scaling must be a mapping of Hugging Face rope_parameters .*, got 4"),
        (["model.rope_scaling={rope_type: llama3, factor: 8.0}"], 1, r"model.rope_scaling: rope_type 'llama3' takes \['factor', 'high_freq_factor', 'low_freq_factor', 'original_max_position_embeddings'\]; got \['factor'\]"),
        (["model.rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 16, beta: 3}"], 1, r"rope_type 'yarn' takes \['factor', 'original_max_position_embeddings'\] and optionally \['attention_factor', .*\]; got \['beta', 'factor', 'original_max_position_embeddings'\]"),
        (["model.rope_scaling={rope_type: linear, factor: 0.5}"], 1, r"model.rope_scaling.factor must be >= 1, got 0.5"),
        (["model.rope_scaling={rope_type: linear, factor: fast}"], 1, r"model.rope_scaling.factor must be a positive number, got 'fast'"),
        (["model.rope_scaling={rope_type: llama3, factor: 8.0, low_freq_factor: 4, high_freq_factor: 1, original_max_position_embeddings: 64}"], 1, r"model.rope_scaling: low_freq_factor \(4\) must be below high_freq_factor \(1\)"),
        (["model.rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 16, truncate: 1}"], 1, r"model.rope_scaling.truncate must be true or false, got 1"),
        (["model.position_embedding_type=learned_absolute", "model.rope_scaling={rope_type: linear, factor: 2.0}"], 1, r"model.rope_scaling.rope_type='linear' needs model.position_embedding_type='rope', got 'learned_absolute'"),
        (["model.qk_layernorm=maybe"], 1, r"model.qk_layernorm: expected a boolean, got 'maybe'"),
        (["model.expert_model_parallel_size=2"], 2, r"model.expert_model_parallel_size=2 needs a mixture-of-experts model \(model.num_moe_experts\)"),
        (["model.num_moe_experts=4", "model.expert_model_parallel_size=2", "model.tensor_model_parallel_size=2"], 2, r"model.expert_model_parallel_size \(2\) must divide the data-parallel size 1 \(world size 2 / \(TP 2 x PP 1\)\)"),
        (["model.num_moe_experts=4", "model.expert_model_parallel_size=4", "model.context_parallel_size=2"], 4, r"model.expert_model_parallel_size \(4\) must divide the data-parallel size 2 \(world size 4 / \(TP 1 x PP 1 x CP 2\)\)"),
        (["model.num_moe_experts=3", "model.expert_model_parallel_size=2"], 2, r"model.num_moe_experts \(3\) is not divisible by model.expert_model_parallel_size \(2\)"),
        (["model.num_moe_experts=4", "model.moe_router_topk=5"], 1, r"model.moe_router_topk \(5\) exceeds model.num_moe_experts \(4\)"),
        (["model.num_moe_experts=4", "model.moe_ffn_hidden_size=33", "model.tensor_model_parallel_size=2"], 2, r"the experts' hidden size 33 \(model.moe_ffn_hidden_size, or model.ffn_hidden_size when null\) is not divisible by model.tensor_model_parallel_size \(2\)"),
        (["model.num_moe_experts=4", "model.bias=true"], 1, r"model.bias=true with model.num_moe_experts"),
        (["model.recompute_modules=[swiglu]", "model.activation=gelu"], 1,
         r"model.recompute_modules names swiglu, but model.activation is 'gelu'"),
        (["model.recompute_modules=[core_attn,mlp]", "model.num_moe_experts=4"], 1,
         r"model.recompute_modules: \['mlp'\] recompute the dense MLP, and model.num_moe_experts=4 has experts"),
        (["model.num_moe_experts=4", "model.peft.peft_scheme=lora", "model.peft.lora_tuning.target_modules=[attention_qkv,mlp_fc1]"], 1, r"model.peft.lora_tuning.target_modules: \['mlp_fc1'\] adapt a dense MLP"),
        (["model.num_query_groups=3"], 1, r"model.num_query_groups \(3\) must divide model.num_attention_heads \(4\)"),
        (["model.global_batch_size=30"], 2, r"model.global_batch_size \(30\) is not divisible by model.micro_batch_size \(4\) x data-parallel size \(2\) = 8"),
        (["model.dpo.preference_loss=bco"], 1, r"model.dpo.preference_loss must be one of \['dpo', 'ipo', 'rpo_fwd_kl', 'rpo_bwd_kl', 'rpo_sq', 'sigmoid', 'hinge', 'robust', 'exo_pair', 'nca_pair', 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', 'discopop', 'sigmoid_norm', 'sft', 'simpo', 'cpo', 'orpo', 'kto'\], or a non-empty list of distinct such values, got 'bco'"),
        (["model.dpo.preference_loss=[dpo,kto]"], 1, r"model.dpo.preference_loss: a list is a mixture of distinct paired losses with a reference"),
        (["model.dpo.preference_loss=kto", "model.dpo.sft_loss_weight=0.5"], 1, r"model.dpo.sft_loss_weight must be 0.0 for kto \(TRL's KTO has no such option\), got 0.5"),
        (["model.dpo.desirable_weight=2.0"], 1, r"model.dpo.desirable_weight=2.0 does not apply to \['dpo'\]; it applies to \['kto'\]"),
        (["model.dpo.preference_loss=kto", "model.dpo.undesirable_weight=-1"], 1, r"model.dpo.undesirable_weight must be a finite number >= 0, got -1"),
        (["model.dpo.preference_loss=kto", "model.micro_batch_size=1"], 1, r"model.micro_batch_size must be >= 2 for kto, got 1: an example's KL completion is another completion"),
        (["model.dpo.preference_loss=kto", "model.dpo.use_weighting=true"], 1, r"model.dpo.use_weighting=True does not apply to \['kto'\]"),
        (["model.data.data_prefix.train=/nonexistent/train.jsonl"], 1, r"model.data.data_prefix.train: file /nonexistent/train.jsonl does not exist"),
        (["model.data.data_prefix.validation=/nonexistent/val.jsonl"], 1, r"model.data.data_prefix.validation: file /nonexistent/val.jsonl does not exist"),
        (["model.num_layers=3", "model.pipeline_model_parallel_size=2"], 2, r"model.num_layers \(3\) is not divisible by model.pipeline_model_parallel_size \(2\)"),
        (["model.activation=relu"], 1, r"model.activation must be one of \['gelu', 'gelu_tanh', 'swiglu'\], got 'relu'"),
        (["model.optim.name=sgd"], 1, r"model.optim.name must be one of .*got 'sgd'"),
        (["model.optim.sched.name=WarmupHold"], 1, r"model.optim.sched.name must be 'CosineAnnealing', got 'WarmupHold'"),
        (["model.data.overflow=wrap"], 1, r"model.data.overflow must be one of \['truncate_prompt', 'drop'\], got 'wrap'"),
        (["model.encoder_seq_length=128"], 1, r"model.encoder_seq_length \(128\) exceeds model.max_position_embeddings \(64\)"),
        (["model.tokenizer.model=/no/such/tokenizer.model"], 1, r"model.tokenizer.model: /no/such/tokenizer.model does not exist"),
        (["trainer.dpo.nan_policy=ignore"], 1, r"trainer.dpo.nan_policy must be one of \['skip_step', 'stop'\], got 'ignore'"),
        (["trainer.distributed_timeout_minutes=0"], 1, r"trainer.distributed_timeout_minutes must be a finite number > 0, got 0"),
        (["model.data.on_bad_record=drop"], 1, r"model.data.on_bad_record must be one of \['error', 'skip'\], got 'drop'"),
        (["model.make_vocab_size_divisible_by=90", "model.tensor_model_parallel_size=4", "model.ffn_hidden_size=512"], 4, r"model.make_vocab_size_divisible_by \(90\) must be divisible by model.tensor_model_parallel_size \(4\)"),
        (["model.optim.sched.min_lr=0.01"], 1, r"model.optim.sched.min_lr \(0.01\) must be <= model.optim.lr \(0.001\)"),
        (["model.context_parallel_size=2"], 3, r"world size 3 is not divisible by .* x model.context_parallel_size \(2\) = 2"),
        (["model.context_parallel_size=3"], 3, r"model.encoder_seq_length \(64\) is not divisible by 2 x model.context_parallel_size \(3\) = 6"),
        (["model.context_parallel_size=2", "model.attention_dropout=0.1"], 2, r"model.context_parallel_size=2 without transformer-engine is ring attention, which has no attention dropout: model.attention_dropout must be 0, got 0.1"),
        (["model.sequence_parallel=true"], 2, r"model.sequence_parallel=true needs model.tensor_model_parallel_size > 1"),
        (["model.virtual_pipeline_model_parallel_size=2"], 2, r"model.virtual_pipeline_model_parallel_size=2 needs model.pipeline_model_parallel_size > 1"),
        (["model.virtual_pipeline_model_parallel_size=4", "model.pipeline_model_parallel_size=2"], 2, r"model.num_layers \(4\) is not divisible by model.pipeline_model_parallel_size \(2\) x model.virtual_pipeline_model_parallel_size \(4\) = 8"),
        (["model.virtual_pipeline_model_parallel_size=2", "model.pipeline_model_parallel_size=2", "model.global_batch_size=12"], 2, r"the microbatches of a step .* = 3\) must be a multiple of model.pipeline_model_parallel_size \(2\)"),
        (["model.dpo.preference_loss=[dpo,orpo]"], 1, r"model.dpo.preference_loss: a list is a mixture of distinct paired losses with a reference"),
        (["model.dpo.ld_alpha=2"], 1, r"model.dpo.ld_alpha must be in \[0, 1\] or null, got 2"),
        (["model.dpo.sync_ref_model=true", "model.dpo.reference_logprobs=precomputed"], 1, r"model.dpo.sync_ref_model=true moves the reference during training, so its log-probs cannot be precomputed"),
        (["model.dpo.sync_ref_model=true", "model.peft.peft_scheme=lora"], 1, r"model.dpo.sync_ref_model=true needs reference weights to move, but with model.peft.peft_scheme=lora the reference is the frozen base"),
    ],
)
def test_bad_values_are_named(overrides, world_size, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check(overrides, world_size)


def test_context_parallelism_on_a_gpu_needs_transformer_engine(monkeypatch):
    """The local attention's ring attention is CPU-only: a GPU without transformer-engine cannot do CP."""
    from nemo_dpo.models import gpt

    monkeypatch.setattr(gpt, "HAVE_TE", False)
    monkeypatch.setattr(gpt.torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"model.context_parallel_size=2 on GPU needs transformer-engine's attention"):
        check(["model.context_parallel_size=2"], 2)
    check([], 2)  # without CP it runs


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


def yaml_keys(node, prefix=""):
    """The dotted keys of a config that hold values (not sections)."""
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from yaml_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


YAML_KEYS = list(yaml_keys(OmegaConf.load(os.path.join(ROOT, "conf", "gpt_dpo.yaml"))))

# A value outside the range of each key of conf/gpt_dpo.yaml, as written on the command line.
OUT_OF_RANGE = {
    "name": "''",
    "trainer.dpo.max_epochs": "0",
    "trainer.dpo.max_steps": "0",
    "trainer.dpo.val_check_interval": "1.5",
    "trainer.dpo.limit_val_batches": "0.0",
    "trainer.dpo.log_interval": "0",
    "trainer.dpo.save_interval": "-5",
    "trainer.dpo.nan_policy": "ignore",
    "trainer.num_nodes": "0",
    "trainer.devices": "-1",
    "trainer.gradient_clip_val": "-1",
    "trainer.precision": "fp16",
    "trainer.distributed_timeout_minutes": "0",
    "trainer.enable_progress_bar": "maybe",
    "exp_manager.explicit_log_dir": "''",
    "exp_manager.resume_if_exists": "maybe",
    "exp_manager.create_tensorboard_logger": "maybe",
    "exp_manager.create_wandb_logger": "maybe",
    "exp_manager.wandb_logger_kwargs.project": "''",
    "exp_manager.wandb_logger_kwargs.name": "7",
    "checkpoint.keep_last_k": "-1",
    "checkpoint.async_save": "maybe",
    "model.seed": "-1",
    "model.restore_from_path": "7",
    "model.tensor_model_parallel_size": "0",
    "model.pipeline_model_parallel_size": "-1",
    "model.context_parallel_size": "0",
    "model.virtual_pipeline_model_parallel_size": "1",
    "model.sequence_parallel": "maybe",
    "model.micro_batch_size": "0",
    "model.global_batch_size": "0",
    "model.encoder_seq_length": "0",
    "model.max_position_embeddings": "0",
    "model.num_layers": "0",
    "model.hidden_size": "-64",
    "model.ffn_hidden_size": "0",
    "model.num_attention_heads": "0",
    "model.num_query_groups": "0",
    "model.position_embedding_type": "alibi",
    "model.rotary_base": "0",
    "model.normalization": "BatchNorm",
    "model.layernorm_epsilon": "0.0",
    "model.activation": "relu",
    "model.bias": "maybe",
    "model.share_embeddings_and_output_weights": "maybe",
    "model.hidden_dropout": "2.0",
    "model.attention_dropout": "-0.1",
    "model.init_method_std": ".nan",
    "model.activations_checkpoint_granularity": "partial",
    "model.activations_checkpoint_method": "random",
    "model.activations_checkpoint_num_layers": "0",
    "model.recompute_modules": "[swiglu,selective]",
    "model.vocab_size": "'32000'",
    "model.make_vocab_size_divisible_by": "0",
    "model.kv_channels": "0",
    "model.qkv_bias": "maybe",
    "model.qk_layernorm": "maybe",
    "model.rope_scaling": "linear",
    "model.expert_model_parallel_size": "0",
    "model.num_moe_experts": "0",
    "model.moe_router_topk": "0",
    "model.moe_ffn_hidden_size": "0",
    "model.moe_router_pre_softmax": "maybe",
    "model.moe_aux_loss_coeff": "-0.1",
    "model.fused_elementwise": "sometimes",
    "model.data.packing_min_saving": "1.5",
    "model.log_prob_chunk_size": "-1",
    "model.tokenizer.model": "''",
    "model.tokenizer.vocab_size": "10",
    "model.tokenizer.cache_dir": "''",
    "model.data.data_prefix.train": "5",
    "model.data.data_prefix.validation": "[]",
    "model.data.data_prefix.test": "[a.jsonl, 3]",
    "model.data.chat_template": "''",
    "model.data.implicit_prompt_delimiter": "''",
    "model.data.overflow": "wrap",
    "model.data.on_bad_record": "drop",
    "model.data.packing": "maybe",
    "model.data.share_prompts": "sometimes",
    "model.peft.peft_scheme": "qlora",
    "model.peft.lora_tuning.adapter_dim": "0",
    "model.peft.lora_tuning.alpha": "-8",
    "model.peft.lora_tuning.adapter_dropout": "1.0",
    "model.peft.lora_tuning.target_modules": "[attention_qkv,attention_qkv]",
    "model.dpo.preference_loss": "bco",
    "model.dpo.ref_policy_kl_penalty": "0",
    "model.dpo.preference_average_log_probs": "maybe",
    "model.dpo.sft_average_log_probs": "maybe",
    "model.dpo.preference_loss_weight": "-1",
    "model.dpo.sft_loss_weight": ".inf",
    "model.dpo.gt_reward_scale": "-2",
    "model.dpo.label_smoothing": "0.5",
    "model.dpo.preference_loss_weights": "[-1]",
    "model.dpo.f_divergence_type": "l2",
    "model.dpo.f_alpha_divergence_coef": "0",
    "model.dpo.ld_alpha": "2",
    "model.dpo.use_weighting": "maybe",
    "model.dpo.dpop_lambda": "-1",
    "model.dpo.discopop_tau": "0",
    "model.dpo.simpo_gamma": "-1",
    "model.dpo.cpo_alpha": "-1",
    "model.dpo.desirable_weight": "-1",
    "model.dpo.undesirable_weight": "-0.5",
    "model.dpo.sync_ref_model": "maybe",
    "model.dpo.ref_model_mixup_alpha": "2",
    "model.dpo.ref_model_sync_steps": "0",
    "model.dpo.reference_logprobs": "cached",
    "model.optim.name": "sgd",
    "model.optim.lr": "-1",
    "model.optim.weight_decay": "-0.1",
    "model.optim.betas": "[0.9]",
    "model.optim.eps": "0",
    "model.optim.use_distributed_optimizer": "maybe",
    "model.optim.sched.name": "WarmupHold",
    "model.optim.sched.warmup_steps": "-3",
    "model.optim.sched.min_lr": "-1e-5",
}


def test_every_key_has_one_range():
    assert sum(len(owner.RANGES) for owner in RANGE_OWNERS) == len(RANGES), "a key has ranges in two modules"
    assert sorted(set(RANGES) - set(YAML_KEYS)) == [], "ranges of keys that conf/gpt_dpo.yaml does not have"


@pytest.mark.parametrize("key", YAML_KEYS)
def test_a_value_out_of_range_is_named_with_the_key_and_the_range(key):
    assert key in RANGES, f"{key} has no range: declare it in the RANGES of the module that reads it"
    assert key in OUT_OF_RANGE, f"add a value outside {key}'s range ({RANGES[key]}) to OUT_OF_RANGE"
    override = f"{key}={OUT_OF_RANGE[key]}"
    value = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
    with pytest.raises(ConfigError) as err:
        validate(load_config("gpt_dpo", [override]), 1)
    message = str(err.value)
    assert message.startswith(key) and repr(value) in message and str(RANGES[key]) in message, message


@pytest.mark.parametrize(
    "value, message",
    [
        ("-1", "model.optim.lr must be a finite number > 0, got -1"),
        (".nan", "model.optim.lr must be a finite number > 0, got nan"),
        ("nan", "model.optim.lr: expected float, got 'nan' (allowed: a finite number > 0)"),
    ],
)
def test_the_message_reads_key_range_value(value, message):
    with pytest.raises(ConfigError) as err:
        check([f"model.optim.lr={value}"])
    assert str(err.value) == message


# config.json of a tiny Llama; the settings a model.restore_from_path folder brings.
LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                "intermediate_size": 128, "max_position_embeddings": 64, "vocab_size": 300}


@pytest.mark.parametrize(
    "patch, problem",
    [
        ({"vocab_size": "32000"}, "config.json: vocab_size must be int, got '32000'"),
        ({"hidden_size": -64}, "config.json: hidden_size must be an integer >= 1, got -64"),
        ({"num_attention_heads": 0}, "config.json: num_attention_heads must be an integer >= 1, got 0"),
    ],
)
def test_a_bad_size_in_config_json_is_named_before_work_starts(tmp_path, patch, problem):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **patch}))
    with pytest.raises(ConfigError) as err:
        prepare(load_config("gpt_dpo", [f"model.restore_from_path={tmp_path}"]), 1)
    assert str(err.value) == f"model.restore_from_path={tmp_path}: {problem}"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("model:\n  optim:\n    betas: [0.9, 0.95\n    lr: 1.0e-4\n",
         ":4:7: not valid YAML: did not find expected ',' or ']' (while parsing a flow sequence at 3:12)"),
        ("model:\n  optim:\n    lr: 1.0e-4\n   weight_decay: 0.1\n",
         ":4:4: not valid YAML: did not find expected key (while parsing a block mapping at 2:3)"),
        ("name: a\nname: b\n", ":2:1: not valid YAML: found duplicate key name (while constructing a mapping at 1:1)"),
        ("model:\n\tseed: 3\n", ":2:1: not valid YAML: found character that cannot start any token"),
        ("name: a\x00\n", ": not valid YAML: unacceptable character #x0000"),
        ("- name\n- model\n", ": expected a mapping of config keys, got a list"),
    ],
)
def test_a_config_file_that_is_not_yaml_is_named_with_line_and_column(tmp_path, text, problem):
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config("mine", [], tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'mine.yaml'}{problem}"), str(err.value)


def test_a_broken_base_config_or_non_utf8_file_is_named_from_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "parent.yaml").write_text("name: a\nmodel: {seed: 1\n")
    (tmp_path / "child.yaml").write_text("base_config: parent\nname: b\n")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    monkeypatch.setattr(train_cli, "init_distributed", lambda *a: pytest.fail("training started"))
    assert train_cli.main(["--config-path", str(tmp_path), "--config-name", "child"]) == 2
    assert f"config error: {tmp_path / 'parent.yaml'}:3:1: not valid YAML: " in capsys.readouterr().err
    assert train_cli.main(["--config-path", str(tmp_path), "--config-name", "latin1"]) == 2
    assert f"config error: {tmp_path / 'latin1.yaml'}: not valid YAML: 'utf-8' codec can't decode" in capsys.readouterr().err


def test_a_section_given_as_a_value_names_the_section():
    with pytest.raises(ConfigError, match=r"^model.data.data_prefix: expected a mapping of its keys \(train, validation, test\), "
                                          r"got \['a.jsonl', 'b.jsonl'\]$"):
        load_config("gpt_dpo", ["model.data.data_prefix=[a.jsonl,b.jsonl]"])
    with pytest.raises(ConfigError, match=r"^model.optim: expected a mapping of its keys \(name, lr, weight_decay, betas, "
                                          r"\.\.\.\), got 'adamw'$"):
        load_config("gpt_dpo", ["model.optim=adamw"])


def test_a_log_dir_that_cannot_be_created_is_a_config_error_before_work_starts(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where the log dir's parent should be")
    with pytest.raises(ConfigError) as err:
        check([f"exp_manager.explicit_log_dir={blocker}/log"])
    assert str(err.value) == (f"exp_manager.explicit_log_dir: the log dir {blocker}/log cannot be created and written: "
                              f"{blocker}: a file, not a folder")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("")  # the default log dir is ./runs/<name>
    with pytest.raises(ConfigError) as err:
        check([])
    assert str(err.value) == ("exp_manager.explicit_log_dir: the log dir runs/megatron_gpt_dpo (exp_manager.explicit_log_dir "
                              f"is null: runs/<name>) cannot be created and written: {tmp_path / 'runs'}: a file, not a folder")
    validate(load_config("gpt_dpo"), 1, training=False)  # converting a model or checking data writes no log dir

    monkeypatch.setattr(train_cli, "init_distributed", lambda *a: pytest.fail("training started"))
    assert train_cli.main([f"exp_manager.explicit_log_dir={blocker}/log"]) == 2
    assert "config error: exp_manager.explicit_log_dir: the log dir" in capsys.readouterr().err

    check([f"exp_manager.explicit_log_dir={tmp_path}/new/run"])  # can be created: fine, and nothing is made yet
    assert not (tmp_path / "new").exists()


def test_a_read_only_log_dir_is_a_config_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o555 folder anyway; the log dir under a file covers this case as root")
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConfigError) as err:
            check([f"exp_manager.explicit_log_dir={parent}/run"])
    finally:
        parent.chmod(0o755)
    assert str(err.value) == (f"exp_manager.explicit_log_dir: the log dir {parent}/run cannot be created and written: "
                              f"{parent}: Permission denied")


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
