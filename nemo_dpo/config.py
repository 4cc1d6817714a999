"""Load a YAML config, apply ``key=value`` overrides, and validate it before any work starts.

The YAML under ``conf/`` is the single source of defaults. Overrides use OmegaConf's
dotlist syntax (as Hydra and NeMo do); an unknown key or a value of the wrong type
is an error that names the key, rather than a silently ignored typo.

This module is the composition root: only the command-line programs import it.
Each package owns the checks of its own keys: the range of every key it reads
(its ``RANGES`` table, see nemo_dpo/ranges.py) and the rules between keys
(functions raising ``ValueError`` that names the keys). :func:`validate` checks
every key against its range, then runs the rules, and reports the first problem
as a ``ConfigError``.
"""

import difflib
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_dpo import losses
from nemo_dpo.data import batching, pipeline
from nemo_dpo.distributed import init, layout
from nemo_dpo.losses import preference
from nemo_dpo.models import gpt, lora
from nemo_dpo.ranges import check
from nemo_dpo.training import checkpoint, dpo_step, initial_policy, log_dir, metrics_log, optimizer, reference, trainer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# The modules that read config keys, each with the RANGES of its keys; every key of conf/gpt_dpo.yaml is in one.
RANGE_OWNERS = (layout, init, gpt, lora, batching, pipeline, preference, dpo_step, reference, optimizer, trainer,
                checkpoint, metrics_log, log_dir, initial_policy)
RANGES = {key: allowed for owner in RANGE_OWNERS for key, allowed in owner.RANGES.items()}


class ConfigError(ValueError):
    """A configuration problem, reported before training starts."""


def _check_types(merged, base, prefix=""):
    """Each value of the type of its default (an int will do for a float); the range checks come later."""
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
            allowed = f" (allowed: {RANGES[path]})" if path in RANGES else ""
            raise ConfigError(f"{path}: expected {type(default).__name__}, got {value!r}{allowed}")


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


def _check_sections(base: DictConfig, patch: DictConfig, prefix="") -> None:
    """A section of ``base`` (a mapping of keys) is given as a mapping in ``patch`` too, not as a value or a list."""
    for key, value in patch.items():
        if key not in base:
            continue  # the merge names it, with a suggestion
        path = f"{prefix}{key}"
        if isinstance(base[key], DictConfig):
            if not isinstance(value, DictConfig):
                names = list(base[key].keys())
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise ConfigError(f"{path}: expected a mapping of its keys ({shown}), got {value!r}")
            _check_sections(base[key], value, path + ".")


def _merge_known_keys(base: DictConfig, patch: DictConfig, describe) -> DictConfig:
    """``patch`` over ``base``, where every key of ``patch`` must exist in ``base`` (with a did-you-mean)."""
    _check_sections(base, patch)
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, patch)
    except Exception as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(describe(key) + _did_you_mean(key, base)) from err


def _read_yaml(path: Path) -> DictConfig:
    """A config file's keys; a file that is not YAML is named with the line and column where reading stopped."""
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        where, started = err.problem_mark, err.context_mark
        context = f" ({err.context} at {started.line + 1}:{started.column + 1})" if err.context and started else ""
        problem = f"not valid YAML: {err.problem}{context}"
        raise ConfigError(f"{path}:{where.line + 1}:{where.column + 1}: {problem}") from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a list")
    return node


def load_config(config_name: str = "gpt_dpo", overrides=(), config_dir=CONF_DIR) -> DictConfig:
    """``<config_dir>/<config_name>.yaml`` with dotlist overrides applied.

    A config may start from another with ``base_config: <name>`` and list only
    what differs (conf/gpt_dpo_lora.yaml does).
    """
    path = Path(config_dir) / f"{config_name}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (--config-path / --config-name)")
    base = _read_yaml(path)
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


def prepare(cfg: DictConfig, world_size: int, training: bool = True) -> list:
    """Adopt ``model.restore_from_path``'s architecture and tokenizer, then validate (see :func:`validate`).

    The keys are in range before the folder is read, and checked again with
    what it brought. Returns the config changes the initial policy made, one line each.
    """
    try:
        check_ranges(cfg)
        changes = initial_policy.resolve(cfg.model)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from err
    validate(cfg, world_size, training)
    return changes


def check_ranges(cfg: DictConfig) -> None:
    """Every key in its range (ValueError naming the key, the range and the value)."""
    for key, allowed in RANGES.items():
        check(key, OmegaConf.select(cfg, key), allowed)


def validate(cfg: DictConfig, world_size: int, training: bool = True) -> None:
    """Everything that can be checked without building the model; raises ConfigError.

    ``training``: the log dir will be written too (converting a model or checking data writes elsewhere).
    """
    model = cfg.model
    try:
        check_ranges(cfg)
        dp = layout.check_layout(
            world_size, model.tensor_model_parallel_size, model.pipeline_model_parallel_size,
            model.expert_model_parallel_size,
        )
        gpt.check_model_config(model)
        lora.check_lora_config(model)
        losses.build_loss(model.dpo)
        batching.check_batch_sizes(model.micro_batch_size, model.global_batch_size, dp)
        optimizer.check_optim_config(model.optim)
        metrics_log.check_logging(cfg)
        pipeline.check_data_config(model)
        if training:
            log_dir.check_log_dir(cfg)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from err
