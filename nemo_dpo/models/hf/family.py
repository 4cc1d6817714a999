"""What a Hugging Face family adapter is, and the pieces every family is built from.

A family (models/hf/llama.py, qwen2.py, qwen3.py, gpt2.py) is the adapter
between one kind of Hugging Face checkpoint and megatron's GPTModel: which
config.json keys give which ``model`` settings and which configs it refuses,
the config.json it writes back, and a TensorRule per megatron tensor naming the
HF tensors it is made of. The pieces live here so that every family reads config.json, refuses
what it cannot represent and lays out attention the same way, and its errors
read alike (file, key, expected, got).

Megatron's fused ``linear_qkv`` holds Q, K and V grouped per KV head (each
group's query heads, then its key head, then its value head), where HF keeps
them apart or concatenated whole; the two helpers below convert.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from nemo_dpo.models.hf.model_folder import CONFIG_FILE

_REQUIRED = object()

# What a dense family needs of a ``model`` section to export it: an MLP, not experts.
DENSE = {"num_moe_experts": (None,)}


def config_value(hf_config: dict, key: str, kind: type, default=_REQUIRED):
    """``hf_config[key]`` checked for type; absent or null means HF's default for the family."""
    value = hf_config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{CONFIG_FILE}: missing {key!r} (model_type {hf_config.get('model_type')!r})")
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{CONFIG_FILE}: {key} must be {kind.__name__}, got {value!r}")
    return value


def config_size(hf_config: dict, key: str, default=_REQUIRED) -> int:
    """A size (layers, heads, hidden, vocabulary...) of config.json: an integer >= 1."""
    value = config_value(hf_config, key, int, default)
    if value < 1:
        raise ValueError(f"{CONFIG_FILE}: {key} must be an integer >= 1, got {value!r}")
    return value


def not_supported(key: str, value, why: str) -> ValueError:
    return ValueError(f"{CONFIG_FILE}: {key}={value!r} is not supported ({why})")


def mismatches(model_cfg, wanted: dict) -> list[str]:
    """``model.<key>=<allowed> (got <value>)`` for each key of ``wanted`` whose value is not allowed."""
    return [
        f"model.{key}={' or '.join(map(repr, allowed))} (got {model_cfg[key]!r})"
        for key, allowed in wanted.items()
        if model_cfg[key] not in allowed
    ]


def vocabulary_config(model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
    """The config.json keys every family writes alike: vocabulary, tying, special tokens."""
    return {
        "vocab_size": vocab_size,
        "tie_word_embeddings": model_cfg["share_embeddings_and_output_weights"],
        "bos_token_id": bos_id if bos_id >= 0 else None,
        "eos_token_id": eos_id,
    }


def interleave_qkv(q, k, v, groups: int) -> torch.Tensor:
    """Separate Q, K, V (weights or biases) -> megatron's per-group [q heads, k, v] layout."""
    rest = q.shape[1:]
    return torch.cat([t.reshape(groups, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)


def split_qkv(qkv, heads: int, groups: int, head_dim: int) -> list:
    """Inverse of ``interleave_qkv``: [q, k, v] with all heads of each contiguous."""
    rest = qkv.shape[1:]
    parts = qkv.reshape(groups, -1, *rest).split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in parts]


def _same(tensors):
    return tensors[0]


def _as_list(tensor):
    return [tensor]


@dataclass(frozen=True)
class TensorRule:
    """One megatron tensor and the HF tensor(s) it is made of."""

    name: str
    hf_names: tuple
    hf_shapes: tuple
    to_global: Callable = _same  # list of HF tensors -> megatron tensor
    to_hf: Callable = _as_list  # megatron tensor -> list of HF tensors
    vocab: bool = False  # dim 0 is the vocabulary, padded on the megatron side

    @property
    def global_shape(self) -> tuple:
        # Running the mapping on meta tensors derives the shape from the one definition of the layout.
        return tuple(self.to_global([torch.empty(s, device="meta") for s in self.hf_shapes]).shape)


class Family(ABC):
    """One Hugging Face model family, as models/hf/__init__.py uses it."""

    model_types: tuple  # config.json model_type values this family reads
    architecture: str  # the transformers class written into an exported config.json

    @abstractmethod
    def model_settings(self, hf_config: dict) -> dict:
        """The ``model`` settings (architecture keys only) that rebuild this config.json; refuses what cannot."""

    @abstractmethod
    def export_mismatches(self, model_cfg) -> list[str]:
        """Why a ``model`` section cannot be written as this family (empty when it can)."""

    @abstractmethod
    def hf_config(self, model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
        """The config.json describing ``model_cfg`` as this family."""

    @abstractmethod
    def rules(self, settings: dict, vocab: int) -> list[TensorRule]:
        """A rule per megatron tensor of the model body (the untied output layer is added by the caller)."""

    @abstractmethod
    def weight_name(self, hf_name: str) -> str | None:
        """A checkpoint's tensor name as the rules spell it, or None for a buffer recomputed from the config."""

    def aux_loss_coeff(self, hf_config: dict) -> float:
        """The router load-balancing loss weight this config.json trains with (the default of
        ``model.moe_aux_loss_coeff``); a dense family has none."""
        return 0.0
