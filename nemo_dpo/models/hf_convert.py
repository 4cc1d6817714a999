"""Hugging Face model directories <-> megatron-core *global* weights.

Global weights are the state dict of the whole model (TP=1, PP=1) under the
names GPTModel gives its parameters with the local layer spec;
``sharding.load_global_state_dict`` slices them for any layout, so conversion
never needs to know the parallel layout. Supported families:

- Llama (and Mistral, the same network): RMSNorm, SwiGLU, RoPE, GQA, no biases.
- GPT-2: LayerNorm with bias, tanh-GELU, learned positions, biases everywhere,
  and Conv1D weights stored [in, out] (the transpose of a Linear's).

Two layouts differ from HF's separate tensors: megatron's ``linear_qkv`` holds
Q, K and V grouped per KV head (each group's query heads, then its key head,
then its value head), and SwiGLU's ``linear_fc1`` is [gate; up]. RoPE needs no
permutation: megatron's default (non-interleaved) rotation is HF Llama's rotate-half.
"""

import json
import os
import pickle
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from nemo_dpo.files import read_json_object
from nemo_dpo.models.safetensors_io import read_safetensors, write_safetensors

SUPPORTED = ("llama", "mistral", "gpt2")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"

_REQUIRED = object()
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Buffers some checkpoints carry next to the weights: GPT-2's causal mask and
# Llama's RoPE frequencies, both recomputed from the config.
_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------- config.json -> model section


