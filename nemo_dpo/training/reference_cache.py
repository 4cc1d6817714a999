"""Reference log-probs computed once, before training, and kept on disk.

The reference policy never changes, so the sum of its log-probs over each
response (what the loss needs from it: the values of its ``reference_values``)
can be computed for every pair in one forward-only pass and reused for every
epoch and every restart, instead of a reference forward pass per step. The table
lives in ``<log dir>/reference_logprobs.pt`` together with its key: hashes of the
data files, the tokenizer, the initial weights, the config keys that shape the
numbers and the token ids themselves (so a change of tokenization rule is caught
too), and the values it holds when they are more than the sums. A table whose
key differs is refused, naming what changed.
"""

import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_dpo.console import PassProgress
from nemo_dpo.files import sha256_files
from nemo_dpo.losses.sequences import LOGPS
from nemo_dpo.training.dpo_step import response_values

FILE = "reference_logprobs.pt"
SHAPING_KEYS = ("encoder_seq_length", "data", "vocab_size", "make_vocab_size_divisible_by", "tokenizer")


def _weights_digest(model) -> str:
    """Hash of every rank's parameters, in rank order (the same on all ranks)."""
    local = hashlib.sha256()
    for name, param in model.named_parameters():
        local.update(name.encode())
        local.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, local.hexdigest())
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _tokens_digest(splits: dict) -> str:
    """Hash of every pair's token ids: the reference sums are a function of them (whatever rule made them)."""
    digest = hashlib.sha256()
    for split, pairs in splits.items():
        digest.update(split.encode())
        for pair in pairs:
            for ids in (pair.prompt, pair.chosen, pair.rejected):
                digest.update(len(ids).to_bytes(4, "little"))
                digest.update(b"".join(i.to_bytes(4, "little") for i in ids))
    return digest.hexdigest()


def cache_key(data_files, tokenizer_files, model, model_cfg, splits: dict, values: tuple) -> dict:
    """Hashes of everything the reference values depend on, and their names beyond the plain sums."""
    shaping = {k: OmegaConf.to_container(model_cfg[k]) if OmegaConf.is_config(model_cfg[k]) else model_cfg[k]
               for k in SHAPING_KEYS}
    key = {
        "data": sha256_files(data_files),
        "tokenizer": sha256_files(tokenizer_files),
        "tokens": _tokens_digest(splits),
        "weights": _weights_digest(model),
        "config": hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest(),
    }
    if tuple(values) != (LOGPS,):
        key["values"] = ",".join(values)
    return key


def compute_table(pairs: list, runs_as_reference, log_probs, microbatcher, layout, global_batch_size: int,
                  progress, values: tuple) -> torch.Tensor:
    """[len(pairs), 2 x len(values)] reference values, each value's (chosen, rejected) in turn, the same on every rank.

    The pairs go through in global batches, as training batches them; each pair's
    values come from the one rank that holds them (its DP replica's last stage, TP
    rank 0), and one all-reduce gives every rank the whole table.
    """
    table = torch.zeros(len(pairs), 2 * len(values), dtype=torch.float64)
    with runs_as_reference.swapped_in():  # once for the whole pass
        for start in range(0, len(pairs), global_batch_size):
            indices = list(range(start, min(start + global_batch_size, len(pairs))))
            padded = indices + [-1] * (global_batch_size - len(indices))  # a full batch; extra rows are ignored
            microbatches = microbatcher([pairs[i] for i in padded])
            outputs = log_probs(microbatches)
            if outputs and layout.tp_rank == 0:
                per_mb = [response_values(values, lp, mb) for lp, mb in zip(outputs, microbatches)]
                columns = torch.stack([torch.cat([v[name] for v in per_mb]) for name in values])  # [values, sequences]
                for row, index in enumerate(microbatcher.local(padded)):
                    if index >= 0:
                        table[index] = columns[:, 2 * row : 2 * row + 2].reshape(-1).double().cpu()
            progress.advance(len(indices))
    table = table.to(layout.device)
    dist.all_reduce(table)  # each pair was computed by exactly one rank
    return table.cpu()


def load_or_compute(path: str, key: dict, splits: dict, compute, rank: int, log) -> dict:
    """``{split: table}`` from ``path`` if its key matches, else ``compute(pairs, progress)`` per split, saved."""
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        changed = [name for name, value in key.items() if cached["key"].get(name) != value]
        if changed:
            raise ValueError(
                f"{path} was computed for other {', '.join(changed)} (key mismatch); delete it to recompute, "
                f"or use another exp_manager.explicit_log_dir"
            )
        log(f"reference log-probs: loaded from {path}")
        return {split: cached[split] for split in splits}
    count = sum(len(pairs) for pairs in splits.values())
    log(f"reference log-probs: computing {count} pairs ({', '.join(f'{len(p)} {s}' for s, p in splits.items())}) "
        f"once, for every epoch and restart")
    start = time.perf_counter()
    progress = PassProgress("reference log-probs", count, "pairs", log)
    tables = {split: compute(pairs, progress) for split, pairs in splits.items()}
    progress.finish()
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"key": key, **tables}, path + ".tmp")
        os.replace(path + ".tmp", path)
        log(f"reference log-probs: {count} pairs in {time.perf_counter() - start:.1f} s, saved to {path}")
    dist.barrier()
    return tables
