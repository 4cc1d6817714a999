"""Where this process sits in the TP x CP x PP x DP grid (and EP within DP): the one object every layer asks.

megatron keeps the parallel layout in module globals (``parallel_state``). Rather
than every module reaching into those globals, the layout is read once, when
the process groups exist, into a :class:`Layout`; the trainer hands it down and
library code that runs outside a trainer (conversion, tests) asks
:func:`current`. This is the only module outside ``distributed/init.py`` that
talks to ``parallel_state``, so a new dimension is added here, once, as context
parallelism, the interleaved pipeline and expert parallelism were.

Context parallelism (CP) splits every sequence over CP ranks that hold the same
weights; for gradients they are data-parallel replicas (megatron's DDP reduces
over DP x CP), for the per-sequence sums of the loss they are parts of one
replica (summed over the CP group). The interleaved pipeline gives each
pipeline rank ``vpp`` model chunks instead of one.

Expert parallelism (EP) splits a mixture-of-experts layer's experts over EP
ranks carved out of the data-parallel ranks: the ranks of an EP group hold
different pairs and different experts, and exchange tokens inside each MoE
layer. Everything outside the experts keeps the TP x CP x PP x DP layout, so EP
adds no dimension to the world size: DP must be a multiple of EP.
"""

import os
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from nemo_dpo.ranges import Integer

RANGES = {
    "model.tensor_model_parallel_size": Integer(ge=1),
    "model.pipeline_model_parallel_size": Integer(ge=1),
    "model.context_parallel_size": Integer(ge=1),
    "model.virtual_pipeline_model_parallel_size": Integer(ge=2, nullable=True),
    "model.expert_model_parallel_size": Integer(ge=1),
    "trainer.num_nodes": Integer(ge=1, nullable=True),
    "trainer.devices": Integer(ge=1, nullable=True),
}


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates; groups and questions derived from them."""

    rank: int
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    vpp: int  # model chunks per pipeline rank (the interleaved schedule's virtual stages; 1 without)
    device: torch.device
    ep: int = 1
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def chunk_is_first(self, chunk: int) -> bool:
        """Whether model chunk ``chunk`` of this rank holds the embedding (the first virtual stage)."""
        return self.is_first_stage and chunk == 0

    def chunk_is_last(self, chunk: int) -> bool:
        """Whether model chunk ``chunk`` of this rank holds the output layer (the last virtual stage)."""
        return self.is_last_stage and chunk == self.vpp - 1

    @property
    def contributes_metrics(self) -> bool:
        """Whether this rank holds its DP replica's per-pair statistics (the last stage, once per TP and CP group)."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0

    @property
    def sizes(self) -> tuple:
        """(TP, PP, DP, CP, EP): a checkpoint records these to tell whether per-rank state (RNG) can be restored."""
        return (self.tp, self.pp, self.dp, self.cp, self.ep)

    @property
    def rng_grid(self) -> tuple:
        """(grid shape, this rank's offset) addressing per-rank state: (PP, TP, DP x CP) and (pp_rank, tp_rank,
        dp_rank x CP + cp_rank); at CP=1 the grid of checkpoints written before context parallelism."""
        offset = (self.pp_rank, self.tp_rank, self.dp_rank * self.cp + self.cp_rank)
        return (self.pp, self.tp, self.dp * self.cp), offset

    @property
    def tp_group(self):
        """The tensor-parallel process group, or None when TP is 1 (nothing to reduce)."""
        return parallel_state.get_tensor_model_parallel_group() if self.tp > 1 else None

    @property
    def dp_group(self):
        """The data-parallel process group without the CP ranks (they hold parts of the same sequences), or None when
        DP is 1."""
        return parallel_state.get_data_parallel_group(with_context_parallel=False) if self.dp > 1 else None

    @property
    def cp_group(self):
        """The context-parallel process group, or None when CP is 1 (every sequence is whole here)."""
        return parallel_state.get_context_parallel_group() if self.cp > 1 else None

    def cp_peer(self, offset: int) -> int:
        """The global rank of the CP rank ``offset`` places after this one in the CP ring."""
        return parallel_state.get_context_parallel_global_ranks()[(self.cp_rank + offset) % self.cp]


def check_layout(world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1) -> int:
    """Validate the parallel sizes against the world size; return the DP size."""
    sizes = (("model.tensor_model_parallel_size", tp), ("model.pipeline_model_parallel_size", pp),
             ("model.context_parallel_size", cp))
    for key, value in sizes + (("model.expert_model_parallel_size", ep),):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if world_size % (tp * pp * cp) != 0:
        shown = sizes if cp > 1 else sizes[:2]
        factors = " x ".join(f"{key} ({value})" for key, value in shown)
        raise ValueError(f"world size {world_size} is not divisible by {factors} = {tp * pp * cp}")
    dp = world_size // (tp * pp * cp)
    if dp % ep != 0:
        shown = f"TP {tp} x PP {pp}" + (f" x CP {cp}" if cp > 1 else "")
        raise ValueError(
            f"model.expert_model_parallel_size ({ep}) must divide the data-parallel size {dp} (world size "
            f"{world_size} / ({shown})): expert-parallel groups are made of data-parallel ranks"
        )
    return dp


def check_launch(world_size: int, num_nodes: int | None, devices: int | None) -> None:
    """``trainer.num_nodes`` x ``trainer.devices`` (NeMo-Aligner's keys; null = as launched) against the processes
    that were started: ``world_size``, and torchrun's processes per node (``LOCAL_WORLD_SIZE``) where it says."""
    launched = os.environ.get("LOCAL_WORLD_SIZE")
    per_node = int(launched) if launched else None
    how = "torchrun --nnodes x --nproc_per_node, or srun's tasks"
    if devices is not None and per_node is not None and devices != per_node:
        raise ValueError(f"trainer.devices is {devices}, but {per_node} processes were started on this node "
                         f"(torchrun --nproc_per_node {per_node}): launch {devices}, or set trainer.devices={per_node} "
                         f"(null = as launched)")
    devices = devices if devices is not None else per_node
    if num_nodes is not None and devices is not None and num_nodes * devices != world_size:
        raise ValueError(f"trainer.num_nodes ({num_nodes}) x trainer.devices ({devices}) = {num_nodes * devices} "
                         f"processes, but the run has {world_size} ({how}); launch {num_nodes * devices}, or make "
                         f"the two keys say what was launched (null = as launched)")
    for key, count in (("trainer.num_nodes", num_nodes), ("trainer.devices", devices)):
        if count is not None and world_size % count != 0:
            raise ValueError(f"{key} is {count}, but the run has {world_size} processes ({how}), not a multiple of "
                             f"it (null = as launched)")


def read_layout(rank: int, world_size: int, device: torch.device) -> Layout:
    """The layout of megatron's initialised process groups."""
    return Layout(
        rank=rank,
        world_size=world_size,
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        device=device,
        ep=parallel_state.get_expert_model_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
    )


_CURRENT = None


def set_current(layout) -> None:
    """Record the layout of the process groups just built (or None once they are torn down)."""
    global _CURRENT
    _CURRENT = layout


def current() -> Layout:
    """The layout set up by ``distributed.init.init_distributed`` in this process."""
    if _CURRENT is None:
        raise RuntimeError("the parallel layout is not initialised: call nemo_dpo.distributed.init.init_distributed first")
    return _CURRENT