def read_hf_config(hf_dir: str) -> dict:
    """``<hf_dir>/config.json`` as a dict."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {hf_dir} is not a Hugging Face model directory")
    return read_json_object(path)


def _family(hf_config: dict) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{CONFIG_FILE}: model_type {model_type!r} is not supported (supported: {list(SUPPORTED)})")
    return "gpt2" if model_type == "gpt2" else "llama"


def _get(hf_config: dict, key: str, kind: type, default=_REQUIRED):
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


def _unsupported(key: str, value, why: str) -> ValueError:
    return ValueError(f"{CONFIG_FILE}: {key}={value!r} is not supported ({why})")


def _rotary_base(hf_config: dict) -> int:
    """RoPE theta from either spelling (``rope_theta`` / ``rope_scaling`` or v5's ``rope_parameters``)."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf_config.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise _unsupported(f"{key}.rope_type", rope_type, "only plain RoPE; no rope scaling")
    params = hf_config.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _unsupported("partial_rotary_factor", partial, "RoPE must cover the whole head")
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if theta != int(theta):
        raise _unsupported("rope_theta", theta, "model.rotary_base is an integer")
    return int(theta)


def _llama_overrides(hf_config: dict) -> dict:
    hidden = _get(hf_config, "hidden_size", int)
    heads = _get(hf_config, "num_attention_heads", int)
    max_positions = _get(hf_config, "max_position_embeddings", int)
    head_dim = _get(hf_config, "head_dim", int, hidden // heads)
    if hidden % heads or head_dim != hidden // heads:
        raise _unsupported("head_dim", head_dim, f"must be hidden_size / num_attention_heads = {hidden} / {heads}")
    act = _get(hf_config, "hidden_act", str, "silu")
    if act != "silu":
        raise _unsupported("hidden_act", act, "Llama's MLP must be SwiGLU, i.e. silu")
    for key in ("attention_bias", "mlp_bias"):
        if _get(hf_config, key, bool, False):
            raise _unsupported(key, True, "Llama layers here have no biases")
    window = _get(hf_config, "sliding_window", int, max_positions)
    if window < max_positions:
        raise _unsupported("sliding_window", window, f"attention must see all {max_positions} positions")
    return {
        "num_layers": _get(hf_config, "num_hidden_layers", int),
        "hidden_size": hidden,
        "ffn_hidden_size": _get(hf_config, "intermediate_size", int),
        "num_attention_heads": heads,
        "num_query_groups": _get(hf_config, "num_key_value_heads", int, heads),
        "position_embedding_type": "rope",
        "rotary_base": _rotary_base(hf_config),
        "normalization": "RMSNorm",
        "layernorm_epsilon": _get(hf_config, "rms_norm_eps", float, 1e-6),
        "activation": "swiglu",
        "bias": False,
        "share_embeddings_and_output_weights": _get(hf_config, "tie_word_embeddings", bool, False),
        "max_position_embeddings": max_positions,
    }


def _gpt2_overrides(hf_config: dict) -> dict:
    hidden = _get(hf_config, "n_embd", int)
    heads = _get(hf_config, "n_head", int)
    act = _get(hf_config, "activation_function", str, "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise _unsupported("activation_function", act, f"supported: {list(_GPT2_ACTIVATIONS)}")
    for key, needed in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if _get(hf_config, key, bool, needed) != needed:
            raise _unsupported(key, not needed, f"megatron's attention needs {key}={needed}")
    return {
        "num_layers": _get(hf_config, "n_layer", int),
        "hidden_size": hidden,
        "ffn_hidden_size": _get(hf_config, "n_inner", int, 4 * hidden),
        "num_attention_heads": heads,
        "num_query_groups": heads,
        "position_embedding_type": "learned_absolute",
        "normalization": "LayerNorm",
        "layernorm_epsilon": _get(hf_config, "layer_norm_epsilon", float, 1e-5),
        "activation": _GPT2_ACTIVATIONS[act],
        "bias": True,
        "share_embeddings_and_output_weights": _get(hf_config, "tie_word_embeddings", bool, True),
        "max_position_embeddings": _get(hf_config, "n_positions", int),
    }


def model_overrides_from_hf(hf_config: dict) -> dict:
    """Values for the ``model`` section of conf/gpt_dpo.yaml that rebuild the HF architecture."""
    return _gpt2_overrides(hf_config) if _family(hf_config) == "gpt2" else _llama_overrides(hf_config)


# ---------------------------------------------------------------- model section -> config.json


def _mismatches(model_cfg, wanted: dict) -> list[str]:
    return [
        f"model.{key}={' or '.join(map(repr, allowed))} (got {model_cfg[key]!r})"
        for key, allowed in wanted.items()
        if model_cfg[key] not in allowed
    ]


def hf_config_from_model(model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
    """config.json describing our ``model`` section as LlamaForCausalLM or GPT2LMHeadModel.

    Dropout is written too, so HF's GPT-2 defaults (0.1) do not silently apply.
    """
    heads = model_cfg["num_attention_heads"]
    hidden = model_cfg["hidden_size"]
    common = {
        "vocab_size": vocab_size,
        "tie_word_embeddings": model_cfg["share_embeddings_and_output_weights"],
        "bos_token_id": bos_id if bos_id >= 0 else None,
        "eos_token_id": eos_id,
    }
    llama = _mismatches(
        model_cfg,
        {
            "normalization": ("RMSNorm",),
            "activation": ("swiglu",),
            "position_embedding_type": ("rope",),
            "bias": (False,),
        },
    )
    if not llama:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": model_cfg["ffn_hidden_size"],
            "num_hidden_layers": model_cfg["num_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": model_cfg["num_query_groups"] or heads,
            "head_dim": hidden // heads,
            "hidden_act": "silu",
            "max_position_embeddings": model_cfg["max_position_embeddings"],
            "rms_norm_eps": model_cfg["layernorm_epsilon"],
            "rope_theta": float(model_cfg["rotary_base"]),
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": model_cfg["attention_dropout"],
            **common,
        }
    gpt2 = _mismatches(
        model_cfg,
        {
            "normalization": ("LayerNorm",),
            "activation": ("gelu_tanh", "gelu"),
            "position_embedding_type": ("learned_absolute",),
            "bias": (True,),
            "num_query_groups": (None, heads),
        },
    )
    if not gpt2:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": hidden,
            "n_inner": model_cfg["ffn_hidden_size"],
            "n_layer": model_cfg["num_layers"],
            "n_head": heads,
            "n_positions": model_cfg["max_position_embeddings"],
            "activation_function": "gelu_new" if model_cfg["activation"] == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": model_cfg["layernorm_epsilon"],
            "attn_pdrop": model_cfg["attention_dropout"],
            "resid_pdrop": model_cfg["hidden_dropout"],
            "embd_pdrop": model_cfg["hidden_dropout"],
            **common,
        }
    raise ValueError(
        "the model config fits no exportable Hugging Face architecture: "
        f"LlamaForCausalLM would need {', '.join(llama)}; GPT2LMHeadModel would need {', '.join(gpt2)}"
    )


# ---------------------------------------------------------------- tensor mapping


def _interleave_qkv(q, k, v, groups: int) -> torch.Tensor:
    """Separate Q, K, V (weights or biases) -> megatron's per-group [q heads, k, v] layout."""
    rest = q.shape[1:]
    return torch.cat([t.reshape(groups, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)


def _split_qkv(qkv, heads: int, groups: int, head_dim: int) -> list:
    """Inverse of ``_interleave_qkv``: [q, k, v] with all heads of each contiguous."""
    rest = qkv.shape[1:]
    parts = qkv.reshape(groups, -1, *rest).split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in parts]


def _same(tensors):
    return tensors[0]


def _as_list(tensor):
    return [tensor]


def _transposed(tensors):
    return tensors[0].t()


def _transposed_list(tensor):
    return [tensor.t()]


@dataclass(frozen=True)
class _Rule:
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


def _llama_rules(m: dict, vocab: int) -> list:
    h, ffn, heads, groups = m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"], m["num_query_groups"]
    d = h // heads
    rules = [_Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((vocab, h),), vocab=True)]
    for i in range(m["num_layers"]):
        g, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        rules += [
            _Rule(g + "input_layernorm.weight", (p + "input_layernorm.weight",), ((h,),)),
            _Rule(
                g + "self_attention.linear_qkv.weight",
                tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
                ((heads * d, h), (groups * d, h), (groups * d, h)),
                to_global=lambda ts: _interleave_qkv(*ts, groups),
                to_hf=lambda t: _split_qkv(t, heads, groups, d),
            ),
            _Rule(g + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), ((h, heads * d),)),
            _Rule(g + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), ((h,),)),
            _Rule(
                g + "mlp.linear_fc1.weight",
                (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                ((ffn, h), (ffn, h)),
                to_global=torch.cat,
                to_hf=lambda t: list(t.chunk(2)),
            ),
            _Rule(g + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), ((h, ffn),)),
        ]
    rules.append(_Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),)))
    return rules


