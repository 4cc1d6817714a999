"""Load a YAML config, apply ``key=value`` overrides, and validate it before any work starts.

The YAML under ``conf/`` is the single source of defaults. Overrides use OmegaConf's
dotlist syntax (as Hydra and NeMo do); an unknown key or a value of the wrong type
is an error that names the key, rather than a silently ignored typo.

This module is the composition root: only the command-line programs import it.
Each package owns the checks of its own keys (raising ``ValueError`` that names
the key); :func:`validate` calls them all and reports the first as a ``ConfigError``.
"""

import difflib
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_dpo.data.batching import check_batch_sizes
from nemo_dpo.data.pipeline import check_data_config
from nemo_dpo.distributed.layout import check_layout
from nemo_dpo.losses import build_loss
from nemo_dpo.models.gpt import check_model_config, check_precision
from nemo_dpo.models.lora import check_peft_config
from nemo_dpo.training.initial_policy import resolve
from nemo_dpo.training.metrics_log import check_logging
from nemo_dpo.training.optimizer import check_optim_config
from nemo_dpo.training.reference import check_reference_config
from nemo_dpo.training.trainer import check_trainer_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration problem, reported before training starts."""


# Keys whose value is a name or a list of names (model.dpo.preference_loss: one loss or a weighted mixture).
NAME_OR_LIST_KEYS = {"model.dpo.preference_loss"}


def _check_types(merged, base, prefix=""):
    for key, default in base.items():
        path = f"{prefix}{key}"
        value = merged[key]
        if isinstance(default, DictConfig):
            _check_types(value, default, path + ".")
        elif default is None or value is None:
            continue
        elif path in NAME_OR_LIST_KEYS and isinstance(value, ListConfig):
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
        build_loss(model.dpo)
        check_batch_sizes(model.micro_batch_size, model.global_batch_size, dp)
        check_optim_config(model.optim)
        check_trainer_config(cfg.trainer)
        check_precision(cfg.trainer.precision)
        check_reference_config(model)
        check_peft_config(model.peft)
        check_logging(cfg)
        check_data_config(model)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from err
