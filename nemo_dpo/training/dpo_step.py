"""One DPO global batch through megatron-core's microbatch scheduler.

A global batch arrives as this DP rank's list of microbatches (whole pairs,
chosen and rejected interleaved). The same forward step serves the reference
pass (forward only, reference weights swapped in, log-probs stored on the
microbatch) and the policy pass (forward + backward through the preference loss).
megatron's schedule runs them without pipelining or with 1F1B at PP > 1, and
divides each microbatch's loss by the number of microbatches; with equal-sized
microbatches and the gradient averaged over DP by ``finalize_model_grads``,
the gradient is that of the global-batch mean loss at any layout.
"""

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_dpo.losses.logprobs import chunked_log_probs, vocab_parallel_log_probs
from nemo_dpo.models.gpt import emit_hidden_states, output_weight, unwrap
from nemo_dpo.losses.preference import PreferenceLossConfig, preference_loss, sequence_sums

METRICS = (
    "loss",
    "preference_loss",
    "sft_loss",
    "accuracy",
    "rewards_chosen_mean",
    "rewards_rejected_mean",
    "reward_margin",
)


class DPOStep:
    def __init__(self, model, loss_cfg: PreferenceLossConfig, vocab_size: int, chunk_size: int = 0):
        """``chunk_size`` > 0: the model emits hidden states and log-probs apply the output layer in chunks."""
        self.model = model
        self.loss_cfg = loss_cfg
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        if chunk_size > 0:
            emit_hidden_states(unwrap(model))

    def _forward_step(self, loss_func, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed_seq_params(batch))
        return output, partial(loss_func, batch)

    def _token_log_probs(self, batch, output):
        if self.chunk_size > 0:
            weight = output_weight(unwrap(self.model))
            return chunked_log_probs(output, weight, batch["labels"], self.vocab_size, self.chunk_size)
        return vocab_parallel_log_probs(output, batch["labels"], self.vocab_size)

    def _log_probs_only(self, batch, logits):
        return logits.new_zeros(()), {"log_probs": self._token_log_probs(batch, logits)}

    def _policy_loss(self, batch, logits):
        policy_sums = sequence_sums(self._token_log_probs(batch, logits), batch)
        counts = sequence_sums(torch.ones_like(batch["loss_mask"]), batch)
        return preference_loss(self.loss_cfg, policy_sums, batch["ref_sums"], counts, batch["gt_rewards"])

    def _run(self, microbatches, loss_func, forward_only):
        tokens = microbatches[0]["tokens"]
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_func),
            data_iterator=iter(microbatches),
            model=[self.model],
            num_microbatches=len(microbatches),
            seq_length=tokens.shape[1],
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

    def reference(self, microbatches, reference_policy) -> None:
        """Set ``ref_sums`` (response log-prob sums) on each microbatch (last pipeline stage) from the reference."""
        with reference_policy.swapped_in():
            for mb, log_probs in zip(microbatches, self.log_probs(microbatches)):
                mb["ref_sums"] = sequence_sums(log_probs, mb)

    def policy(self, microbatches, forward_only: bool = False) -> dict:
        """Policy forward (and backward unless forward_only); returns DP-averaged metrics on every rank.

        Gradients are left in the DDP buffers for the optimizer.
        """
        stats = self._run(microbatches, self._policy_loss, forward_only=forward_only)
        return reduce_metrics(stats)


def packed_seq_params(batch: dict) -> PackedSeqParams | None:
    """megatron's description of a packed (``thd``) microbatch; None for one sequence per row."""
    if "cu_seqlens" not in batch:
        return None
    cu_seqlens, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=longest, max_seqlen_kv=longest
    )


def reduce_metrics(microbatch_stats: list) -> dict:
    """Average per-microbatch statistics over the batch and the DP ranks; every rank gets them.

    Only the last pipeline stage has statistics. Each DP replica contributes its
    local mean once (from TP rank 0), and one all-reduce over the world both
    averages over DP and brings the result to rank 0, which logs.
    """
    values = torch.zeros(len(METRICS), dtype=torch.float64)
    contributes = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    if contributes:
        chosen = torch.cat([s["rewards_chosen"] for s in microbatch_stats]).double()
        rejected = torch.cat([s["rewards_rejected"] for s in microbatch_stats]).double()
        mean = lambda key: torch.stack([s[key] for s in microbatch_stats]).double().mean()  # noqa: E731
        values = torch.stack(
            [
                mean("loss"),
                mean("preference_loss"),
                mean("sft_loss"),
                (chosen > rejected).double().mean(),
                chosen.mean(),
                rejected.mean(),
                (chosen - rejected).mean(),
            ]
        ).cpu()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = values.to(device)
    dist.all_reduce(values)
    values /= parallel_state.get_data_parallel_world_size()
    return dict(zip(METRICS, values.tolist()))
