"""Where this process sits in the TP x PP x DP grid (and EP within DP): the one object every layer asks.

megatron keeps the parallel layout in module globals (``parallel_state``). Rather
than every module reaching into those globals, the layout is read once, when
the process groups exist, into a :class:`Layout`; the trainer hands it down and
library code that runs outside a trainer (conversion, tests) asks
:func:`current`. This is the only module outside ``distributed/init.py`` that
talks to ``parallel_state``, so a new dimension (context or expert parallelism)
is added here, once.

Expert parallelism (EP) splits a mixture-of-experts layer's experts over EP
ranks carved out of the data-parallel ranks: the ranks of an EP group hold
different pairs and different experts, and exchange tokens inside each MoE
layer. Everything outside the experts keeps the TP x PP x DP layout, so EP
adds no dimension to the world size: DP must be a multiple of EP.
"""

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from nemo_dpo.ranges import Integer

RANGES = {
    "model.tensor_model_parallel_size": Integer(ge=1),
    "model.pipeline_model_parallel_size": Integer(ge=1),
    "model.expert_model_parallel_size": Integer(ge=1),
}


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates; groups and questions derived from them."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    ep: int = 1
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def contributes_metrics(self) -> bool:
        """Whether this rank holds its DP replica's per-pair statistics (the last stage, once per TP group)."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def sizes(self) -> tuple:
        """(TP, PP, DP, EP): a checkpoint records these to tell whether per-rank state (RNG) can be restored."""
        return (self.tp, self.pp, self.dp, self.ep)

    @property
    def rng_grid(self) -> tuple:
        """(grid shape, this rank's offset) addressing per-rank state: (PP, TP, DP) and (pp_rank, tp_rank, dp_rank)."""
        return (self.pp, self.tp, self.dp), (self.pp_rank, self.tp_rank, self.dp_rank)

    @property
    def tp_group(self):
        """The tensor-parallel process group, or None when TP is 1 (nothing to reduce)."""
        return parallel_state.get_tensor_model_parallel_group() if self.tp > 1 else None

    @property
    def dp_group(self):
        return parallel_state.get_data_parallel_group()


def check_layout(world_size: int, tp: int, pp: int, ep: int = 1) -> int:
    """Validate the parallel sizes against the world size; return the DP size."""
    for key, value in (
        ("model.tensor_model_parallel_size", tp),
        ("model.pipeline_model_parallel_size", pp),
        ("model.expert_model_parallel_size", ep),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by model.tensor_model_parallel_size ({tp}) x "
            f"model.pipeline_model_parallel_size ({pp}) = {tp * pp}"
        )
    dp = world_size // (tp * pp)
    if dp % ep != 0:
        raise ValueError(
            f"model.expert_model_parallel_size ({ep}) must divide the data-parallel size {dp} (world size "
            f"{world_size} / (TP {tp} x PP {pp})): expert-parallel groups are made of data-parallel ranks"
        )
    return dp


def read_layout(rank: int, world_size: int, device: torch.device) -> Layout:
    """The layout of megatron's initialised process groups."""
    return Layout(
        rank=rank,
        world_size=world_size,
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
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
