"""One DPO global batch through megatron-core's microbatch scheduler.

A global batch arrives as this DP rank's list of microbatches (whole pairs,
chosen and rejected interleaved). The same forward step serves the reference
pass (forward only, per-token log-probs; training/reference.py runs it with the
reference in the model) and the policy pass (forward + backward through the
loss, whose declared statistics are averaged into the step's metrics). The loss
gets the per-sequence values it declares (``policy_values``, losses/sequences.py)
and the reference's that the reference attached; the step computes whatever is
asked without knowing which loss asks.
megatron's schedule runs them without pipelining, with 1F1B at PP > 1 or
interleaved 1F1B over several model chunks per pipeline rank, and divides each
microbatch's loss by the number of microbatches; with equal-sized microbatches
and the gradient averaged over DP by ``finalize_model_grads``, the gradient is
that of the global-batch mean loss at any layout.

Under context parallelism each rank holds part of every sequence: its
per-sequence values are partial sums and are summed over the CP group before the
loss, so every CP rank computes the same loss. Values summed over other tokens
than the response's (LD-DPO's shared length, ORPO's whole sequence) take masks
made from the whole sequences before the split (:func:`whole_sequence_masks`).
The schedule multiplies the loss by CP and DDP averages gradients over DP x CP,
so each CP rank's share of the gradient (its tokens' paths) adds up to the whole.
"""

from functools import partial

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from nemo_dpo.data.batching import Microbatch
from nemo_dpo.losses.logprobs import (
    chunked_log_probs,
    chunked_log_sum_sq_probs,
    vocab_parallel_log_probs,
    vocab_parallel_log_sum_sq_probs,
)
from nemo_dpo.losses.sequences import WPO_LOGPS, sequence_sums, sequence_values, value_masks
from nemo_dpo.losses.statistics import local_sums
from nemo_dpo.models.attention import SharedPromptParams
from nemo_dpo.models.gpt import emit_hidden_states, output_weight, unwrap
from nemo_dpo.ranges import Integer
from nemo_dpo.training import moe_aux_loss

RANGES = {"model.log_prob_chunk_size": Integer(ge=1, special={0: "all at once"})}


def response_sums(token_values: torch.Tensor, mb: Microbatch, cp_group=None) -> torch.Tensor:
    """[sequences] sums of per-token values over each sequence's response tokens.

    With ``cp_group`` (context parallelism) the microbatch is this rank's share of
    every sequence and the sums are summed over the group: all-reduced forward, and
    in backward each rank's share takes the gradient of the whole sum (megatron's
    reduce mapping, over the CP group).
    """
    sums = sequence_sums(token_values, mb.loss_mask, mb.segment_ids if mb.packed else None, mb.num_sequences)
    return sums if cp_group is None else reduce_from_tensor_model_parallel_region(sums, group=cp_group)


def check_schedule(model_cfg, dp: int) -> None:
    """The interleaved schedule takes microbatches in groups of PP: a step's must be a multiple of PP (ValueError)."""
    pp, vpp = model_cfg.pipeline_model_parallel_size, model_cfg.virtual_pipeline_model_parallel_size
    microbatches = model_cfg.global_batch_size // (model_cfg.micro_batch_size * dp)
    if vpp is not None and microbatches % pp != 0:
        raise ValueError(
            f"model.virtual_pipeline_model_parallel_size={vpp}: the microbatches of a step (model.global_batch_size "
            f"{model_cfg.global_batch_size} / (model.micro_batch_size {model_cfg.micro_batch_size} x data-parallel "
            f"size {dp}) = {microbatches}) must be a multiple of model.pipeline_model_parallel_size ({pp})"
        )


def response_values(names, token_log_probs: torch.Tensor, mb: Microbatch, cp_group=None, log_sum_sq=None) -> dict:
    """``{name: [sequences]}``: the per-sequence values ``names`` (losses/sequences.py) of a microbatch, summed over
    ``cp_group`` as :func:`response_sums` does; masks other than the loss mask come with the microbatch."""
    segment_ids = mb.segment_ids if mb.packed else None
    values = sequence_values(names, token_log_probs, mb.loss_mask, segment_ids, mb.num_sequences, log_sum_sq,
                             mb.value_masks)
    if cp_group is None:
        return values
    return {name: reduce_from_tensor_model_parallel_region(value, group=cp_group) for name, value in values.items()}


