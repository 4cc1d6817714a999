"""Load a YAML config, apply ``key=value`` overrides, and validate it before any work starts.

The YAML under ``conf/`` is the single source of defaults. Overrides use OmegaConf's
dotlist syntax (as Hydra and NeMo do); an unknown key or a value of the wrong type
is an error that names the key, rather than a silently ignored typo.
"""

import difflib
import importlib.util
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_dpo.data.chat_template import ChatTemplate, template_source
from nemo_dpo.data.default_task import DEFAULT_DATA_DIR
from nemo_dpo.data.preference_dataset import BAD_RECORD_POLICIES
from nemo_dpo.data.readers import data_format, needs_pyarrow, pyarrow_missing
from nemo_dpo.distributed.init import check_layout
from nemo_dpo.losses.preference import PreferenceLossConfig
from nemo_dpo.models.gpt import check_model_config
from nemo_dpo.models.lora import TARGETS
from nemo_dpo.training.initial_policy import resolve
from nemo_dpo.training.optimizer import OPTIMIZERS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration problem, reported before training starts."""


def _check_types(merged, base, prefix=""):
    for key, default in base.items():
        path = f"{prefix}{key}"
        value = merged[key]
        if isinstance(default, DictConfig):
            _check_types(value, default, path + ".")
        elif default is None or value is None:
            continue
        elif isinstance(default, bool) != isinstance(value, bool):
            raise ConfigError(f"{path}: expected a boolean, got {value!r}")
        elif isinstance(default, float) and isinstance(value, (int, float)):
            continue
        elif isinstance(default, ListConfig) and isinstance(value, ListConfig):
            continue
        elif type(default) is not type(value):
            raise ConfigError(f"{path}: expected {type(default).__name__}, got {value!r}")


def _dotted_keys(node, prefix=""):
    for key, value in node.items():
        yield f"{prefix}{key}"
        if isinstance(value, DictConfig):
            yield from _dotted_keys(value, f"{prefix}{key}.")


# Names other DPO frameworks use for our keys (TRL's and NeMo-RL's beta is our KL penalty).
ALIASES = {"beta": "ref_policy_kl_penalty"}


def _did_you_mean(key: str, base: DictConfig) -> str:
    """' (did you mean 'x'?)': the closest key in the same section, else the same name in another section."""
    section, _, leaf = str(key).rpartition(".")
    node = OmegaConf.select(base, section) if section else base
    suggestion = None
    if isinstance(node, DictConfig):
        names = list(node.keys())
        close = [ALIASES[leaf]] if ALIASES.get(leaf) in names else difflib.get_close_matches(leaf, names, 1, 0.6)
        if close:
            suggestion = f"{section}.{close[0]}" if section else close[0]
    if suggestion is None:
        elsewhere = [k for k in _dotted_keys(base) if k.endswith("." + leaf)]
        suggestion = elsewhere[0] if len(elsewhere) == 1 else None
    return f" (did you mean {suggestion!r}?)" if suggestion else ""


def _merge_known_keys(base: DictConfig, patch: DictConfig, describe) -> DictConfig:
    """``patch`` over ``base``, where every key of ``patch`` must exist in ``base`` (with a did-you-mean)."""
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, patch)
    except Exception as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(describe(key) + _did_you_mean(key, base)) from err


def load_config(config_name: str = "gpt_dpo", overrides=(), config_dir=CONF_DIR) -> DictConfig:
    """``<config_dir>/<config_name>.yaml`` with dotlist overrides applied.

    A config may start from another with ``base_config: <name>`` and list only
    what differs (conf/gpt_dpo_lora.yaml does).
    """
    path = Path(config_dir) / f"{config_name}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (--config-path / --config-name)")
    base = OmegaConf.load(path)
    if "base_config" in base:
        parent = load_config(base.pop("base_config"), (), config_dir)
        base = _merge_known_keys(parent, base, lambda key: f"{path}: key {key!r} is not in the base config")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        patch = OmegaConf.from_dotlist(list(overrides))
    except Exception as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from err
    cfg = _merge_known_keys(base, patch, lambda key: f"unknown config key {key!r} (not in {path})")
    _check_types(cfg, base)
    OmegaConf.set_struct(cfg, False)
    return cfg


def preference_loss_config(cfg: DictConfig) -> PreferenceLossConfig:
    settings = OmegaConf.to_container(cfg.model.dpo)
    settings.pop("reference_logprobs")  # where the reference comes from, not part of the loss
    return PreferenceLossConfig(**settings)


def data_files(cfg: DictConfig) -> dict:
    """Training and validation JSONL paths; the embedded default where unset."""
    prefix = cfg.model.data.data_prefix
    files = {
        "train": prefix.train or os.path.join(DEFAULT_DATA_DIR, "train.jsonl"),
        "validation": prefix.validation or os.path.join(DEFAULT_DATA_DIR, "validation.jsonl"),
    }
    for split, file in files.items():
        if not os.path.isfile(file):
            raise ConfigError(f"model.data.data_prefix.{split}: file {file} does not exist")
        try:
            data_format(file)
        except ValueError as err:
            raise ConfigError(f"model.data.data_prefix.{split}: {err}") from err
        if needs_pyarrow(file) and pyarrow_missing():
            raise ConfigError(f"model.data.data_prefix.{split}: {pyarrow_missing()}")
    return files


def prepare(cfg: DictConfig, world_size: int) -> list:
    """Adopt ``model.restore_from_path``'s architecture and tokenizer, then validate.

    Returns the config changes the initial policy made, one line each.
    """
    try:
        changes = resolve(cfg.model)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from err
    validate(cfg, world_size)
    return changes


def validate(cfg: DictConfig, world_size: int) -> None:
    """Everything that can be checked without building the model; raises ConfigError."""
    model = cfg.model
    try:
        dp = check_layout(world_size, model.tensor_model_parallel_size, model.pipeline_model_parallel_size)
        check_model_config(model)
        preference_loss_config(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for key in ("micro_batch_size", "global_batch_size", "encoder_seq_length"):
        if model[key] < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {model[key]}")
    per_step = model.micro_batch_size * dp
    if model.global_batch_size % per_step != 0:
        raise ConfigError(
            f"model.global_batch_size ({model.global_batch_size}) is not divisible by "
            f"model.micro_batch_size ({model.micro_batch_size}) x data-parallel size ({dp}) = {per_step}"
        )
    if model.optim.name not in OPTIMIZERS:
        raise ConfigError(f"model.optim.name must be one of {list(OPTIMIZERS)}, got {model.optim.name!r}")
    if cfg.trainer.distributed_timeout_minutes <= 0:
        raise ConfigError(
            f"trainer.distributed_timeout_minutes must be positive, got {cfg.trainer.distributed_timeout_minutes}"
        )
    if cfg.trainer.dpo.nan_policy not in ("skip_step", "stop"):
        raise ConfigError(f"trainer.dpo.nan_policy must be 'skip_step' or 'stop', got {cfg.trainer.dpo.nan_policy!r}")
    if cfg.trainer.precision not in ("fp32", "bf16"):
        raise ConfigError(f"trainer.precision must be 'fp32' or 'bf16', got {cfg.trainer.precision!r}")
    if model.dpo.reference_logprobs not in ("online", "precomputed"):
        raise ConfigError(
            f"model.dpo.reference_logprobs must be 'online' or 'precomputed', got {model.dpo.reference_logprobs!r}"
        )
    if model.peft.peft_scheme not in ("none", "lora"):
        raise ConfigError(f"model.peft.peft_scheme must be 'none' or 'lora', got {model.peft.peft_scheme!r}")
    if model.peft.peft_scheme == "lora":
        lora = model.peft.lora_tuning
        unknown = sorted(set(lora.target_modules) - set(TARGETS))
        if unknown or not lora.target_modules:
            raise ConfigError(
                f"model.peft.lora_tuning.target_modules: got {list(lora.target_modules)}, expected a non-empty "
                f"list of {sorted(TARGETS)}"
            )
        if lora.adapter_dim < 1:
            raise ConfigError(f"model.peft.lora_tuning.adapter_dim must be >= 1, got {lora.adapter_dim}")
    if model.optim.sched.name != "CosineAnnealing":
        raise ConfigError(f"model.optim.sched.name must be 'CosineAnnealing', got {model.optim.sched.name!r}")
    if model.data.on_bad_record not in BAD_RECORD_POLICIES:
        raise ConfigError(
            f"model.data.on_bad_record must be one of {list(BAD_RECORD_POLICIES)}, got {model.data.on_bad_record!r}"
        )
    if model.data.overflow not in ("truncate_prompt", "drop"):
        raise ConfigError(
            f"model.data.overflow must be one of ['truncate_prompt', 'drop'], got {model.data.overflow!r}"
        )
    check_logging(cfg)
    data_files(cfg)
    tokenizer = cfg.model.tokenizer.model
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"model.tokenizer.model: {tokenizer} does not exist (a tokenizer.model file or a folder)")
    check_record_options(model)


def check_record_options(model: DictConfig) -> None:
    """The chat template (from the config or the tokenizer folder) compiles; the implicit-prompt delimiter is usable."""
    delimiter = model.data.implicit_prompt_delimiter
    if delimiter is not None and not (isinstance(delimiter, str) and delimiter):
        raise ConfigError(f"model.data.implicit_prompt_delimiter must be a non-empty string or null, got {delimiter!r}")
    try:
        source = template_source(model.data.chat_template, model.tokenizer.model)
        if source is not None:
            ChatTemplate(*source, special_tokens={})
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from err


def check_logging(cfg: DictConfig) -> None:
    """Console and logger keys; an enabled logger whose package is missing fails here, not at its first write."""
    if cfg.trainer.dpo.log_interval < 1:
        raise ConfigError(f"trainer.dpo.log_interval must be >= 1, got {cfg.trainer.dpo.log_interval}")
    exp_manager = cfg.exp_manager
    for key, package in (("create_tensorboard_logger", "tensorboard"), ("create_wandb_logger", "wandb")):
        if exp_manager[key] and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"exp_manager.{key}=true needs the {package} package, which is not installed: "
                f"pip install {package} (or set exp_manager.{key}=false)"
            )
    kwargs = exp_manager.wandb_logger_kwargs
    if exp_manager.create_wandb_logger and not (isinstance(kwargs.project, str) and kwargs.project):
        raise ConfigError(f"exp_manager.wandb_logger_kwargs.project must be a non-empty string, got {kwargs.project!r}")
    if kwargs.name is not None and not isinstance(kwargs.name, str):
        raise ConfigError(f"exp_manager.wandb_logger_kwargs.name must be a string or null, got {kwargs.name!r}")
