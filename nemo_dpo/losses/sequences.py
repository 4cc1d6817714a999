"""What a loss is given for each sequence of a microbatch, and what more it may ask for.

A loss never sees tokens: the training step runs the model and reduces its
per-token log-probs to per-sequence values, chosen and rejected interleaved
(even entries chosen, odd rejected). Every loss gets the response log-prob sums
(:data:`LOGPS`) and the response token counts. A loss that needs more names the
values in its ``policy_values`` / ``reference_values``, and the step and the
reference compute exactly those, so neither knows any loss by name:

- ``logps``: sum of log pi(y_t) over the response tokens (EOS included).
- ``shared_logps``: the same sum over the first min(|y_chosen|, |y_rejected|)
  response tokens of each of a pair's sequences (LD-DPO: what lies beyond the
  shorter response is the verbose tail).
- ``wpo_logps``: sum of log pi(y_t) - log sum_v pi(v)^2 over the response, without
  gradient (WPO's weights); the policy's only.
- ``sequence_logps`` / ``sequence_tokens``: the sum of log-probs over every token
  the sequence predicts (the prompt after its first token, and the response), and
  how many (ORPO's NLL term, over the whole chosen sequence).
"""

import torch

LOGPS, SHARED_LOGPS, WPO_LOGPS = "logps", "shared_logps", "wpo_logps"
SEQUENCE_LOGPS, SEQUENCE_TOKENS = "sequence_logps", "sequence_tokens"
VALUES = (LOGPS, SHARED_LOGPS, WPO_LOGPS, SEQUENCE_LOGPS, SEQUENCE_TOKENS)


def sequence_sums(token_values: torch.Tensor, loss_mask: torch.Tensor, segment_ids=None, num_sequences: int = 0):
    """Per-sequence sums of per-token values over response tokens (``loss_mask``), chosen/rejected interleaved.

    Unpacked, a row is a sequence; packed rows hold several, told apart by
    ``segment_ids`` (sequence index per token), ``num_sequences`` in all.
    """
    masked = token_values * loss_mask
    if segment_ids is None:
        return masked.sum(-1)
    return masked.new_zeros(num_sequences).index_add(0, segment_ids.flatten(), masked.flatten())


def per_sequence(sums: torch.Tensor, counts: torch.Tensor, average: bool) -> torch.Tensor:
    """Sums, or means over the response tokens."""
    return sums / counts.clamp(min=1) if average else sums


def shared_prefix_mask(loss_mask: torch.Tensor, segment_ids=None, num_sequences: int = 0) -> torch.Tensor:
    """``loss_mask`` kept on each sequence's first min(|y_chosen|, |y_rejected|) response tokens of its pair."""
    counts = sequence_sums(torch.ones_like(loss_mask), loss_mask, segment_ids, num_sequences)
    shared = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2)
    if segment_ids is None:
        position = loss_mask.cumsum(-1)  # 1, 2, ... along each row's response
        return loss_mask * (position <= shared.unsqueeze(-1))
    flat, ids = loss_mask.flatten(), segment_ids.flatten()
    # Response tokens of the sequences before each one (a packed row may end in a padding segment, one more).
    per_segment = flat.new_zeros(num_sequences + 1).index_add(0, ids, flat)
    before = per_segment.cumsum(0) - per_segment
    position = flat.cumsum(0) - before[ids]
    limit = torch.cat([shared, shared.new_zeros(1)])[ids]
    return (flat * (position <= limit)).reshape(loss_mask.shape)


def whole_sequence_mask(loss_mask: torch.Tensor, segment_ids=None, num_sequences: int = 0) -> torch.Tensor:
    """1 at every position that predicts a token of its own sequence: from the sequence's start to its last
    response token (a sequence always ends with its response)."""
    if segment_ids is None:
        return loss_mask.flip(-1).cummax(-1).values.flip(-1)
    flat, ids = loss_mask.flatten(), segment_ids.flatten()
    position = torch.arange(flat.shape[0], device=flat.device)
    first = torch.full((num_sequences + 1,), flat.shape[0], device=flat.device).scatter_reduce(0, ids, position, "amin")
    last = torch.full((num_sequences + 1,), -1, device=flat.device).scatter_reduce(
        0, ids, torch.where(flat > 0, position, -1), "amax")
    return ((position >= first[ids]) & (position <= last[ids])).to(flat.dtype).reshape(loss_mask.shape)


def sequence_values(names, token_log_probs, loss_mask, segment_ids=None, num_sequences: int = 0, log_sum_sq=None):
    """``{name: [sequences]}`` for the values ``names`` (see the module docstring) of one microbatch.

    ``log_sum_sq``: per-token log sum_v pi(v)^2, needed for ``wpo_logps`` only.
    """
    segments = (segment_ids, num_sequences)
    values = {}
    for name in names:
        if name == LOGPS:
            values[name] = sequence_sums(token_log_probs, loss_mask, *segments)
        elif name == SHARED_LOGPS:
            values[name] = sequence_sums(token_log_probs, shared_prefix_mask(loss_mask, *segments), *segments)
        elif name == WPO_LOGPS:
            values[name] = sequence_sums(token_log_probs.detach() - log_sum_sq, loss_mask, *segments)
        elif name == SEQUENCE_LOGPS:
            values[name] = sequence_sums(token_log_probs, whole_sequence_mask(loss_mask, *segments), *segments)
        elif name == SEQUENCE_TOKENS:
            mask = whole_sequence_mask(loss_mask, *segments)
            values[name] = sequence_sums(torch.ones_like(mask), mask, *segments)
        else:
            raise ValueError(f"unknown per-sequence value {name!r}; known: {list(VALUES)}")
    return values
