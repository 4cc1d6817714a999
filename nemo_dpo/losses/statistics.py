"""What a loss reports besides its value, and how each number becomes one metric of a global batch.

A loss returns, for each microbatch, a dict of detached tensors; its
``statistics`` say which entries are logged, under which metric name, and how
they average: one value per microbatch averages over the microbatches, one value
per pair averages over every pair, or over the pairs a mask of the stats selects
(``where``: KTO's desirable examples), which vary in number between microbatches
and ranks. Every statistic is therefore reduced as a sum and a count, added over
microbatches and data-parallel ranks, then divided; one selecting no pair of the
global batch is not logged for it (as TRL leaves out a side the batch lacks). The
training step reduces whatever a loss declares, so a loss with statistics of its
own (a KL estimate, a running mean) needs no change outside ``losses/``. All
averaging is done in float64.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Statistic:
    metric: str  # the name in metrics.jsonl, TensorBoard and on the console
    key: str  # the entry of the loss's per-microbatch stats dict
    per_pair: bool  # True: a [pairs] tensor, averaged over all pairs; False: a scalar, averaged over microbatches
    where: str | None = None  # per_pair only: the entry of a [pairs] bool mask; averaged over the pairs it selects


def local_sums(statistics: tuple, microbatch_stats: list) -> torch.Tensor:
    """[2, len(statistics)] float64: each statistic's sum and count over this rank's microbatches."""
    sums, counts = [], []
    for stat in statistics:
        parts = [stats[stat.key] for stats in microbatch_stats]
        values = (torch.cat(parts) if stat.per_pair else torch.stack(parts)).double()
        if stat.where is not None:
            values = values[torch.cat([stats[stat.where] for stats in microbatch_stats])]
        sums.append(values.sum())
        counts.append(values.new_tensor(values.numel()))
    return torch.stack([torch.stack(sums), torch.stack(counts)])
