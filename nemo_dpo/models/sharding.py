"""Map this rank's parameters to the whole model (TP=1, PP=1) and back.

Every local parameter has a *global* name (its name in the unsplit model) and a
slice of the global tensor it holds. Layout-independent initialisation and
checkpoint conversion are both built on this one mapping. A mixture-of-experts
layer's experts are numbered globally too: expert-parallel rank r holds experts
r * E/EP .. (r + 1) * E/EP - 1 as its local experts 0 .. E/EP - 1, and within
an expert TP splits the matrices as it splits a dense MLP's (megatron's expert
tensor parallelism, of TP's size).
"""

import re

import torch
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from nemo_dpo.distributed import layout

_LAYER = re.compile(r"^(.*decoder\.layers\.)(\d+)(\..*)$")
# transformer-engine's layer spec fuses the norms into the following linear layer;
# global names are those of the local spec, whichever spec built the model.
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
# Experts as the local spec names them (megatron's SequentialMLP), and as transformer-engine's grouped GEMM does.
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def _expert_name(suffix: str, expert_offset: int) -> str:
    """A layer's parameter name with its local expert number made global (other names unchanged)."""
    local = _LOCAL_EXPERT.match(suffix)
    if local:
        return f"mlp.experts.local_experts.{int(local.group(1)) + expert_offset}.{local.group(2)}"
    grouped = _GROUPED_EXPERT.match(suffix)
    if grouped:
        linear, kind, index = grouped.groups()
        return f"mlp.experts.local_experts.{int(index) + expert_offset}.{linear}.{kind}"
    return suffix


def global_name(local_name: str, layer_offset: int, tied_output: bool, expert_offset: int = 0) -> str:
    """Name of a local parameter in the unsplit model.

    Pipeline stages number their layers from 0; the global index adds the stage's
    offset, and an expert's number adds the expert-parallel rank's first expert.
    A tied output layer on the last stage is a copy of the word embedding.
    """
    if tied_output and local_name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    match = _LAYER.match(local_name)
    if match:
        prefix, index, suffix = match.groups()
        suffix = "." + _expert_name(_TE_NORMS.get(suffix[1:], suffix[1:]), expert_offset)
        return f"{prefix}{int(index) + layer_offset}{suffix}"
    return local_name


def full_shape(param: torch.Tensor, tp: int) -> tuple:
    """Shape of the unsplit tensor of which ``param`` is this rank's slice."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def tp_slice(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's part of ``full`` in megatron's layout.

    A strided partition (stride s) cuts the dimension into s*tp blocks and rank r
    holds blocks r, r+tp, ...: e.g. SwiGLU's fc1 keeps [gate_r; up_r] per rank.
    """
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = torch.chunk(full, stride * tp, dim=dim)
    return torch.cat(blocks[tp_rank::tp], dim=dim)


def local_to_global_names(model, config) -> dict:
    """``{local name: global name}`` for this rank's model chunk (a GPTModel; its ``vp_stage`` under the
    interleaved schedule)."""
    offset = get_transformer_layer_offset(config, vp_stage=getattr(model, "vp_stage", None))
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    experts = (config.num_moe_experts or 0) // config.expert_model_parallel_size
    expert_offset = layout.current().ep_rank * experts
    return {name: global_name(name, offset, tied, expert_offset) for name, _ in model.named_parameters()}


def load_global_state_dict(model, config, full_state: dict) -> None:
    """Copy each local parameter's slice out of a whole-model (TP=1, PP=1) state dict."""
    tp_rank, tp = layout.current().tp_rank, layout.current().tp
    names = local_to_global_names(model, config)
    with torch.no_grad():
        for local, param in model.named_parameters():
            name = names[local]
            if name not in full_state:
                raise KeyError(f"parameter {name} is missing from the state dict")
            full = full_state[name]
            if tuple(full.shape) != full_shape(param, tp):
                raise ValueError(
                    f"parameter {name}: the state dict has shape {tuple(full.shape)}, "
                    f"the model expects {full_shape(param, tp)}"
                )
            param.copy_(tp_slice(full.to(param.dtype), param, tp_rank, tp))
