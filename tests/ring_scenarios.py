"""What each process does in tests/test_ring_attention.py (imported by the spawned processes)."""

import torch
import torch.distributed as dist

from nemo_dpo.data.context_split import share_indices
from nemo_dpo.models.ring_attention import Ring, ring_attention


class RingLayout:
    """The part of a Layout that Ring reads, for a CP group given by its global ranks."""

    def __init__(self, ranks: list, group):
        self.cp, self.cp_rank, self.cp_group, self.ranks = len(ranks), ranks.index(dist.get_rank()), group, ranks

    def cp_peer(self, offset: int) -> int:
        return self.ranks[(self.cp_rank + offset) % self.cp]


def whole_attention(query, key, value, bounds: list, scale: float) -> torch.Tensor:
    """Causal attention of each sequence of ``bounds`` on its own, GQA groups repeated: [len, b, heads, dim]."""
    repeats = query.shape[2] // key.shape[2]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[start:end].permute(1, 2, 0, 3) for x in (query, key, value))
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        pieces.append(out.permute(2, 0, 1, 3))
    return torch.cat(pieces)


def compare(cp_ranks: list, group, bounds: list, batch: int, dtype=torch.float32) -> dict:
    """Ring attention over ``cp_ranks`` (inputs in ``dtype``) vs whole attention in float32: this rank's rows of the
    output and the input gradients (the largest differences)."""
    gen = torch.Generator().manual_seed(len(cp_ranks) * 100 + len(bounds))
    length, heads, groups, dim = bounds[-1], 4, 2, 8
    query = torch.randn(length, batch, heads, dim, generator=gen)
    key, value = (torch.randn(length, batch, groups, dim, generator=gen) for _ in range(2))
    upstream = torch.randn(length, batch, heads, dim, generator=gen)
    inputs = [x.clone().requires_grad_(True) for x in (query, key, value)]
    want = whole_attention(*inputs, bounds, 0.3)
    (want * upstream).sum().backward()

    layout = RingLayout(cp_ranks, group)
    index = share_indices(bounds, layout.cp_rank, layout.cp)
    local = [x.detach()[index].to(dtype).requires_grad_(True) for x in (query, key, value)]
    local_bounds = [b // layout.cp for b in bounds]
    got = ring_attention(*local, local_bounds, 0.3, Ring(layout))
    assert got.dtype == dtype and all(x.dtype == dtype for x in local)
    (got * upstream[index].to(dtype)).sum().backward()
    errors = {"out": (got.float() - want[index]).abs().max().item()}
    for name, x, whole in zip(("query", "key", "value"), local, inputs):
        errors[name] = (x.grad.float() - whole.grad[index]).abs().max().item()
    return errors


def ring_cases() -> dict:
    """On 3 processes: CP=3 over all of them, CP=2 over ranks 0 and 1; one sequence per row, and packed rows."""
    dist.init_process_group("gloo")
    try:
        pair = dist.new_group([0, 1])
        results = {
            "cp3": compare([0, 1, 2], None, [0, 24], batch=2),
            "cp3_packed": compare([0, 1, 2], None, [0, 12, 18, 42], batch=1),
        }
        if dist.get_rank() < 2:
            results["cp2"] = compare([0, 1], pair, [0, 16], batch=2)
            results["cp2_packed"] = compare([0, 1], pair, [0, 8, 20, 24], batch=1)
            results["cp2_bf16"] = compare([0, 1], pair, [0, 16], batch=2, dtype=torch.bfloat16)
    finally:
        dist.destroy_process_group()
    return results
