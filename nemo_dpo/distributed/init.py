"""Process-group and model-parallel setup from torchrun's environment."""

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from nemo_dpo.distributed import cpu_compat
from nemo_dpo.distributed.layout import Layout, check_layout, read_layout, set_current
from nemo_dpo.ranges import Integer, Real

RANGES = {
    "model.seed": Integer(ge=0, le=2**31 - 1),  # numpy's seeds stop at 2**32 - 1; each rank adds a small offset
    "trainer.distributed_timeout_minutes": Real(gt=0),  # fractions too (a test waits seconds, not minutes)
}


def init_distributed(tp: int, pp: int, seed: int, timeout_minutes: int = 30, cp: int = 1, vpp: int = None,
                     ep: int = 1) -> Layout:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and megatron's parallel state.

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT as set by torchrun
    (or Slurm via srun + torchrun). A plain ``python`` run is a world of one; its
    store listens on a port the kernel picks, as no other process needs to find it,
    so that plain runs, converts and benches side by side never meet on one port.
    ``cp``: context-parallel size; ``vpp``: model chunks per pipeline rank (None: one);
    ``ep``: expert-parallel size (megatron builds the expert groups, expert-parallel and
    expert-data-parallel, from data-parallel ranks).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_layout(world_size, tp, pp, cp, ep)

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        cpu_compat.apply()
        device, backend = torch.device("cpu"), "gloo"

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0" if world_size == 1 else "29500")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        distributed_timeout_minutes=timeout_minutes,
    )
    layout = read_layout(rank, world_size, device)
    set_current(layout)
    seed_everything(seed, layout)
    return layout


def seed_everything(seed: int, layout: Layout) -> None:
    """Seed Python, NumPy and torch per rank, and megatron's model-parallel RNG streams.

    The default stream differs per pipeline stage and data-parallel rank (so dropout
    differs where it should); megatron derives the tensor-parallel stream from it.
    Weight init does not use these streams (see models/init_weights.py).
    """
    rank_seed = seed + 100 * layout.pp_rank + 10 * layout.dp_rank
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(rank_seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    set_current(None)
    if dist.is_initialized():
        dist.destroy_process_group()
