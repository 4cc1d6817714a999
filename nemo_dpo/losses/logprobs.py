"""Per-token log-probabilities from vocab-parallel logits, without gathering them.

Each TP rank holds logits for a contiguous slice of the vocabulary. log p(y) =
z_y - logsumexp(z) needs only three scalars per token from the whole vocabulary:
the max (for stability), the sum of exponentials, and the target's logit (which
lives on exactly one rank). Each is an all-reduce of a [tokens] tensor, so
memory and traffic are O(tokens), never O(tokens x vocab).

Vocabulary padding (rows beyond the tokenizer's vocabulary, added so that TP
slices are equal) gets no probability mass: the model's distribution is over
real tokens only, at every TP size.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        logits = logits.float()
        rank = dist.get_rank(group) if group is not None else 0
        shard = logits.shape[-1]
        start = rank * shard
        ids = torch.arange(start, start + shard, device=logits.device)
        padded = ids >= vocab_size
        if padded.any():
            logits = logits.masked_fill(padded, float("-inf"))

        local_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)

        in_shard = (target >= start) & (target < start + shard)
        local_target = (target - start).clamp(0, shard - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_shard, target_logit, torch.zeros_like(target_logit))

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            stacked = torch.stack([sum_exp, target_logit])
            dist.all_reduce(stacked, group=group)
            sum_exp, target_logit = stacked[0], stacked[1]

        log_probs = target_logit - sum_exp.log()
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, in_shard, local_target)
        return log_probs

    @staticmethod
    def backward(ctx, grad_output):
        # d log p(y) / d z_j = 1[j == y] - softmax_j
        softmax, in_shard, local_target = ctx.saved_tensors
        grad = softmax.mul_(-grad_output.unsqueeze(-1))
        grad.scatter_add_(
            -1, local_target.unsqueeze(-1), (grad_output * in_shard).unsqueeze(-1)
        )
        return grad, None, None, None


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(target) per position, fp32, from logits sharded over the TP group's vocab.

    logits: [..., vocab/TP] (any float dtype); target: [...] global token ids.
    The gradient flows back into this rank's logit slice only.
    """
    group = None
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
    return _VocabParallelLogProbs.apply(logits, target, vocab_size, group)
