"""Per-token log-probabilities from vocab-parallel logits, without gathering them.

Each TP rank holds logits for a contiguous slice of the vocabulary. log p(y) =
z_y - logsumexp(z) needs only three scalars per token from the whole vocabulary:
the max (for stability), the sum of exponentials, and the target's logit (which
lives on exactly one rank). Each is an all-reduce of a [tokens] tensor, so
memory and traffic are O(tokens), never O(tokens x vocab).

``chunked_log_probs`` goes one step further for long sequences and large
vocabularies: it takes the final hidden states and applies the output layer
itself, a chunk of tokens at a time, recomputing each chunk's logits in backward.

Vocabulary padding (rows beyond the tokenizer's vocabulary, added so that TP
slices are equal) gets no probability mass: the model's distribution is over
real tokens only, at every TP size.

With bf16 logits and the whole vocabulary on one rank, the chunked path can
compute the log-softmax tail fused (``fused``: one compiled kernel per direction,
fp32 inside): log p(y) straight from a chunk's bf16 logits, and in backward the
logits' bf16 gradient 1[j == y] - softmax_j straight from them too, where the
eager tail writes the chunk's logits in fp32, its log-softmax and its softmax,
each [chunk, vocab] in fp32 (at a 32k vocabulary and 256 tokens, 33 MB each:
memory the allocator maps and faults in afresh every time on CPU). The same
flag sums each chunk's bf16 weight-gradient product into the fp32 total in one
compiled pass, where eager PyTorch first converts the product to an fp32
temporary ([vocab, h]: 16 MiB at 8k x 512, 12 of them a step in the benchmark).

WPO's weights need one more number per token from the whole distribution,
log sum_v p(v)^2; ``*_log_sum_sq_probs`` compute it the same way (two more
all-reduced sums), forward only, and only for a loss that asks for it.
"""

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from nemo_dpo.compiled import compiled


def _real_vocab_logits(logits, vocab_size, group):
    """fp32 logits of this rank's vocabulary slice with the padding rows at -inf, and the slice's first id."""
    logits = logits.float()
    rank = dist.get_rank(group) if group is not None else 0
    shard = logits.shape[-1]
    start = rank * shard
    if start + shard > vocab_size:  # decided on the host: a test of the ids on the device would wait for it
        logits = logits.masked_fill(torch.arange(start, start + shard, device=logits.device) >= vocab_size,
                                    float("-inf"))
    return logits, start


def _log_probs_and_softmax(logits, target, vocab_size, group, with_softmax=True):
    """log p(target) and (if ``with_softmax``, for the gradient) this shard's softmax, from a [tokens, vocab/TP] shard."""
    logits, start = _real_vocab_logits(logits, vocab_size, group)
    shard = logits.shape[-1]
    in_shard = (target >= start) & (target < start + shard)
    local_target = (target - start).clamp(0, shard - 1)

    if group is None:  # the whole vocabulary is here: one fused pass
        log_softmax = torch.log_softmax(logits, dim=-1)
        log_probs = log_softmax.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        return log_probs, log_softmax.exp_() if with_softmax else None, in_shard, local_target

    local_max = logits.max(dim=-1).values
    dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - local_max.unsqueeze(-1)
    target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(in_shard, target_logit, torch.zeros_like(target_logit))
    exp = shifted.exp()
    stacked = torch.stack([exp.sum(dim=-1), target_logit])
    dist.all_reduce(stacked, group=group)
    sum_exp, target_logit = stacked[0], stacked[1]
    log_probs = target_logit - sum_exp.log()
    return log_probs, exp.div_(sum_exp.unsqueeze(-1)) if with_softmax else None, in_shard, local_target


def _logit_grad(softmax, in_shard, local_target, grad_output):
    """d log p(y) / d z_j = 1[j == y] - softmax_j, times the incoming gradient (in place on softmax)."""
    grad = softmax.mul_(-grad_output.unsqueeze(-1))
    grad.scatter_add_(-1, local_target.unsqueeze(-1), (grad_output * in_shard).unsqueeze(-1))
    return grad


def _fused_log_probs(logits, target, vocab_size: int):
    """log p(target) from a whole-vocabulary block (compiled: the fp32 logits exist only inside the kernel)."""
    z, _ = _real_vocab_logits(logits, vocab_size, None)
    return z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _accumulate(total, part):
    """total += part in place, converting ``part`` to ``total``'s dtype element by element (compiled)."""
    total.add_(part)


def _fused_logit_grad(logits, target, vocab_size: int, grad_output):
    """(1[j == y] - softmax_j) times the incoming gradient, in the logits' dtype (compiled, as above)."""
    z, _ = _real_vocab_logits(logits, vocab_size, None)
    one_hot = (torch.arange(z.shape[-1], device=z.device) == target.unsqueeze(-1)).float()
    return ((one_hot - torch.softmax(z, dim=-1)) * grad_output.unsqueeze(-1)).to(logits.dtype)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        with_softmax = ctx.needs_input_grad[0]
        log_probs, softmax, in_shard, local_target = _log_probs_and_softmax(
            logits, target, vocab_size, group, with_softmax
        )
        if with_softmax:
            ctx.save_for_backward(softmax, in_shard, local_target)
        return log_probs

    @staticmethod
    def backward(ctx, grad_output):
        return _logit_grad(*ctx.saved_tensors, grad_output), None, None, None


