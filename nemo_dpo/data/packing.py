"""``model.data.packing=auto``: pack only when packing computes enough fewer tokens than padding, judged on the data.

Padding computes every row of a step's share at the length of that share's longest
sequence; packing computes one row per microbatch at the length of the share's
longest microbatch (data/batching.py). Which is fewer depends on how much the
lengths vary: pairs all of one length gain nothing from packing (it would only
trade batched attention for attention per sequence), mixed lengths can shed most
of their padding. So the choice is made from the tokens each would compute over
one epoch of the training split, in the order and shares training takes it
(epoch 0's order for the seed, each DP rank's share, the same rounding as the
collate functions). It is a function of the pairs' lengths, the batch sizes, the
seed and the layout's multiples only: the same on every rank (each holds every
pair) and again on resume. Packing is taken when it computes at least
``model.data.packing_min_saving`` (a fraction) fewer tokens: a packed row is
not free per token, its attention runs sequence by sequence in the local layer
spec (measured on CPU, 2 processes: the default task's short pairs, 11% fewer
tokens packed without sharing, trained in 82 s packed against 71 s padded, and
in 71 s with shared prompts at 41% fewer), while the bench's full-length pairs
run about 1.2x faster packed with shared prompts (12.5% fewer tokens).

A packed row can hold each pair's prompt once (``model.data.share_prompts``,
data/batching.py): packing then saves the prompts' second copies too, which
pairs all of one length gain as well. :func:`shares_prompts` decides whether
it can: the local layer spec's attention reads the shared layout
(transformer-engine's kernels take plain ``cu_seqlens`` only), and under context
parallelism a rank holds parts of sequences, not a prompt and both its responses.
"""

from dataclasses import dataclass

from nemo_dpo.data.batching import dp_shard, global_batches, round_up
from nemo_dpo.ranges import Either, Flag, OneOf, Real

RANGES = {
    "model.data.packing": Either(first=Flag(), first_is="true: pack, false: pad", second=OneOf(choices=("auto",)),
                                 second_is="whichever computes fewer tokens on the training data"),
    "model.data.packing_min_saving": Real(ge=0, lt=1),
    "model.data.share_prompts": Either(first=OneOf(choices=("auto",)), first_is="whenever the layout allows",
                                       second=Flag(), second_is="always or never"),
}


@dataclass(frozen=True)
class PackingChoice:
    """What ``auto`` chose, and the epoch's token counts behind it."""

    packed: bool
    padded_tokens: int  # computed over one epoch with one row per sequence, padded
    packed_tokens: int  # computed over one epoch with one packed row per microbatch
    shared_prompts: bool  # packed rows would hold each pair's prompt once
    real_tokens: int  # of which real (not padding), either way
    steps: int
    min_saving: float  # the fraction of the padded tokens packing had to save

    def message(self) -> str:
        saving = 1 - self.packed_tokens / self.padded_tokens
        counts = (f"an epoch ({self.steps} steps, {self.real_tokens:,} real tokens) computes {self.padded_tokens:,} "
                  f"tokens padded, {self.packed_tokens:,} packed")
        if self.shared_prompts:
            counts += " with shared prompts"
        if self.packed:
            return f"model.data.packing=auto: packing ({counts}: {saving:.1%} fewer)"
        if self.packed_tokens >= self.padded_tokens:
            return f"model.data.packing=auto: padding ({counts}: packing would compute no fewer)"
        return (f"model.data.packing=auto: padding ({counts}: {saving:.1%} fewer, less than "
                f"model.data.packing_min_saving={self.min_saving:g})")


def shares_prompts(setting, cp: int, local_attention: bool) -> bool:
    """Whether packed rows hold each pair's prompt once: ``setting`` is ``model.data.share_prompts`` (``auto``,
    true or false), ``local_attention`` whether the layer spec's attention is models/attention.py's."""
    reasons = [why for why, applies in ((f"model.context_parallel_size={cp}", cp > 1),
                                        ("transformer-engine's attention", not local_attention)) if applies]
    if setting == "auto":
        return not reasons
    if setting and reasons:
        raise ValueError(f"model.data.share_prompts=true cannot be done with {' and '.join(reasons)}: set it to auto "
                         "or false")
    return setting


def padded_tokens(lengths: list, pad_multiple: int) -> int:
    """Tokens of one DP rank's share padded to its longest sequence: ``lengths`` holds (prompt, chosen, rejected)."""
    return 2 * len(lengths) * round_up(max(prompt + max(chosen, rejected) for prompt, chosen, rejected in lengths),
                                       pad_multiple)


def packed_tokens(lengths: list, micro_batch_size: int, pad_multiple: int, sequence_multiple: int,
                  shared_prompts: bool = False) -> int:
    """Tokens of one DP rank's share packed a microbatch per row, rows as long as the longest (data/batching.py),
    each pair's prompt once with ``shared_prompts``."""
    def pair_tokens(prompt, chosen, rejected):
        if shared_prompts:
            return prompt + chosen + rejected
        return round_up(prompt + chosen, sequence_multiple) + round_up(prompt + rejected, sequence_multiple)

    groups = [lengths[i : i + micro_batch_size] for i in range(0, len(lengths), micro_batch_size)]
    longest = max(sum(pair_tokens(*pair) for pair in group) for group in groups)
    return len(groups) * round_up(longest, pad_multiple)


def choose_packing(pairs: list, global_batch_size: int, seed: int, micro_batch_size: int, dp: int,
                   pad_multiple: int, sequence_multiple: int, min_saving: float,
                   shared_prompts: bool = False) -> PackingChoice:
    """Padding or packing for ``pairs`` (the training split) batched as training batches them (see the module
    docstring); ``pad_multiple`` and ``sequence_multiple`` are the Microbatcher's, ``shared_prompts`` whether its
    packed rows share prompts; packing must compute at least ``min_saving`` x the padded tokens fewer."""
    lengths = [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs]
    batches = global_batches(len(pairs), global_batch_size, seed, epoch=0)
    padded = packed = real = 0
    for batch in batches:
        for dp_rank in range(dp):
            share = [lengths[i] for i in dp_shard(batch, dp_rank, dp)]
            padded += padded_tokens(share, pad_multiple)
            packed += packed_tokens(share, micro_batch_size, pad_multiple, sequence_multiple, shared_prompts)
            real += sum(2 * prompt + chosen + rejected for prompt, chosen, rejected in share)
    chosen = packed < padded and padded - packed >= min_saving * padded
    return PackingChoice(chosen, padded, packed, shared_prompts, real, len(batches), min_saving)
