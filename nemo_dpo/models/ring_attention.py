"""Causal attention over sequences spread across the context-parallel group: ring attention.

Under context parallelism (CP) each rank holds two chunks of every sequence,
chunk i and its mirror 2·CP-1-i (data/context_split.py), for queries, keys and
values alike. A query needs the keys and values of every earlier token, most of
which live on other ranks. Rather than gathering them, the CP ranks form a ring:
in CP steps each rank's key/value block travels once around it (point-to-point,
sent on while the current block is computed), and every rank attends its
queries to each block as it passes. Which queries see which keys follows from
the chunk order. For rank r and the block of rank s:

- s == r: the rank's own tokens, in sequence order: plain causal attention;
- s < r: block s's early chunk precedes both of r's chunks and its late chunk
  follows them: all queries attend to the early half of the block, no mask;
- s > r: both chunks of block s lie between r's chunks: only r's late queries
  see them, all of them, no mask.

So every step is one unmasked or causal call of PyTorch's flash-attention CPU
kernel per sequence, which also returns each query's log-sum-exp; the partial
results are merged with those (the softmax of the union of the blocks). For the
backward pass the kernel's own gradient, given the final output and log-sum-exp,
is exact for each block: the blocks go around the ring again, and each block's
key/value gradient travels with it until it is back with its owner.

Packed rows (``thd``) are attention per sequence: each sequence of the row has
its own two chunks on every rank, and the rules above apply sequence by
sequence. Grouped-query attention sends the key/value groups around and repeats
them to the query heads only for the kernel. Attention dropout is not supported
(the CPU kernel has none; the config refuses it). On a GPU, transformer-engine's
context-parallel attention does this job through megatron's own path.
"""

import torch
import torch.distributed as dist

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_KV_TAG, _GRAD_TAG = 1, 2  # the blocks and their gradients travel at the same time; tags keep them apart


class Ring:
    """This rank's neighbours in the CP group: blocks go to the next rank and come from the previous one."""

    def __init__(self, layout):
        self.rank, self.size, self.group = layout.cp_rank, layout.cp, layout.cp_group
        self.next, self.previous = layout.cp_peer(1), layout.cp_peer(-1)

    def pass_on(self, tensor: torch.Tensor, tag: int):
        """Send ``tensor`` on and receive the previous rank's; returns (the wait, the tensor being received)."""
        received = torch.empty_like(tensor)
        requests = [
            dist.isend(tensor.contiguous(), self.next, group=self.group, tag=tag),
            dist.irecv(received, self.previous, group=self.group, tag=tag),
        ]

        def wait():
            for request in requests:
                request.wait()
            return received

        return wait


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[len, b, heads, dim] -> [b, heads, len, dim], the kernel's layout."""
    return x.permute(1, 2, 0, 3)


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    """[b, heads, len, dim] -> [len, b, heads, dim]."""
    return x.permute(2, 0, 1, 3)


def _blocks(bounds: list, rank: int, source: int):
    """(query rows, key rows, causal) of each sequence for this rank's queries against ``source``'s block."""
    for start, end in zip(bounds[:-1], bounds[1:]):
        middle = (start + end) // 2
        if source == rank:
            yield slice(start, end), slice(start, end), True
        elif source < rank:
            yield slice(start, end), slice(start, middle), False
        else:
            yield slice(middle, end), slice(start, end), False


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bounds, scale, ring):
        repeats = query.shape[2] // key.shape[2]
        out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        lse = torch.full((query.shape[1], query.shape[2], query.shape[0]), float("-inf"), device=query.device)
        block = torch.stack([key, value])
        for step in range(ring.size):
            arriving = ring.pass_on(block, _KV_TAG) if step + 1 < ring.size else None
            source = (ring.rank - step) % ring.size
            for rows, cols, causal in _blocks(bounds, ring.rank, source):
                k, v = (_heads_first(x[cols]).repeat_interleave(repeats, dim=1) for x in block)
                part, part_lse = _FLASH(_heads_first(query[rows]), k, v, 0.0, causal, scale=scale)
                merged = torch.logaddexp(lse[..., rows], part_lse)
                keep = torch.exp(lse[..., rows] - merged).permute(2, 0, 1).unsqueeze(-1)
                add = torch.exp(part_lse - merged).permute(2, 0, 1).unsqueeze(-1)
                out[rows].mul_(keep).add_(_seq_first(part) * add)  # softmax over both: rescale to the new total
                lse[..., rows] = merged
            if arriving is not None:
                block = arriving()
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.bounds, ctx.scale, ctx.ring = bounds, scale, ring
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        ring, groups = ctx.ring, key.shape[2]
        repeats = query.shape[2] // groups
        grad_query = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        block = torch.stack([key, value])
        grad_block = torch.zeros(block.shape, dtype=torch.float32, device=block.device)
        for step in range(ring.size):
            arriving = ring.pass_on(block, _KV_TAG) if step + 1 < ring.size else None
            source = (ring.rank - step) % ring.size
            for rows, cols, causal in _blocks(ctx.bounds, ring.rank, source):
                k, v = (_heads_first(x[cols]).repeat_interleave(repeats, dim=1) for x in block)
                dq, dk, dv = _FLASH_BACKWARD(
                    _heads_first(grad_out[rows]), _heads_first(query[rows]), k, v, _heads_first(out[rows]),
                    lse[..., rows].contiguous(), 0.0, causal, scale=ctx.scale,
                )
                grad_query[rows] += _seq_first(dq).float()
                for index, grad in enumerate((dk, dv)):  # summed over the query heads of each group
                    grad = grad.unflatten(1, (groups, repeats)).sum(2)
                    grad_block[index, cols] += _seq_first(grad).float()
            grad_block = ring.pass_on(grad_block, _GRAD_TAG)()  # the next rank adds to it; the last one returns it
            if arriving is not None:
                block = arriving()
        grad_key, grad_value = grad_block.to(key.dtype)
        return grad_query.to(query.dtype), grad_key, grad_value, None, None, None


def ring_attention(query, key, value, bounds: list, scale: float, ring: Ring) -> torch.Tensor:
    """Causal attention of this rank's share of sequences, with the CP group's keys and values.

    query: [len, b, heads, dim]; key, value: [len, b, groups, dim], this rank's
    two chunks of each sequence; ``bounds``: where the sequences start in ``len``
    (then its end). Returns [len, b, heads, dim].
    """
    return _RingAttention.apply(query, key, value, bounds, scale, ring)
