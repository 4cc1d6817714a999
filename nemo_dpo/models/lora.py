"""LoRA adapters on megatron's tensor-parallel linear layers.

An adapter adds ``scale * B(A(x))`` (scale = alpha / rank) to a frozen linear
layer's output, with A [rank, in] and B [out, rank]. Placed so that any TP size
computes exactly what TP=1 computes:

- column-parallel layers (attention qkv, mlp fc1) split their output: A is
  replicated, B is split like the layer's weight (fc1's SwiGLU stride too). The
  gradient reaching A is summed over the TP group, like the layer's input.
- row-parallel layers (attention output, mlp fc2) split their input: A is split
  along its input like the layer's weight, B is replicated, and A's partial
  products are summed over the TP group before B.

B starts at zero, so the adapted model starts equal to the base; that is what
makes the base model with adapters switched off the DPO reference, for free.
Adapters are siblings of the layer they adapt (``linear_qkv`` gets
``linear_qkv_lora``) and act through a forward hook, so base parameter names and
checkpoints are untouched. On a mixture-of-experts model adapters go on
attention only: the MLP targets are refused (:func:`check_lora_config`).
"""

from contextlib import contextmanager

import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from nemo_dpo.models.init_weights import init_weights
from nemo_dpo.ranges import Integer, ListOf, OneOf, Real

# NeMo's target_modules names -> (parent attribute, layer name, parallel style)
TARGETS = {
    "attention_qkv": ("self_attention", "linear_qkv", "column"),
    "attention_dense": ("self_attention", "linear_proj", "row"),
    "mlp_fc1": ("mlp", "linear_fc1", "column"),
    "mlp_fc2": ("mlp", "linear_fc2", "row"),
}
SUFFIX = "_lora"


PEFT_SCHEMES = ("none", "lora")  # model.peft.peft_scheme

RANGES = {
    "model.peft.peft_scheme": OneOf(choices=PEFT_SCHEMES),
    "model.peft.lora_tuning.adapter_dim": Integer(ge=1),
    "model.peft.lora_tuning.alpha": Real(gt=0),
    "model.peft.lora_tuning.adapter_dropout": Real(ge=0, lt=1),
    # an adapter per target: a name given twice would put a second adapter on the layer
    "model.peft.lora_tuning.target_modules": ListOf(each=OneOf(choices=tuple(TARGETS)), distinct=True),
}


def _tp_attributes(param, partitioned: bool, dim: int, stride: int = 1) -> None:
    param.tensor_model_parallel = partitioned
    param.partition_dim = dim if partitioned else -1
    param.partition_stride = stride


class LoRAAdapter(torch.nn.Module):
    def __init__(self, layer, style: str, rank: int, alpha: float, dropout: float, swiglu_fc1: bool):
        super().__init__()
        out_local, in_local = layer.weight.shape
        device, dtype = layer.weight.device, layer.weight.dtype
        self.style, self.scale, self.enabled, self.swiglu_fc1 = style, alpha / rank, True, swiglu_fc1
        self.dropout = torch.nn.Dropout(dropout)
        # Values come from models/init_weights.py (A random, B zero), the same at every layout.
        self.lora_a = torch.nn.Parameter(torch.empty(rank, in_local, device=device, dtype=dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_local, rank, device=device, dtype=dtype))
        if style == "column":
            _tp_attributes(self.lora_a, False, -1)
            _tp_attributes(self.lora_b, True, 0, getattr(layer.weight, "partition_stride", 1))
        else:
            _tp_attributes(self.lora_a, True, 1)
            _tp_attributes(self.lora_b, False, -1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the layer's (local) output."""
        hidden = torch.nn.functional.linear(self.dropout(x), self.lora_a)
        if self.style == "column":
            hidden = copy_to_tensor_model_parallel_region(hidden)  # backward: sum A's gradient over TP
        else:
            hidden = reduce_from_tensor_model_parallel_region(hidden)  # sum the input shards' products
        return self.scale * torch.nn.functional.linear(hidden, self.lora_b)

    def hook(self, layer, args, output):
        if not self.enabled:
            return output
        out, bias = output
        return out + self.delta(args[0]), bias

    @torch.no_grad()
    def merge_into(self, layer) -> None:
        """Fold ``scale * B A`` into this rank's slice of the layer's weight."""
        layer.weight.add_(self.scale * (self.lora_b @ self.lora_a))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        axis = {"lora_b": 0} if self.style == "column" else {"lora_a": 1}
        state = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis, sharded_offsets
        )
        if self.swiglu_fc1:  # B's rows follow fc1's [gate_r; up_r] layout
            key = f"{prefix}lora_b"
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets)
        return state


def check_lora_config(model_cfg) -> None:
    """LoRA adapts megatron's dense linear layers: on a mixture-of-experts model, attention only."""
    if model_cfg.peft.peft_scheme != "lora" or model_cfg.num_moe_experts is None:
        return
    mlp = [t for t in model_cfg.peft.lora_tuning.target_modules if TARGETS[t][0] == "mlp"]
    if mlp:
        raise ValueError(
            f"model.peft.lora_tuning.target_modules: {mlp} adapt a dense MLP, and with model.num_moe_experts "
            f"every MLP is a router and experts, which LoRA does not adapt here; attention_qkv and "
            f"attention_dense are supported"
        )


def _targets(model, target_modules):
    unknown = sorted(set(target_modules) - set(TARGETS))
    if unknown:
        raise ValueError(
            f"model.peft.lora_tuning.target_modules: unknown {unknown}; choose from {sorted(TARGETS)}"
        )
    for layer in model.decoder.layers:
        for target in target_modules:
            parent_name, name, style = TARGETS[target]
            parent = getattr(layer, parent_name)
            yield target, parent, name, getattr(parent, name), style


def add_lora(model, config, lora_cfg, seed: int) -> list:
    """Freeze every parameter of ``model``, attach trainable adapters and initialise them."""
    for param in model.parameters():
        param.requires_grad_(False)
    adapters = []
    for target, parent, name, layer, style in _targets(model, lora_cfg.target_modules):
        if hasattr(layer, "layer_norm_weight"):
            raise ValueError(
                f"LoRA on {target}: transformer-engine fuses the norm into {name}, so the adapter "
                f"cannot see the normalised input; leave {target} out of target_modules"
            )
        adapter = LoRAAdapter(
            layer, style, lora_cfg.adapter_dim, lora_cfg.alpha, lora_cfg.adapter_dropout,
            swiglu_fc1=config.gated_linear_unit and name == "linear_fc1",
        )
        parent.add_module(name + SUFFIX, adapter)
        adapter.hook_handle = layer.register_forward_hook(adapter.hook)
        adapters.append(adapter)
    init_weights(model, config, seed, trainable_only=True)
    return adapters


def adapters_of(model) -> list:
    return [m for m in model.modules() if isinstance(m, LoRAAdapter)]


@contextmanager
def adapters_disabled(model):
    """The base model: adapters off for the block, back on afterwards, whatever happens."""
    adapters = adapters_of(model)
    states = [a.enabled for a in adapters]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter, state in zip(adapters, states):
            adapter.enabled = state


def merge_lora(model) -> None:
    """Fold every adapter into its layer's weight and remove the adapters: a plain model again."""
    for layer_module in model.decoder.layers:
        for parent_name, name, _ in TARGETS.values():
            parent = getattr(layer_module, parent_name)
            adapter = getattr(parent, name + SUFFIX, None)
            if adapter is not None:
                adapter.merge_into(getattr(parent, name))
                adapter.hook_handle.remove()
                delattr(parent, name + SUFFIX)
