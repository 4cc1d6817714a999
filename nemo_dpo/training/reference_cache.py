"""Reference log-probs computed once, before training, and kept on disk.

The reference policy never changes, so the sum of its log-probs over each
response (all the loss needs from it) can be computed for every pair in one
forward-only pass and reused for every epoch and every restart, instead of a
reference forward pass per step. The table lives in
``<log dir>/reference_logprobs.pt`` together with its key: hashes of the data
files, the tokenizer, the initial weights and the config keys that shape the
numbers. A table whose key differs is refused, naming what changed.
"""

import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf

from nemo_dpo.data.batching import dp_shard
from nemo_dpo.losses.preference import sequence_sums

FILE = "reference_logprobs.pt"
SHAPING_KEYS = ("encoder_seq_length", "data", "vocab_size", "make_vocab_size_divisible_by", "tokenizer")


def _sha256_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _weights_digest(model) -> str:
    """Hash of every rank's parameters, in rank order (the same on all ranks)."""
    local = hashlib.sha256()
    for name, param in model.named_parameters():
        local.update(name.encode())
        local.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, local.hexdigest())
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def cache_key(data_files, tokenizer_files, model, model_cfg) -> dict:
    """Hashes of everything the reference sums depend on."""
    shaping = {k: OmegaConf.to_container(model_cfg[k]) if OmegaConf.is_config(model_cfg[k]) else model_cfg[k]
               for k in SHAPING_KEYS}
    return {
        "data": _sha256_files(data_files),
        "tokenizer": _sha256_files(tokenizer_files),
        "weights": _weights_digest(model),
        "config": hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest(),
    }


def compute(trainer, pairs: list) -> torch.Tensor:
    """[len(pairs), 2] reference sums (chosen, rejected), the same on every rank."""
    m, layout = trainer.cfg.model, trainer.layout
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    with trainer.reference.swapped_in():  # once for the whole pass
        for start in range(0, len(pairs), m.global_batch_size):
            indices = list(range(start, min(start + m.global_batch_size, len(pairs))))
            padded = indices + [-1] * (m.global_batch_size - len(indices))  # a full batch; extra rows are ignored
            microbatches = trainer.microbatches([pairs[i] for i in padded])
            log_probs = trainer.step_fn.log_probs(microbatches)
            if log_probs and parallel_state.get_tensor_model_parallel_rank() == 0:
                sums = torch.cat([sequence_sums(lp, mb) for lp, mb in zip(log_probs, microbatches)])
                for row, index in enumerate(dp_shard(padded, layout.dp_rank, layout.dp)):
                    if index >= 0:
                        table[index] = sums[2 * row : 2 * row + 2].double().cpu()
    table = table.to(layout.device)
    dist.all_reduce(table)  # each pair was computed by exactly one rank
    return table.cpu()


def load_or_compute(trainer, key: dict, splits: dict) -> dict:
    """``{split: table}`` from ``<log dir>/reference_logprobs.pt`` if its key matches, else computed and saved."""
    path = os.path.join(trainer.log_dir, FILE)
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        changed = [name for name, value in key.items() if cached["key"].get(name) != value]
        if changed:
            raise ValueError(
                f"{path} was computed for other {', '.join(changed)} (key mismatch); delete it to recompute, "
                f"or use another exp_manager.explicit_log_dir"
            )
        if trainer.layout.rank == 0:
            print(f"reference log-probs: loaded from {path}", flush=True)
        return {split: cached[split] for split in splits}
    start = time.perf_counter()
    tables = {split: compute(trainer, pairs) for split, pairs in splits.items()}
    if trainer.layout.rank == 0:
        os.makedirs(trainer.log_dir, exist_ok=True)
        torch.save({"key": key, **tables}, path + ".tmp")
        os.replace(path + ".tmp", path)
        count = sum(len(p) for p in splits.values())
        print(f"reference log-probs: {count} pairs in {time.perf_counter() - start:.1f} s, saved to {path}", flush=True)
    dist.barrier()
    return tables
