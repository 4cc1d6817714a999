"""What a loss reports besides its value, and how each number becomes one metric of a global batch.

A loss returns, for each microbatch, a dict of detached tensors; its
``statistics`` say which entries are logged, under which metric name, and how
they average: one value per microbatch averages over the microbatches, one value
per pair averages over every pair. The training step reduces whatever a loss
declares, so a loss with statistics of its own (a KL estimate, a running mean)
needs no change outside ``losses/``. All averaging is done in float64.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Statistic:
    metric: str  # the name in metrics.jsonl, TensorBoard and on the console
    key: str  # the entry of the loss's per-microbatch stats dict
    per_pair: bool  # True: a [pairs] tensor, averaged over all pairs; False: a scalar, averaged over microbatches


def local_means(statistics: tuple, microbatch_stats: list) -> torch.Tensor:
    """[len(statistics)] float64: each statistic averaged over this rank's microbatches (equal-sized, so
    the mean over microbatches of a per-microbatch mean is the mean over this rank's pairs)."""
    values = []
    for stat in statistics:
        parts = [stats[stat.key] for stats in microbatch_stats]
        values.append((torch.cat(parts) if stat.per_pair else torch.stack(parts)).double().mean())
    return torch.stack(values)
