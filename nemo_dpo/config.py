"""Load a YAML config, apply ``key=value`` overrides, and validate it before any work starts.

The YAML under ``conf/`` is the single source of defaults. Overrides use OmegaConf's
dotlist syntax (as Hydra and NeMo do; Hydra's ``+key=value`` and ``++key=value``
are read as ``key=value``); an unknown key or a value of the wrong type is an
error that names the key, rather than a silently ignored typo. NeMo-Aligner's
spellings of keys are taken as nemo-dpo's, and a setting of NeMo-Aligner or
TRL that has no counterpart is named as such (nemo_dpo/peer_keys.py).

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

from nemo_dpo import losses, peer_keys
from nemo_dpo.data import batching, packing, pipeline
from nemo_dpo.distributed import init, layout
from nemo_dpo.losses import preference
from nemo_dpo.models import fusion, gpt, lora
from nemo_dpo.ranges import check
from nemo_dpo.training import checkpoint, dpo_step, initial_policy, log_dir, metrics_log, optimizer, reference, trainer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# The modules that read config keys, each with the RANGES of its keys; every key of conf/gpt_dpo.yaml is in one.
RANGE_OWNERS = (layout, init, gpt, fusion, lora, batching, packing, pipeline, preference, dpo_step, reference, optimizer,
                trainer, checkpoint, metrics_log, log_dir, initial_policy)
RANGES = {key: allowed for owner in RANGE_OWNERS for key, allowed in owner.RANGES.items()}


class ConfigError(ValueError):
    """A configuration problem, reported before training starts."""


# Keys whose value is a name or a list of names (model.dpo.preference_loss: one loss or a weighted mixture).
NAME_OR_LIST_KEYS = {"model.dpo.preference_loss"}


def _check_types(merged, base, prefix=""):
    """Each value of the type of its default (an int will do for a float, and any value its range admits: a fraction
    of an epoch for a number of steps); the range checks come later."""
    for key, default in base.items():
        path = f"{prefix}{key}"
        value = merged[key]
        if isinstance(default, DictConfig):
            _check_types(value, default, path + ".")
        elif default is None or value is None:
            continue
        elif path in NAME_OR_LIST_KEYS and isinstance(value, ListConfig):
            continue
        elif path in RANGES and RANGES[path].admits(value):
            continue  # a value of another type than the default's that the key allows (true for packing's auto)
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


_ABSENT = object()


def _has(node: DictConfig, key: str) -> bool:
    return OmegaConf.select(node, key, default=_ABSENT) is not _ABSENT


def _did_you_mean(key: str, base: DictConfig) -> str:
    """' (did you mean 'x'?)': the key TRL's name stands for, else the closest key in the same section, else the
    same name in another section."""
    section, _, leaf = str(key).rpartition(".")
    node = OmegaConf.select(base, section) if section else base
    trl = peer_keys.TRL_KEYS.get(leaf)
    suggestion = trl if trl is not None and _has(base, trl) else None
    if suggestion is None and isinstance(node, DictConfig):
        close = difflib.get_close_matches(leaf, list(node.keys()), 1, 0.6)
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


def _unknown_key(key: str, base: DictConfig, source: Path) -> str:
    """What a key that is not in ``base`` is: a setting of NeMo-Aligner or TRL that nemo-dpo lacks, said as such,
    or else an unknown key with a did-you-mean."""
    for aligner, reason in peer_keys.ALIGNER_UNSUPPORTED.items():
        if key == aligner or key.startswith(aligner + "."):
            return f"NeMo-Aligner's {aligner} is not supported by nemo-dpo: {reason}"
    leaf = key.rpartition(".")[2]
    if leaf in peer_keys.TRL_UNSUPPORTED or (leaf in peer_keys.TRL_KEYS and not _has(base, peer_keys.TRL_KEYS[leaf])):
        reason = peer_keys.TRL_UNSUPPORTED.get(leaf, peer_keys.NO_LOSS_TAKES_IT)
        return f"TRL's {leaf} is not supported by nemo-dpo: {reason}"
    return f"unknown config key {key!r} (not in {source})" + _did_you_mean(key, base)


def _merge_known_keys(base: DictConfig, patch: DictConfig, describe) -> DictConfig:
    """``patch`` over ``base``, where every key of ``patch`` must exist in ``base`` (``describe`` says what one
    that does not is)."""
    _check_sections(base, patch)
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, patch)
    except Exception as err:
        raise ConfigError(describe(getattr(err, "full_key", None) or str(err))) from err


def _without_hydra_prefix(item: str) -> str:
    """Hydra's ``+key=value`` (add a key) and ``++key=value`` (add or override), as NeMo-Aligner's commands write
    them: ``key=value`` here, where every key is already in the config."""
    return item[2:] if item.startswith("++") else item[1:] if item.startswith("+") else item


def _adopt_aligner_spellings(patch: DictConfig) -> None:
    """NeMo-Aligner's name of a key (``pretrained_checkpoint.restore_from_path``) becomes nemo-dpo's, in place."""
    for theirs, ours in peer_keys.ALIGNER_SPELLINGS.items():
        value = OmegaConf.select(patch, theirs, default=_ABSENT)
        if value is _ABSENT:
            continue
        if _has(patch, ours):
            raise ConfigError(f"{theirs} is NeMo-Aligner's name for {ours}: give one of them, not both")
        section, _, leaf = theirs.rpartition(".")
        del (OmegaConf.select(patch, section) if section else patch)[leaf]
        while section and len(OmegaConf.select(patch, section)) == 0:  # drop sections left empty
            parent, _, leaf = section.rpartition(".")
            del (OmegaConf.select(patch, parent) if parent else patch)[leaf]
            section = parent
        OmegaConf.update(patch, ours, value, force_add=True)


def _adopt_precision_spelling(cfg: DictConfig) -> None:
    """PyTorch Lightning's ``trainer.precision`` values (NeMo-Aligner's ``bf16-mixed``, ``32``) as nemo-dpo's names;
    fp16 is refused with the reason (nemo-dpo trains in fp32 or bf16)."""
    value = cfg.trainer.precision
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return  # the range check names it
    if value in peer_keys.FP16_SPELLINGS:
        raise ConfigError(f"trainer.precision must be {RANGES['trainer.precision']}, got {value!r}: fp16 training is "
                          f"not supported by nemo-dpo; trainer.precision=bf16 (NeMo-Aligner's bf16-mixed) trains in "
                          f"bf16 with fp32 master weights")
    cfg.trainer.precision = peer_keys.PRECISION_SPELLINGS.get(value, value)


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
        base = _merge_known_keys(
            parent, base, lambda key: f"{path}: key {key!r} is not in the base config" + _did_you_mean(key, parent))
    overrides = [_without_hydra_prefix(item) for item in overrides]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        patch = OmegaConf.from_dotlist(overrides)
    except Exception as err:
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from err
    _adopt_aligner_spellings(patch)
    cfg = _merge_known_keys(base, patch, lambda key: _unknown_key(key, base, path))
    _adopt_precision_spelling(cfg)
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

    ``training``: the processes were launched for this run (``world_size`` is theirs, checked against
    ``trainer.num_nodes`` x ``trainer.devices``) and the log dir will be written (converting a model or checking data
    runs one process and writes elsewhere).
    """
    model = cfg.model
    try:
        check_ranges(cfg)
        if training:
            layout.check_launch(world_size, cfg.trainer.num_nodes, cfg.trainer.devices)
        dp = layout.check_layout(world_size, model.tensor_model_parallel_size, model.pipeline_model_parallel_size,
                                 model.context_parallel_size, model.expert_model_parallel_size)
        gpt.check_model_config(model)
        lora.check_lora_config(model)
        losses.build_loss(model.dpo)
        reference.check_reference_config(model)
        batching.check_batch_sizes(model.micro_batch_size, model.global_batch_size, dp)
        dpo_step.check_schedule(model, dp)
        optimizer.check_optim_config(model.optim)
        metrics_log.check_logging(cfg)
        pipeline.check_data_config(model)
        if training:
            log_dir.check_log_dir(cfg)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from err