class _ChunkedOutputLogProbs(torch.autograd.Function):
    """Output layer + log-probs, ``chunk`` tokens at a time, recomputing the logits in backward.

    Only one chunk's [chunk, vocab/TP] fp32 logits exist at any time, forward or backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_size, group, chunk, fused):
        log_probs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            logits = hidden[lo : lo + chunk].to(weight.dtype) @ weight.t()
            chunk_target = target[lo : lo + chunk]
            log_probs[lo : lo + chunk] = (
                compiled(_fused_log_probs)(logits, chunk_target, vocab_size) if fused
                else _log_probs_and_softmax(logits, chunk_target, vocab_size, group, False)[0])
        ctx.save_for_backward(hidden, weight, target)
        ctx.vocab_size, ctx.group, ctx.chunk, ctx.fused = vocab_size, group, chunk, fused
        return log_probs

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, target = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for lo in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[lo : lo + ctx.chunk].to(weight.dtype)
            logits, chunk_target, chunk_grad = h @ weight.t(), target[lo : lo + ctx.chunk], grad_output[lo : lo + ctx.chunk]
            # The logits' gradient in the weight's dtype, as the output layer's own backward takes it: both
            # matmuls then run at the weight's precision (bf16: 2x fp32's speed on CPUs with AVX512-BF16), and
            # the eager tail's fp32 softmax is freed before them.
            if ctx.fused:
                grad_logits = compiled(_fused_logit_grad)(logits, chunk_target, ctx.vocab_size, chunk_grad)
            else:
                stats = _log_probs_and_softmax(logits, chunk_target, ctx.vocab_size, ctx.group)
                grad_logits = _logit_grad(*stats[1:], chunk_grad).to(weight.dtype)
                del stats
            del logits
            grad_hidden[lo : lo + ctx.chunk] = grad_logits @ weight
            # Each chunk's weight gradient summed in fp32: in fp32 into place (no [vocab, h] product per chunk); a
            # bf16 product converted on the fly where compiling is on, else through eager's fp32 temporary.
            if grad_logits.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.t(), h)
            elif ctx.fused:
                compiled(_accumulate)(grad_weight, grad_logits.t() @ h)
            else:
                grad_weight += grad_logits.t() @ h
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """log p(target) per position, fp32, from logits sharded over ``tp_group``'s vocab (None: TP is 1).

    logits: [..., vocab/TP] (any float dtype); target: [...] global token ids.
    The gradient flows back into this rank's logit slice only.
    """
    return _VocabParallelLogProbs.apply(logits, target, vocab_size, tp_group)


def chunked_log_probs(hidden, weight, target, vocab_size: int, chunk: int, tp_group, fused: bool = False) -> torch.Tensor:
    """log p(target) from final hidden states and the (vocab-parallel) output weight, ``chunk`` tokens at a time.

    hidden: [..., h], replicated over TP; weight: [vocab/TP, h]; target: [...].
    Same values and gradients as the output layer followed by ``vocab_parallel_log_probs``,
    without ever holding the full [tokens, vocab/TP] logits. ``fused``: the log-softmax tail and the bf16
    weight-gradient sum compiled (the whole vocabulary on this rank: ``tp_group`` None), the same to fp32 rounding.
    """
    if fused and tp_group is not None:
        raise ValueError("the fused log-softmax tail takes the whole vocabulary on one rank (tensor parallel size 1)")
    if tp_group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden)  # backward: sum the hidden grads over TP
    shape = target.shape
    flat = _ChunkedOutputLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                       vocab_size, tp_group, chunk, fused)
    return flat.reshape(shape)


def _log_sum_sq(logits, vocab_size, group):
    """log sum_v p(v)^2 per token from a [tokens, vocab/TP] shard: log sum exp(2 z') - 2 log sum exp(z'), z' = z - max."""
    logits, _ = _real_vocab_logits(logits, vocab_size, group)
    local_max = logits.max(dim=-1).values
    if group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - local_max.unsqueeze(-1)
    sums = torch.stack([shifted.exp().sum(dim=-1), (2 * shifted).exp().sum(dim=-1)])
    if group is not None:
        dist.all_reduce(sums, group=group)
    return sums[1].log() - 2 * sums[0].log()


@torch.no_grad()
def vocab_parallel_log_sum_sq_probs(logits: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """log sum_v p(v)^2 per position (fp32, no gradient), from logits sharded over ``tp_group``'s vocab."""
    return _log_sum_sq(logits, vocab_size, tp_group)


@torch.no_grad()
def chunked_log_sum_sq_probs(hidden, weight, vocab_size: int, chunk: int, tp_group) -> torch.Tensor:
    """The same from final hidden states and the output weight, ``chunk`` tokens at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=hidden.device)
    for lo in range(0, flat.shape[0], chunk):
        out[lo : lo + chunk] = _log_sum_sq(flat[lo : lo + chunk].to(weight.dtype) @ weight.t(), vocab_size, tp_group)
    return out.reshape(hidden.shape[:-1])
