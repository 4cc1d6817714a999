"""Random initialisation that gives the same model at every TP/PP layout.

megatron initialises each rank's slice from that rank's RNG stream, so a model
built at TP=2 differs from the one built at TP=1 with the same seed. Here each
parameter's *whole* tensor is drawn from a generator keyed by (seed, global
name) and the rank keeps its slice: same seed, same weights, any layout. That
is what makes layouts comparable bit for bit, and runs reproducible across them.
"""

import hashlib
import math

import torch

from nemo_dpo.distributed import layout
from nemo_dpo.models.sharding import full_shape, local_to_global_names, tp_slice

_SCALED_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def init_tensor(name: str, shape: tuple, seed: int, std: float, num_layers: int) -> torch.Tensor:
    """megatron's init rules on the whole tensor.

    Biases 0, norm scales 1, matrices N(0, std); the projections that write into
    the residual stream use std / sqrt(2 * num_layers) (GPT-2's scaled init).
    LoRA: B is 0 (the adapted model starts as the base), A is N(0, 1 / fan_in).
    """
    if len(shape) == 1 or name.endswith("lora_b"):
        return torch.zeros(shape) if name.endswith(("bias", "lora_b")) else torch.ones(shape)
    if name.endswith("lora_a"):
        std = 1.0 / math.sqrt(shape[1])
        return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))
    if name.endswith(_SCALED_OUTPUTS):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


def init_weights(model, config, seed: int, trainable_only: bool = False) -> None:
    """Fill the parameters of this rank's model (or only the trainable ones) from the layout-independent draw."""
    tp_rank, tp = layout.current().tp_rank, layout.current().tp
    names = local_to_global_names(model, config)
    with torch.no_grad():
        for local, param in model.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            full = init_tensor(names[local], full_shape(param, tp), seed, config.init_method_std, config.num_layers)
            param.copy_(tp_slice(full, param, tp_rank, tp))
