"""A NeMo-Aligner (NeMo 1.x) ``.nemo`` file as the initial policy: read without NeMo, and without running its code.

What a .nemo holds, as NeMo's SaveRestoreConnector and NLPSaveRestoreConnector
write it: a tar (gzip-compressed before NeMo 1.7) of ``model_config.yaml``, the
weights, and artifacts such as the tokenizer, which the config names
``nemo:<file>``. The weights of a megatron-core GPT (``mcore_gpt: true``, the
only kind NeMo-Aligner trains) are one of:

- ``model_weights.ckpt``: ``torch.save`` of the state dict, keys
  ``model.<megatron-core name>``, of a model saved at TP=1, PP=1. Read with
  ``weights_only=True``: anything but tensors and plain data in it is refused,
  never built (the layers' ``_extra_state`` is not used);
- ``model_weights/``: a megatron-core distributed checkpoint (torch_dist) of the
  same keys, as NeMo saves these models since it has distributed checkpoints.
  Read as nemo-dpo reads its own checkpoints (safe_load.py: the shard index
  through the restricted unpickler, ``common.pt`` weights-only) and only its
  tensors are loaded, so its pickled ``_extra_state`` items are never read.

Refused, naming the reason: weights saved per model-parallel rank
(``mp_rank_00/``, ``tp_rank_00_pp_rank_000/``), zarr distributed checkpoints,
models that are not megatron-core, architecture options nemo-dpo does not
implement, a tokenizer the archive does not hold (unless ``model.tokenizer.model``
is set). The archive is unpacked once, into ``<model.tokenizer.cache_dir>/nemo/``:
the processes of a node take turns on a lock, so one unpacks and the others
find it done; tar members that would land outside the folder (absolute paths,
``..``, links out) are refused.
"""

import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile

import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from nemo_dpo.data.tokenizer import open_tokenizer
from nemo_dpo.distributed import layout
from nemo_dpo.models.gpt import padded_vocab_size, unwrap
from nemo_dpo.models.sharding import global_name, load_global_state_dict
from nemo_dpo.training import checkpoint, safe_load
from nemo_dpo.training.safe_load import CheckpointError

CONFIG = "model_config.yaml"
STATE_DICT = "model_weights.ckpt"
DISTRIBUTED = "model_weights"
PREFIX = "model."  # NeMo's GPT model holds the megatron-core GPTModel as .model
EMBEDDING = "embedding.word_embeddings.weight"
PER_RANK = re.compile(r"^(mp_rank_\d+|tp_rank_\d+_pp_rank_\d+)$")

# NeMo's names (megatron_gpt_config.yaml, and its defaults where a key is absent) -> nemo-dpo's.
NORMALIZATIONS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
ACTIVATIONS = {"gelu": "gelu", "swiglu": "swiglu", "fast-swiglu": "swiglu"}
# NeMo options with no counterpart here, and the value that leaves them unused.
UNUSED = {
    "rotary_percentage": 1.0,
    "seq_len_interpolation_factor": None,
    "scale_positional_embedding": False,
    "normalize_attention_scores": True,
    "layernorm_zero_centered_gamma": False,
    "qk_layernorm": False,
    "num_moe_experts": None,
    "window_size": None,
}


