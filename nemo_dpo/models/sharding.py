"""Map this rank's parameters to the whole model (TP=1, PP=1) and back.

Every local parameter has a *global* name (its name in the unsplit model) and a
slice of the global tensor it holds. Layout-independent initialisation and
checkpoint conversion are both built on this one mapping.
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


def global_name(local_name: str, layer_offset: int, tied_output: bool) -> str:
    """Name of a local parameter in the unsplit model.

    Pipeline stages number their layers from 0; the global index adds the stage's
    offset. A tied output layer on the last stage is a copy of the word embedding.
    """
    if tied_output and local_name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    match = _LAYER.match(local_name)
    if match:
        prefix, index, suffix = match.groups()
        suffix = "." + _TE_NORMS.get(suffix[1:], suffix[1:])
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
    return {name: global_name(name, offset, tied) for name, _ in model.named_parameters()}



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