def whole_sequence_masks(names):
    """For the microbatcher: a whole microbatch's masks of the per-sequence values ``names`` (losses/sequences.py
    ``value_masks``), made before context parallelism cuts it."""

    def masks(mb: Microbatch) -> dict:
        return value_masks(names, mb.loss_mask, mb.segment_ids if mb.packed else None, mb.num_sequences)

    return masks


class DPOStep:
    def __init__(self, model: list, loss, vocab_size: int, chunk_size: int, layout, fused_log_probs: bool = False):
        """``model``: this rank's model chunks (one, or one per virtual pipeline stage); ``loss``: a loss object
        (losses/); ``chunk_size`` > 0: the model emits hidden states and log-probs apply the output layer in chunks,
        with the log-softmax tail compiled if ``fused_log_probs`` (models/fusion.py's ``fuses_log_probs``)."""
        self.model, self.loss, self.layout = model, loss, layout
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        self.fused_log_probs = fused_log_probs
        self.aux_loss_weight = moe_aux_loss.coefficient(unwrap(model[0]).config)
        if chunk_size > 0:
            emit_hidden_states(unwrap(model[-1]))

    def _forward_step(self, loss_func, data_iterator, model):
        mb = next(data_iterator)
        output = model(mb.tokens, mb.position_ids, None, packed_seq_params=packed_seq_params(mb))
        return output, partial(loss_func, mb)

    def _token_log_probs(self, mb: Microbatch, output):
        group = self.layout.tp_group
        if self.chunk_size > 0:
            weight = output_weight(unwrap(self.model[-1]))
            return at_read_positions(
                lambda out, labels: chunked_log_probs(out, weight, labels, self.vocab_size, self.chunk_size, group,
                                                      self.fused_log_probs),
                mb, output)
        return at_read_positions(lambda out, labels: vocab_parallel_log_probs(out, labels, self.vocab_size, group),
                                 mb, output)

    def _log_sum_sq_probs(self, mb: Microbatch, output):
        """log sum_v p(v)^2 per position (WPO's weights), without gradient."""
        group = self.layout.tp_group
        if self.chunk_size > 0:
            weight = output_weight(unwrap(self.model[-1]))
            return at_read_positions(
                lambda out, _: chunked_log_sum_sq_probs(out, weight, self.vocab_size, self.chunk_size, group),
                mb, output)
        return at_read_positions(lambda out, _: vocab_parallel_log_sum_sq_probs(out, self.vocab_size, group),
                                 mb, output)

    def _log_probs_only(self, mb: Microbatch, logits):
        return logits.new_zeros(()), {"log_probs": self._token_log_probs(mb, logits)}

    def _policy_loss(self, mb: Microbatch, output):
        names, cp_group = self.loss.policy_values, self.layout.cp_group
        log_sum_sq = self._log_sum_sq_probs(mb, output) if WPO_LOGPS in names else None
        policy = response_values(names, self._token_log_probs(mb, output), mb, cp_group, log_sum_sq)
        counts = response_sums(torch.ones_like(mb.loss_mask), mb, cp_group)
        return self.loss(policy, mb.reference, counts, mb.gt_rewards)

    def _run(self, microbatches, loss_func, forward_only):
        tokens = microbatches[0].tokens
        moe_aux_loss.clear()  # a pass reports only its own routers' loss
        # One pass over the microbatches per model chunk (the interleaved schedule asks each chunk's in turn).
        data = iter(microbatches) if len(self.model) == 1 else [iter(microbatches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_func),
            data_iterator=data,
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=tokens.shape[1] * self.layout.cp,  # the whole sequence; the schedule divides by CP
            micro_batch_size=tokens.shape[0],
            forward_only=forward_only,
        )

    def log_probs(self, microbatches) -> list:
        """Per-token log-probs of each microbatch's labels under the current weights (forward only).

        One [rows, seq] tensor per microbatch on the last pipeline stage; an empty list elsewhere.
        """
        with torch.no_grad():
            outputs = self._run(microbatches, self._log_probs_only, forward_only=True)
        return [out["log_probs"] for out in outputs]

    def policy(self, microbatches, forward_only: bool = False) -> dict:
        """Policy forward (and backward unless forward_only); returns DP-averaged metrics on every rank.

        Gradients are left in the DDP buffers for the optimizer. A training pass of
        a mixture-of-experts model with a load-balancing loss reports it too.
        """
        stats = self._run(microbatches, self._policy_loss, forward_only=forward_only)
        metrics = reduce_metrics(self.loss.statistics, stats, self.layout)
        if self.aux_loss_weight > 0 and not forward_only:
            metrics[moe_aux_loss.METRIC] = moe_aux_loss.policy_aux_loss(self.aux_loss_weight, len(microbatches))
        return metrics