def _gpt2_rules(m: dict, vocab: int) -> list:
    h, ffn, heads = m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"]
    d = h // heads
    rules = [
        _Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), ((vocab, h),), vocab=True),
        _Rule(
            "embedding.position_embeddings.weight", ("transformer.wpe.weight",), ((m["max_position_embeddings"], h),)
        ),
    ]
    for i in range(m["num_layers"]):
        g, p = f"decoder.layers.{i}.", f"transformer.h.{i}."
        rules += [
            _Rule(g + "input_layernorm.weight", (p + "ln_1.weight",), ((h,),)),
            _Rule(g + "input_layernorm.bias", (p + "ln_1.bias",), ((h,),)),
            # c_attn is [in, q|k|v]; plain multi-head attention is GQA with one head per group.
            _Rule(
                g + "self_attention.linear_qkv.weight",
                (p + "attn.c_attn.weight",),
                ((h, 3 * h),),
                to_global=lambda ts: _interleave_qkv(*ts[0].t().chunk(3), heads),
                to_hf=lambda t: [torch.cat(_split_qkv(t, heads, heads, d)).t()],
            ),
            _Rule(
                g + "self_attention.linear_qkv.bias",
                (p + "attn.c_attn.bias",),
                ((3 * h,),),
                to_global=lambda ts: _interleave_qkv(*ts[0].chunk(3), heads),
                to_hf=lambda t: [torch.cat(_split_qkv(t, heads, heads, d))],
            ),
            _Rule(
                g + "self_attention.linear_proj.weight",
                (p + "attn.c_proj.weight",),
                ((h, h),),
                _transposed,
                _transposed_list,
            ),
            _Rule(g + "self_attention.linear_proj.bias", (p + "attn.c_proj.bias",), ((h,),)),
            _Rule(g + "pre_mlp_layernorm.weight", (p + "ln_2.weight",), ((h,),)),
            _Rule(g + "pre_mlp_layernorm.bias", (p + "ln_2.bias",), ((h,),)),
            _Rule(g + "mlp.linear_fc1.weight", (p + "mlp.c_fc.weight",), ((h, ffn),), _transposed, _transposed_list),
            _Rule(g + "mlp.linear_fc1.bias", (p + "mlp.c_fc.bias",), ((ffn,),)),
            _Rule(g + "mlp.linear_fc2.weight", (p + "mlp.c_proj.weight",), ((ffn, h),), _transposed, _transposed_list),
            _Rule(g + "mlp.linear_fc2.bias", (p + "mlp.c_proj.bias",), ((h,),)),
        ]
    rules += [
        _Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), ((h,),)),
        _Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",), ((h,),)),
    ]
    return rules


def _rules(hf_config: dict) -> list:
    model = model_overrides_from_hf(hf_config)
    vocab = _get(hf_config, "vocab_size", int)
    rules = (_gpt2_rules if _family(hf_config) == "gpt2" else _llama_rules)(model, vocab)
    if not model["share_embeddings_and_output_weights"]:
        rules.append(_Rule("output_layer.weight", ("lm_head.weight",), ((vocab, model["hidden_size"]),), vocab=True))
    return rules


