"""Hugging Face model folders <-> megatron-core *global* weights, one adapter per model family.

Global weights are the state dict of the whole model (TP=1, PP=1) under the
names GPTModel gives its parameters with the local layer spec;
``sharding.load_global_state_dict`` slices them for any layout, so conversion
never needs to know the parallel layout.

Each family (llama.py: Llama 1-3.x and Mistral; qwen2.py: Qwen2 and Qwen2.5;
qwen3.py: Qwen3; mixtral.py: Mixtral; qwen3_moe.py: Qwen3-MoE; gpt2.py: GPT-2)
says how its config.json maps onto the
``model`` section and how each megatron tensor is made of its tensors; this
module picks the family and applies its rules in both directions, checking
names and shapes on the way. Export picks the first family that can represent
the ``model`` section (q/k/v biases alone make it Qwen2, query/key norms
Qwen3; with experts, Mixtral or, with query/key norms, Qwen3-MoE). Supporting
another family is one more module in FAMILIES.
"""

import torch

from nemo_dpo.models.architecture import ARCHITECTURE_KEYS
from nemo_dpo.models.hf.family import Family, TensorRule, config_size
from nemo_dpo.models.hf.gpt2 import GPT2
from nemo_dpo.models.hf.llama import Llama
from nemo_dpo.models.hf.mixtral import Mixtral
from nemo_dpo.models.hf.qwen2 import Qwen2
from nemo_dpo.models.hf.qwen3 import Qwen3
from nemo_dpo.models.hf.qwen3_moe import Qwen3Moe
# generation_config_files, read_hf_config, read_hf_weights and write_hf_dir are part of this package's API.
from nemo_dpo.models.hf.model_folder import (  # noqa: F401
    CONFIG_FILE,
    generation_config_files,
    read_hf_config,
    read_hf_weights,
    write_hf_dir,
)

# Export tries the families in this order; an error lists them in this order too.
FAMILIES = (Llama(), Qwen2(), Qwen3(), Mixtral(), Qwen3Moe(), GPT2())
SUPPORTED = tuple(model_type for family in FAMILIES for model_type in family.model_types)


def _family(hf_config: dict) -> Family:
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(f"{CONFIG_FILE}: model_type {model_type!r} is not supported (supported: {list(SUPPORTED)})")


def model_overrides_from_hf(hf_config: dict) -> dict:
    """Values for the ``model`` section of conf/gpt_dpo.yaml that rebuild the HF architecture."""
    family = _family(hf_config)
    settings = family.model_settings(hf_config)
    outside = set(settings) - set(ARCHITECTURE_KEYS)
    if outside:  # a checkpoint keeps only the architecture keys: these would be lost on the way through one
        raise RuntimeError(f"the {family.architecture} adapter sets {sorted(outside)}, which are not architecture keys")
    return settings


def hf_aux_loss_coeff(hf_config: dict) -> float:
    """The router load-balancing loss weight config.json trains with (0 for a dense model, or when
    ``output_router_logits`` is false): the default of ``model.moe_aux_loss_coeff``."""
    return _family(hf_config).aux_loss_coeff(hf_config)


def hf_vocab_size(hf_config: dict) -> int:
    """The vocabulary size of config.json (embedding rows before padding)."""
    return config_size(hf_config, "vocab_size")


def hf_config_from_model(model_cfg, vocab_size: int, eos_id: int, bos_id: int) -> dict:
    """config.json describing our ``model`` section as the first family that can represent it."""
    needs = {}
    for family in FAMILIES:
        needs[family.architecture] = family.export_mismatches(model_cfg)
        if not needs[family.architecture]:
            return family.hf_config(model_cfg, vocab_size, eos_id, bos_id)
    raise ValueError(
        "the model config fits no exportable Hugging Face architecture: "
        + "; ".join(f"{architecture} would need {', '.join(keys)}" for architecture, keys in needs.items())
    )


def _rules(hf_config: dict) -> list[TensorRule]:
    settings = model_overrides_from_hf(hf_config)
    vocab = hf_vocab_size(hf_config)
    rules = _family(hf_config).rules(settings, vocab)
    if not settings["share_embeddings_and_output_weights"]:
        rules.append(
            TensorRule("output_layer.weight", ("lm_head.weight",), ((vocab, settings["hidden_size"]),), vocab=True)
        )
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


def _model_weights(hf_config: dict, hf_weights: dict, rules: list[TensorRule]) -> dict:
    """HF weights under the names the rules use, without what the model does not need.

    The family renames or drops (buffers recomputed from the config) each tensor;
    a tied ``lm_head.weight``, where present, must be the embedding itself.
    """
    family = _family(hf_config)
    weights = {}
    for name, tensor in hf_weights.items():
        name = family.weight_name(name)
        if name is not None:
            weights[name] = tensor
    tied = model_overrides_from_hf(hf_config)["share_embeddings_and_output_weights"]
    if tied and "lm_head.weight" in weights:
        (embedding,) = [rule.hf_names[0] for rule in rules if rule.name == "embedding.word_embeddings.weight"]
        lm_head = weights.pop("lm_head.weight")
        if embedding in weights and not torch.equal(lm_head, weights[embedding]):
            raise ValueError(
                f"tie_word_embeddings is true in {CONFIG_FILE}, but lm_head.weight differs from {embedding}"
            )
    return weights


def hf_to_global(hf_config: dict, hf_weights: dict, padded_vocab: int) -> dict:
    """HF tensors -> megatron global names; embedding/output rows zero-padded to ``padded_vocab``."""
    rules = _rules(hf_config)
    hf_weights = _model_weights(hf_config, hf_weights, rules)
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
    vocab = hf_vocab_size(hf_config)
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