def read_positions(mb: Microbatch) -> torch.Tensor:
    """The flattened positions (of the labels' layout) whose log-prob some per-sequence value reads: the
    response's (``loss_mask``) and those of the microbatch's value masks; all when the masks were not made
    beforehand."""
    if mb.value_masks is None:
        return torch.arange(mb.labels.numel(), device=mb.labels.device)
    read = mb.loss_mask != 0
    for mask in mb.value_masks.values():
        read = read | (mask != 0)
    return read.reshape(-1).nonzero().squeeze(1)


def at_read_positions(per_token, mb: Microbatch, output: torch.Tensor) -> torch.Tensor:
    """``per_token(output, labels)`` -> [rows, S] values, computed at the :func:`read_positions` only (the output
    layer and log-softmax skip prompts and padding) and 0 elsewhere, where no mask reads them. ``output`` is the
    last stage's [rows, S', ...]; from a row with shared prompts (data/batching.py) each read position is taken
    where its token is in the row (``sequence_index``), in one gather."""
    keep = read_positions(mb)
    source = keep if mb.sequence_index is None else mb.sequence_index.index_select(0, keep)
    read = output.reshape(-1, output.shape[-1]).index_select(0, source).unsqueeze(0)
    values = per_token(read, mb.labels.reshape(-1).index_select(0, keep).unsqueeze(0)).reshape(-1)
    return values.new_zeros(mb.labels.numel()).index_copy(0, keep, values).reshape(mb.labels.shape)


def packed_seq_params(mb: Microbatch) -> PackedSeqParams | None:
    """megatron's description of a packed (``thd``) microbatch; None for one sequence per row."""
    if not mb.packed:
        return None
    if mb.sequence_index is not None:
        row = mb.tokens.shape[1]
        whole_row = torch.tensor([0, row], dtype=torch.int32, device=mb.tokens.device)
        return SharedPromptParams(
            qkv_format="thd", cu_seqlens_q=whole_row, cu_seqlens_kv=whole_row, max_seqlen_q=row, max_seqlen_kv=row,
            sequence_index=mb.sequence_index, sequence_bounds=mb.cu_seqlens.tolist(), row_index=mb.row_index,
        )
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens, max_seqlen_q=mb.max_seqlen,
        max_seqlen_kv=mb.max_seqlen,
    )


def reduce_metrics(statistics: tuple, microbatch_stats: list, layout) -> dict:
    """The loss's declared statistics averaged over the batch and the DP ranks; every rank gets them.

    Only the last pipeline stage has statistics. Each DP replica contributes its
    local sums and counts once (from TP rank 0), and one all-reduce over the world
    both adds them over DP and brings the result to rank 0, which logs. A statistic
    that selects no pair of the batch (a side KTO's batch lacks) is left out.
    """
    sums = torch.zeros(2, len(statistics), dtype=torch.float64)
    if layout.contributes_metrics:
        sums = local_sums(statistics, microbatch_stats).cpu()
    sums = sums.to(layout.device)
    dist.all_reduce(sums)
    totals, counts = sums.tolist()
    return {stat.metric: total / count for stat, total, count in zip(statistics, totals, counts) if count > 0}