def unpack(path: str, cache_dir: str) -> str:
    """The folder holding ``path``'s archive unpacked (done once per archive, size and time of change)."""
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.path.join(os.path.expanduser(cache_dir), "nemo")
    folder = os.path.join(root, f"{os.path.basename(path)}-{key}")
    if os.path.isdir(folder):
        return folder
    os.makedirs(root, exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this node may be unpacking it
        if not os.path.isdir(folder):
            unpacking = tempfile.mkdtemp(dir=root, prefix=".unpacking_")
            try:
                with tarfile.open(path) as tar:  # plain or gzip, as NeMo wrote it
                    tar.extractall(unpacking, filter="data")
                os.replace(unpacking, folder)
            except tarfile.FilterError as err:
                raise ValueError(f"model.restore_from_path: {path}: refusing to unpack it: {err}") from err
            except tarfile.TarError as err:
                raise ValueError(f"model.restore_from_path: {path} is not a readable .nemo archive (a tar): "
                                 f"{err}") from err
            finally:
                shutil.rmtree(unpacking, ignore_errors=True)
    return folder


def read_config(folder: str, path: str) -> dict:
    """The model's config from model_config.yaml (plain YAML, never code)."""
    file = os.path.join(folder, CONFIG)
    if not os.path.isfile(file):
        raise ValueError(f"model.restore_from_path: {path} holds no {CONFIG}, so it is not a .nemo model")
    with open(file, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config = config.get("model", config) if isinstance(config, dict) else config
    if not isinstance(config, dict):
        raise ValueError(f"model.restore_from_path: {path}: {CONFIG} is not a mapping of config keys")
    return config


def weights_layout(folder: str, path: str) -> str:
    """Which weights the archive holds (STATE_DICT or DISTRIBUTED); ValueError for a layout that is not read here."""
    per_rank = sorted(name for name in os.listdir(folder) if PER_RANK.match(name))
    if per_rank:
        raise ValueError(f"model.restore_from_path: {path} holds weights saved per model-parallel rank ({per_rank[0]}/"
                         f"...), which nemo-dpo does not read: save the model at TP=1 PP=1, or with NeMo's distributed "
                         f"checkpoints ({DISTRIBUTED}/)")
    if os.path.isfile(os.path.join(folder, STATE_DICT)):
        return STATE_DICT
    distributed = os.path.join(folder, DISTRIBUTED)
    if os.path.isdir(distributed):
        kind = None
        if os.path.isfile(os.path.join(distributed, "metadata.json")):
            with open(os.path.join(distributed, "metadata.json"), encoding="utf-8") as f:
                kind = json.load(f).get("sharded_backend")
        if kind != "torch_dist":
            raise ValueError(f"model.restore_from_path: {path}: {DISTRIBUTED}/ is a {kind or 'unknown'} distributed "
                             f"checkpoint; nemo-dpo reads torch_dist ones (NeMo's dist_ckpt_format: torch_dist)")
        return DISTRIBUTED
    raise ValueError(f"model.restore_from_path: {path} holds neither {STATE_DICT} nor {DISTRIBUTED}/")


def architecture(config: dict, path: str) -> dict:
    """The ``model`` keys the weights fix, from NeMo's config; ValueError for what nemo-dpo does not implement."""
    where = f"model.restore_from_path: {path}: {CONFIG}"
    if config.get("mcore_gpt") is not True:
        raise ValueError(f"{where}: not a megatron-core GPT (mcore_gpt is not true); convert it first with NeMo's "
                         f"scripts/checkpoint_converters/convert_gpt_nemo_to_mcore.py, as NeMo-Aligner required")
    for key, unused in UNUSED.items():
        if config.get(key, unused) != unused:
            raise ValueError(f"{where}: {key} is {config[key]!r}; nemo-dpo implements only {key}={unused!r}")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if config.get("kv_channels") not in (None, hidden // heads if isinstance(hidden, int) and heads else None):
        raise ValueError(f"{where}: kv_channels is {config['kv_channels']!r}; nemo-dpo implements only "
                         f"hidden_size / num_attention_heads")
    normalization, activation = config.get("normalization", "layernorm"), config.get("activation", "gelu")
    if normalization not in NORMALIZATIONS or activation not in ACTIVATIONS:
        raise ValueError(f"{where}: normalization {normalization!r} with activation {activation!r}; nemo-dpo "
                         f"implements the normalizations {list(NORMALIZATIONS)} and the activations {list(ACTIVATIONS)}")
    if activation == "gelu" and config.get("openai_gelu", False):
        activation = "gelu_tanh"
    try:
        settings = {key: config[key] for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                                 "max_position_embeddings")}
    except KeyError as err:
        raise ValueError(f"{where}: has no {err.args[0]}") from err
    return {
        **settings,
        "num_query_groups": config.get("num_query_groups"),
        "position_embedding_type": config.get("position_embedding_type", "learned_absolute"),
        "normalization": NORMALIZATIONS[normalization],
        "activation": ACTIVATIONS.get(activation, activation),
        "bias": config.get("bias", True),
        "share_embeddings_and_output_weights": config.get("share_embeddings_and_output_weights", True),
        "rotary_base": config.get("rotary_base", 10000),
        "layernorm_epsilon": config.get("layernorm_epsilon", 1e-5),
        # NeMo padded the vocabulary to a multiple of this times the TP it was built at
        "make_vocab_size_divisible_by": config.get("make_vocab_size_divisible_by", 128)
        * config.get("tensor_model_parallel_size", 1),
    }


def tokenizer_path(config: dict, folder: str) -> str | None:
    """The tokenizer the archive holds: the SentencePiece model (``tokenizer.model``) or a Hugging Face tokenizer
    folder (``tokenizer.type``) that the config names ``nemo:<file>``; None when it holds none."""
    tokenizer = config.get("tokenizer") or {}
    for key, exists in (("model", os.path.isfile), ("type", os.path.isdir)):
        named = tokenizer.get(key)
        if isinstance(named, str) and named.startswith("nemo:"):
            inside = os.path.join(folder, named[len("nemo:"):])
            if os.path.dirname(os.path.normpath(inside)) == os.path.normpath(folder) and exists(inside):
                return inside
    return None


def settings(path: str, model_cfg) -> tuple[dict, list]:
    """(the ``model`` keys the .nemo fixes: architecture, vocabulary, tokenizer; notes for the user)."""
    folder = unpack(path, model_cfg.tokenizer.cache_dir)
    config = read_config(folder, path)
    weights_layout(folder, path)
    found = architecture(config, path)
    tokenizer = tokenizer_path(config, folder)
    if tokenizer is not None:
        found["tokenizer.model"] = tokenizer
    elif model_cfg.tokenizer.model is None:
        named = config.get("tokenizer") or {}
        raise ValueError(f"model.restore_from_path: {path} does not hold its tokenizer ({CONFIG} names library "
                         f"{named.get('library')!r}, type {named.get('type')!r}, model {named.get('model')!r}); set "
                         f"model.tokenizer.model to it (a SentencePiece .model file or a Hugging Face tokenizer folder)")
    found["vocab_size"] = open_tokenizer(found.get("tokenizer.model", model_cfg.tokenizer.model)).vocab_size
    notes = []
    trained_at = config.get("encoder_seq_length")
    if isinstance(trained_at, int) and trained_at != model_cfg.encoder_seq_length:
        notes.append(f"model.encoder_seq_length stays {model_cfg.encoder_seq_length} (the .nemo has {trained_at}, "
                     f"which NeMo-Aligner used: set model.encoder_seq_length={trained_at} to do the same)")
    return found, notes


def _check_vocabulary(rows: int, model_cfg, where: str) -> None:
    padded = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, layout.current().tp)
    if rows != padded:
        raise CheckpointError(f"{where}: the word embedding has {rows} rows, but the tokenizer's {model_cfg.vocab_size} "
                              f"tokens padded to a multiple of {model_cfg.make_vocab_size_divisible_by} make {padded} "
                              f"(is model.tokenizer.model the model's own tokenizer?)")


def _load_state_dict(model, config, file: str, model_cfg) -> None:
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it refers to {found.group(1)}" if found else str(err).splitlines()[0]
        raise CheckpointError(f"{file}: holds more than tensors and plain data ({what}); refusing to load it (a "
                              f"pickle can run code)") from err
    if not isinstance(saved, dict) or not all(isinstance(key, str) for key in saved):
        raise CheckpointError(f"{file}: not a state dict")
    weights = {}
    for key, value in saved.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if name is None:
            raise CheckpointError(f"{file}: holds {key!r}; a NeMo GPT's weights are all under {PREFIX!r}")
        if not name.endswith(checkpoint.EXTRA_STATE):
            weights[global_name(name, 0, False)] = value  # transformer-engine's fused norm names -> local ones
    if EMBEDDING in weights:
        _check_vocabulary(weights[EMBEDDING].shape[0], model_cfg, file)
    load_global_state_dict(model, config, weights)


def _load_distributed(model, folder: str, model_cfg) -> None:
    safe_load.install()
    held = safe_load.read_index(os.path.join(folder, safe_load.INDEX_FILE)).state_dict_metadata
    module = unwrap(model)
    state = {k: v for k, v in module.sharded_state_dict().items() if not k.endswith(checkpoint.EXTRA_STATE)}
    replace_prefix_for_sharding(state, "", PREFIX)
    missing = sorted({item.key for item in nested_values(state) if item.key not in held})
    if missing:
        raise CheckpointError(f"{folder}: has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                              f"(not the weights of this architecture)")
    objects = sorted(item.key for item in nested_values(state) if isinstance(held[item.key], BytesStorageMetadata))
    if objects:
        raise CheckpointError(f"{folder}: {objects[0]} is a pickled object, not a tensor; refusing to load it")
    if PREFIX + EMBEDDING in held:
        _check_vocabulary(held[PREFIX + EMBEDDING].size[0], model_cfg, folder)
    loaded = dist_checkpointing.load(state, folder, common_strategy=safe_load.WeightsOnlyCommonLoad())
    checkpoint.load_model_state(module, loaded, folder)


def load_weights(model, config, model_cfg) -> None:
    """Fill this rank's model with the weights of the .nemo in ``model_cfg.restore_from_path``."""
    path = model_cfg.restore_from_path
    folder = unpack(path, model_cfg.tokenizer.cache_dir)
    if weights_layout(folder, path) == STATE_DICT:
        _load_state_dict(model, config, os.path.join(folder, STATE_DICT), model_cfg)
    else:
        _load_distributed(model, os.path.join(folder, DISTRIBUTED), model_cfg)