def _check_names(got: set, expected: set, what: str) -> None:
    def show(names):
        names = sorted(names)
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    missing, unexpected = expected - got, got - expected
    if missing or unexpected:
        problems = [
            f"missing {show(missing)}" if missing else "",
            f"unexpected {show(unexpected)}" if unexpected else "",
        ]
        raise ValueError(f"{what} do not match {CONFIG_FILE}: " + "; ".join(p for p in problems if p))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"tensor {name}: expected shape {tuple(expected)} (from {CONFIG_FILE}), got {tuple(tensor.shape)}"
        )


def _without_extras(hf_config: dict, hf_weights: dict) -> dict:
    """HF weights under the names the rules use, without what the model does not need.

    GPT-2 checkpoints saved from the bare GPT2Model lack the ``transformer.``
    prefix; buffers are recomputed from the config; a tied ``lm_head.weight``,
    where present, must be the embedding itself.
    """
    gpt2 = _family(hf_config) == "gpt2"
    tied = model_overrides_from_hf(hf_config)["share_embeddings_and_output_weights"]
    weights = {}
    for name, tensor in hf_weights.items():
        if _BUFFERS.search(name):
            continue
        if gpt2 and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        weights[name] = tensor
    if tied and "lm_head.weight" in weights:
        embedding = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
        lm_head = weights.pop("lm_head.weight")
        if embedding in weights and not torch.equal(lm_head, weights[embedding]):
            raise ValueError(
                f"tie_word_embeddings is true in {CONFIG_FILE}, but lm_head.weight differs from {embedding}"
            )
    return weights


def hf_to_global(hf_config: dict, hf_weights: dict, padded_vocab: int) -> dict:
    """HF tensors -> megatron global names; embedding/output rows zero-padded to ``padded_vocab``."""
    rules = _rules(hf_config)
    hf_weights = _without_extras(hf_config, hf_weights)
    _check_names(set(hf_weights), {n for rule in rules for n in rule.hf_names}, "the Hugging Face weights")
    out = {}
    for rule in rules:
        for name, shape in zip(rule.hf_names, rule.hf_shapes):
            _check_shape(name, hf_weights[name], shape)
        tensor = rule.to_global([hf_weights[n] for n in rule.hf_names]).contiguous()
        if rule.vocab:
            if padded_vocab < tensor.shape[0]:
                raise ValueError(
                    f"tensor {rule.hf_names[0]}: padded vocabulary {padded_vocab} is smaller than "
                    f"vocab_size {tensor.shape[0]} in {CONFIG_FILE}"
                )
            tensor = torch.cat([tensor, tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])])
        out[rule.name] = tensor
    return out


def global_to_hf(hf_config: dict, global_weights: dict) -> dict:
    """Inverse of ``hf_to_global``; the vocabulary padding (rows past config vocab_size) is dropped."""
    rules = _rules(hf_config)
    vocab = _get(hf_config, "vocab_size", int)
    _check_names(set(global_weights), {rule.name for rule in rules}, "the megatron weights")
    out = {}
    for rule in rules:
        tensor = global_weights[rule.name]
        expected = rule.global_shape
        if rule.vocab and tensor.dim() == 2 and tensor.shape[0] >= vocab:
            tensor = tensor[:vocab]
        _check_shape(rule.name, tensor, expected)
        for name, part in zip(rule.hf_names, rule.to_hf(tensor)):
            out[name] = part.contiguous()
    return out


# ---------------------------------------------------------------- files


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


def write_hf_dir(out_dir: str, hf_config: dict, hf_weights: dict, tokenizer_files: list) -> None:
    """config.json, model.safetensors and the tokenizer files, appearing in ``out_dir`` all at once.

    Everything is written to a temporary folder beside ``out_dir`` and renamed
    into place, so an interrupted export leaves no half-written model behind.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; refusing to overwrite it")
    names = [os.path.basename(f) for f in tokenizer_files]
    if len(set(names)) != len(names) or {CONFIG_FILE, WEIGHTS_FILE} & set(names):
        raise ValueError(
            f"tokenizer files {tokenizer_files} must have distinct names other than {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    for path in tokenizer_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} not found")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp_", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")
        write_safetensors(os.path.join(tmp, WEIGHTS_FILE), hf_weights, metadata={"format": "pt"})
        for path in tokenizer_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to the owner
        os.replace(tmp, out_dir)  # an empty out_dir is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
