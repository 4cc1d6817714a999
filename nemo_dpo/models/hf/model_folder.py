"""A Hugging Face model folder on disk: config.json and the weights in, a complete folder out.

Reading takes whichever weights the folder has (one safetensors file, a sharded
index, or an old ``pytorch_model.bin``); writing makes the whole folder appear
at once. ``generation_config.json`` (the tokens that end a reply, sampling
defaults) is no part of the network but belongs with it: checkpoints keep the
source's copy and the export writes it back unchanged. What the config and the
tensors mean is the families' business (models/hf/llama.py, ...); this module
only moves files.
"""

import json
import os
import pickle
import shutil
import tempfile
from collections import defaultdict

import torch

from nemo_dpo.files import fsync_dir, read_json_object, write_atomic
from nemo_dpo.models.hf.safetensors_io import read_safetensors, write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
GENERATION_CONFIG_FILE = "generation_config.json"


def generation_config_files(folder: str) -> list[str]:
    """``[<folder>/generation_config.json]`` when the folder (a model or a checkpoint) has one, else ``[]``."""
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    return [path] if os.path.isfile(path) else []


def read_hf_config(hf_dir: str) -> dict:
    """``<hf_dir>/config.json`` as a dict."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {hf_dir} is not a Hugging Face model directory")
    return read_json_object(path)


def _read_sharded(index_path: str) -> dict:
    """Tensors of every shard named in a ``model.safetensors.index.json`` weight_map."""
    with open(index_path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{index_path}: not valid JSON ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: expected a 'weight_map' object of tensor name -> shard file")
    by_shard = defaultdict(set)
    for name, shard in weight_map.items():
        by_shard[shard].add(name)
    weights = {}
    for shard, names in by_shard.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise ValueError(f"{index_path}: shard {shard!r} must be a file name in the same directory")
        path = os.path.join(os.path.dirname(index_path), shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{index_path}: shard {shard} (holding {min(names)}, ...) is missing: {path} not found"
            )
        tensors = read_safetensors(path)
        if set(tensors) != names:
            raise ValueError(
                f"{path}: holds {sorted(set(tensors) - names)[:5]} not mapped to it by {index_path}, "
                f"and lacks {sorted(names - set(tensors))[:5]} that it maps there"
            )
        weights.update(tensors)
    return weights


def read_hf_weights(hf_dir: str) -> dict:
    """All tensors of ``model.safetensors``, a sharded index, or ``pytorch_model.bin``."""
    single, index, pickled = (os.path.join(hf_dir, n) for n in (WEIGHTS_FILE, INDEX_FILE, TORCH_WEIGHTS_FILE))
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        return _read_sharded(index)
    if os.path.isfile(pickled):
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise ValueError(f"{pickled}: cannot be read as a PyTorch state dict ({err})") from err
    raise FileNotFoundError(
        f"{hf_dir}: no weights found (looked for {WEIGHTS_FILE}, {INDEX_FILE}, {TORCH_WEIGHTS_FILE})"
    )


def write_hf_dir(out_dir: str, hf_config: dict, hf_weights: dict, extra_files: list) -> None:
    """config.json, model.safetensors and ``extra_files`` copied as they are (the tokenizer's,
    generation_config.json), appearing in ``out_dir`` all at once.

    Everything is written to a temporary folder beside ``out_dir``, flushed to
    disk and renamed into place, so an interrupted export leaves no half-written
    model behind.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; refusing to overwrite it")
    names = [os.path.basename(f) for f in extra_files]
    if len(set(names)) != len(names) or {CONFIG_FILE, WEIGHTS_FILE} & set(names):
        raise ValueError(
            f"files {extra_files} must have distinct names other than {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    for path in extra_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"file {path} not found")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp_", dir=parent)
    try:
        write_atomic(os.path.join(tmp, CONFIG_FILE), json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        write_safetensors(os.path.join(tmp, WEIGHTS_FILE), hf_weights, metadata={"format": "pt"})
        for path in extra_files:
            with open(path, "rb") as f:
                write_atomic(os.path.join(tmp, os.path.basename(path)), f.read())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to the owner
        fsync_dir(tmp)
        os.replace(tmp, out_dir)  # an empty out_dir is replaced too
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
