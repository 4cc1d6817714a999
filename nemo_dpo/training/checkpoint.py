"""Distributed checkpoints that are never half-written, and that load at any layout.

Layout on disk::

    <log_dir>/checkpoints/
        step_10/            megatron-core dist_checkpointing (torch_dist) + COMPLETE.json
        step_20/
        latest              "step_20", replaced atomically after step_20 is complete

A checkpoint is written into ``.tmp_step_<N>``; when every rank has finished,
rank 0 writes ``COMPLETE.json`` (a manifest of every file and its size) and
renames the folder to ``step_<N>``. Only then is ``latest`` updated and are old
checkpoints beyond ``checkpoint.keep_last_k`` removed. A folder without the
marker, or whose files no longer match the manifest (truncated, missing), is
never loaded: resume falls back to the newest complete one and says so.

Model and optimizer state are megatron ShardedTensors (the optimizer in its
fully reshardable form), so a checkpoint saved at one TP/PP/DP layout loads at
another.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch import multiprocessing as mp

MARKER = "COMPLETE.json"
LATEST = "latest"
PREFIX = "step_"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

# Keys of the `model` config that define the weights' shapes and meaning: a checkpoint
# whose values differ cannot be loaded into this model.
ARCHITECTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "position_embedding_type",
    "normalization",
    "activation",
    "bias",
    "share_embeddings_and_output_weights",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "rotary_base",
    "layernorm_epsilon",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason."""


def _writer_results_queue_without_spawn() -> None:
    """Give megatron's torch_dist writer its results queue from a forked manager.

    megatron-core 0.16 creates that queue with a *spawn*-context
    ``multiprocessing.Manager()`` (``filesystem_async._get_write_results_queue``).
    A spawned process re-executes the launching script's ``__main__``; when that
    script has no ``if __name__ == "__main__"`` guard, the manager process runs
    the distributed initialisation again and waits forever for a rendezvous, so
    ``dist_checkpointing.save`` hangs. A forked manager process only serves the
    queue and never re-runs the script.
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step}"


def _steps(root: Path) -> list:
    """Steps with a ``step_<N>`` folder, newest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith(PREFIX) and entry.name[len(PREFIX):].isdigit():
            found.append(int(entry.name[len(PREFIX):]))
    return sorted(found, reverse=True)


def _manifest(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER
    }


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def problem(folder: Path):
    """Why ``folder`` is not a complete checkpoint, or None if it is."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"{marker} is missing (the save did not finish)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{marker} is unreadable ({err})"
    actual = _manifest(folder)
    for name, size in expected.items():
        if name not in actual:
            return f"{folder / name} is missing"
        if actual[name] != size:
            return f"{folder / name} has {actual[name]} bytes, the manifest says {size} (truncated or modified)"
    return None


def newest_complete(root: Path, log=print):
    """The newest complete checkpoint under ``root`` (or None), reporting every one skipped."""
    root = Path(root)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        reason = problem(named) if named.is_dir() else f"{named} does not exist"
        if reason is None:
            return named
        log(f"checkpoint: {latest} points to {named.name}, which is not usable: {reason}")
    for step in _steps(root):
        folder = step_dir(root, step)
        reason = problem(folder)
        if reason is None:
            return folder
        log(f"checkpoint: skipping {folder}: {reason}")
    return None


def _rng_state() -> ShardedObject:
    """This rank's RNG streams, addressed by its place in the (PP, TP, DP) grid."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    grid = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, grid, offset, replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> tuple:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _unwrap(model):
    """The GPTModel inside megatron's DDP wrapper (whose state dict keys have a "module." prefix)."""
    return getattr(model, "module", model)


def sharded_state(model, optimizer=None, scheduler=None, common=None, is_loading=False) -> dict:
    """What a checkpoint holds: model (+ optimizer, scheduler, RNG) shards and common state."""
    state = {"model": _unwrap(model).sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
        state["scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_state()
        state["layout"] = _layout()
    state.update(common or {})
    return state


def save(folder: Path, state: dict, keep_last_k: int = 0, extra_files=None, update_latest: bool = True) -> Path:
    """Collectively write ``state`` to ``folder`` (``.../step_<N>``) so that it is complete or absent.

    ``extra_files`` ({relative path: source file}) are copied in by rank 0 (the
    tokenizer). ``update_latest`` points ``<parent>/latest`` at the new checkpoint
    (a run's checkpoints; not for a standalone converted model).
    """
    folder = Path(folder)
    root, tmp = folder.parent, folder.parent / f".tmp_{folder.name}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _writer_results_queue_without_spawn()
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank == 0:
        for name, source in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        marker = json.dumps({"files": _manifest(tmp)}, indent=1)
        _write_atomic(tmp / MARKER, marker)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _fsync_dir(root)
        if update_latest:
            _write_atomic(root / LATEST, folder.name)
        if keep_last_k > 0:
            for step in _steps(root):
                old = step_dir(root, step)
                if old != folder and problem(old) is None:
                    keep_last_k -= 1
                    if keep_last_k < 1:
                        shutil.rmtree(old)
    dist.barrier()
    return folder


def check_compatible(folder: Path, model_cfg) -> dict:
    """The checkpoint's common state, after checking its architecture matches ``model_cfg``."""
    common = dist_checkpointing.load_common_state_dict(str(folder))
    saved = (common.get("config") or {}).get("model")
    if saved is None:
        raise CheckpointError(f"{folder}: no model config in the checkpoint (not a nemo-dpo checkpoint?)")
    for key in ARCHITECTURE_KEYS:
        if saved.get(key) != model_cfg[key]:
            raise CheckpointError(
                f"{folder}: checkpoint has model.{key}={saved.get(key)!r}, "
                f"this run has model.{key}={model_cfg[key]!r}"
            )
    return common


def load(folder: Path, model, optimizer=None, scheduler=None) -> dict:
    """Load model (and optimizer, scheduler, and RNG where the layout matches) from ``folder``.

    Returns the checkpoint's common state (config, progress).
    """
    reason = problem(Path(folder))
    if reason is not None:
        raise CheckpointError(f"cannot load {folder}: {reason}")
    common = dist_checkpointing.load_common_state_dict(str(folder))
    state = sharded_state(model, optimizer, scheduler, is_loading=True)
    if optimizer is None:
        state = {"model": state["model"]}
    elif tuple(common.get("layout", ())) != _layout():
        del state["rng_state"]  # RNG streams belong to ranks; another layout starts from its seeds
    loaded = dist_checkpointing.load(state, str(folder))
    _unwrap(model).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        if "rng_state" in state:
            _set_rng_state(loaded["rng_state"])
    return common
