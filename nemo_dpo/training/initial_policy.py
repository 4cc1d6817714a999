"""Where the initial policy (and so the reference) comes from: ``model.restore_from_path``.

A Hugging Face model folder (``config.json`` + safetensors), a nemo-dpo
checkpoint folder, or a NeMo-Aligner ``.nemo`` file (nemo_archive.py). Each
defines the architecture, the vocabulary and the tokenizer, so :func:`resolve`
copies those into the config before anything is built (and the weight of the
routers' load-balancing loss, unless the run sets it), and :func:`load_weights`
fills the built model. Its generation_config.json, if any, goes into every
checkpoint of the run (:func:`carried_files`), so that the export has it.
"""

import os
from pathlib import Path

from nemo_dpo.distributed import layout
from nemo_dpo.models.gpt import padded_vocab_size
from nemo_dpo.models.hf import (
    generation_config_files,
    hf_aux_loss_coeff,
    hf_to_global,
    hf_vocab_size,
    model_overrides_from_hf,
    read_hf_config,
    read_hf_weights,
)
from nemo_dpo.models.sharding import load_global_state_dict
from nemo_dpo.ranges import FilePath
from nemo_dpo.training import checkpoint, nemo_archive

RANGES = {"model.restore_from_path": FilePath(nullable=True)}


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _source_settings(path: str, model_cfg) -> tuple[dict, list]:
    """(the ``model`` keys a source fixes, notes for the user)."""
    if os.path.isfile(path):
        return nemo_archive.settings(path, model_cfg)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.restore_from_path: {path} is neither a folder nor a .nemo file")
    if is_hf_dir(path):
        hf_config = read_hf_config(path)
        try:
            settings = {**model_overrides_from_hf(hf_config), "vocab_size": hf_vocab_size(hf_config)}
        except ValueError as err:
            raise ValueError(f"model.restore_from_path={path}: {err}") from err
        return {**settings, "tokenizer.model": path}, []
    reason = checkpoint.problem(Path(path))
    if reason is not None:
        raise checkpoint.CheckpointError(
            f"model.restore_from_path: {path} is neither a Hugging Face model folder (no config.json) "
            f"nor a complete nemo-dpo checkpoint ({reason})"
        )
    settings = checkpoint.saved_architecture(path)
    if os.path.isdir(os.path.join(path, checkpoint.TOKENIZER_DIR)):
        settings["tokenizer.model"] = os.path.join(path, checkpoint.TOKENIZER_DIR)
    return settings, []


def _source_aux_loss_coeff(path) -> float:
    """The load-balancing loss weight the source trains with: a Hugging Face folder's (models/hf/), a
    checkpoint's own ``model.moe_aux_loss_coeff``, 0 without a source or from a .nemo file."""
    if path is None or os.path.isfile(path):  # no source, or a .nemo file: dense (nemo_archive.py refuses experts)
        return 0.0
    if is_hf_dir(path):
        try:
            return hf_aux_loss_coeff(read_hf_config(path))
        except ValueError as err:
            raise ValueError(f"model.restore_from_path={path}: {err}") from err
    return checkpoint.read_metadata(path)["config"]["model"].get("moe_aux_loss_coeff") or 0.0


def resolve(model_cfg) -> list:
    """Copy the architecture, vocabulary and tokenizer of ``restore_from_path`` into ``model_cfg``, and
    the source's load-balancing loss weight where ``model.moe_aux_loss_coeff`` is null.

    Returns a line per key that changed, and any note on the source, to tell the user.
    """
    changes = []
    if model_cfg.restore_from_path is not None:
        settings, notes = _source_settings(model_cfg.restore_from_path, model_cfg)
        for key, value in settings.items():
            section, _, name = key.rpartition(".")
            node = model_cfg[section] if section else model_cfg
            if node[name] != value:
                changes.append(f"model.{key}: {node[name]!r} -> {value!r}")
                node[name] = value
        changes += notes
    if model_cfg.moe_aux_loss_coeff is None:
        model_cfg.moe_aux_loss_coeff = _source_aux_loss_coeff(model_cfg.restore_from_path)
        if model_cfg.restore_from_path is not None and model_cfg.num_moe_experts is not None:
            changes.append(f"model.moe_aux_loss_coeff: None -> {model_cfg.moe_aux_loss_coeff!r}")
    return changes


def load_weights(model_chunks: list, config, model_cfg) -> None:
    """Fill this rank's model chunks with the weights of ``model_cfg.restore_from_path``."""
    path = model_cfg.restore_from_path
    if os.path.isfile(path):
        for chunk in model_chunks:
            nemo_archive.load_weights(chunk, config, model_cfg)
    elif is_hf_dir(path):
        padded = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, layout.current().tp)
        weights = hf_to_global(read_hf_config(path), read_hf_weights(path), padded)
        for chunk in model_chunks:
            load_global_state_dict(chunk, config, weights)
    else:
        checkpoint.check_compatible(Path(path), model_cfg)
        checkpoint.load(Path(path), model_chunks)


def carried_files(model_cfg) -> dict:
    """``{name in a checkpoint: path}``: the source's generation_config.json, which its checkpoints keep."""
    if model_cfg.restore_from_path is None:
        return {}
    return {os.path.basename(f): f for f in generation_config_files(model_cfg.restore_from_path)}
