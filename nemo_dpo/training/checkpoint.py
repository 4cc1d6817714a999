"""Distributed checkpoints that are never half-written, and that load at any layout.

Layout on disk::

    <log_dir>/checkpoints/
        step_10/            megatron-core dist_checkpointing (torch_dist) + COMPLETE.json
            tokenizer/      the run's tokenizer files (TOKENIZER_DIR), so the folder is self-contained
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

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import stat
import sys
from functools import partial
from multiprocessing.managers import SyncManager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer
from omegaconf import OmegaConf
from torch import multiprocessing as mp

from nemo_dpo.distributed import layout
from nemo_dpo.models.architecture import ARCHITECTURE_KEYS
from nemo_dpo.models.gpt import unwrap

MARKER = "COMPLETE.json"
LATEST = "latest"
PREFIX = "step_"
TOKENIZER_DIR = "tokenizer"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


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
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(initializer=_detach_from_rank)
        filesystem_async._results_queue = manager.Queue()


def _detach_from_rank() -> None:
    """Run first in the forked manager: let go of the rank's sockets and signal handlers, and die with the rank.

    The fork inherits the process group's connections; were they kept open, a rank
    that dies would look alive to its peers, which would then wait out the whole
    process-group timeout instead of failing at once. It also inherits the rank's
    preemption handler, but a scheduler's SIGTERM/SIGUSR1 (Slurm signals every
    process of a job step) is for the rank: the manager ignores them and ends with it.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else range(3, 4096)
    for fd in map(int, fds):
        try:
            if fd > 2 and stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
    grid, offset = layout.current().rng_grid
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, grid, offset, replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _trainable(sharded) -> bool:
    return getattr(getattr(sharded, "data", None), "requires_grad", False)


def sharded_state(model, optimizer=None, scheduler=None, common=None, is_loading=False) -> dict:
    """What a checkpoint holds: model (+ optimizer, scheduler, RNG) shards and common state.

    When part of the model is frozen (LoRA), only the trainable parameters are
    stored: the frozen base comes from the run's base (``model.restore_from_path``
    or the seed), which the checkpoint's config records.
    """
    state = {"model": unwrap(model).sharded_state_dict()}
    if any(not p.requires_grad for p in model.parameters()):
        state["model"] = {k: v for k, v in state["model"].items() if _trainable(v)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
        state["scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_state()
        state["layout"] = layout.current().sizes
    state.update(common or {})
    return state


def save(
    folder: Path, state: dict, keep_last_k: int = 0, extra_files=None, update_latest: bool = True, async_queue=None
) -> Path:
    """Collectively write ``state`` to ``folder`` (``.../step_<N>``) so that it is complete or absent.

    ``extra_files`` ({relative path: source file}) are copied in by rank 0 (the
    tokenizer). ``update_latest`` points ``<parent>/latest`` at the new checkpoint
    (a run's checkpoints; not for a standalone converted model). With an
    ``async_queue`` (megatron's AsyncCallsQueue) the shards are written in the
    background and the checkpoint is completed when the queue finalizes the write.
    """
    folder = Path(folder)
    tmp = folder.parent / f".tmp_{folder.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _writer_results_queue_without_spawn()
    finish = partial(_complete, folder, tmp, keep_last_k, extra_files or {}, update_latest)
    if async_queue is None:
        dist_checkpointing.save(state, str(tmp))
        finish()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(finish)
        async_queue.schedule_async_request(request)
    return folder


def _complete(folder: Path, tmp: Path, keep_last_k: int, extra_files: dict, update_latest: bool) -> None:
    """After every rank has written its shards: marker, rename, ``latest``, then pruning (rank 0)."""
    dist.barrier()
    if dist.get_rank() == 0:
        root = folder.parent
        for name, source in extra_files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        _write_atomic(tmp / MARKER, json.dumps({"files": _manifest(tmp)}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _fsync_dir(root)
        if update_latest:
            _write_atomic(root / LATEST, folder.name)
        if keep_last_k > 0:
            older = [step_dir(root, s) for s in _steps(root) if step_dir(root, s) != folder]
            for old in [f for f in older if problem(f) is None][keep_last_k - 1 :]:
                shutil.rmtree(old)
        print(f"checkpoint: saved {folder}", flush=True)
    dist.barrier()


def _load_model_state(module, state: dict, folder) -> None:
    """Load all parameters, or (frozen base) exactly the trainable ones."""
    frozen = any(not p.requires_grad for p in module.parameters())
    missing, unexpected = module.load_state_dict(state, strict=not frozen)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if unexpected or set(missing) & trainable:
        raise CheckpointError(
            f"{folder}: parameters missing from the checkpoint: {sorted(set(missing) & trainable)}; "
            f"unexpected: {sorted(unexpected)}"
        )


def check_compatible(folder: Path, model_cfg) -> dict:
    """The checkpoint's common state, after checking its architecture matches ``model_cfg``."""
    common = dist_checkpointing.load_common_state_dict(str(folder))
    saved = (common.get("config") or {}).get("model")
    if saved is None:
        raise CheckpointError(f"{folder}: no model config in the checkpoint (not a nemo-dpo checkpoint?)")
    keys = list(ARCHITECTURE_KEYS)
    if (saved.get("peft") or {}).get("peft_scheme", "none") != "none":
        keys += ["peft", "restore_from_path", "seed"]  # adapters only: the base must be the same
    for key in keys:
        want = model_cfg.get(key)
        want = OmegaConf.to_container(want) if OmegaConf.is_config(want) else want
        if saved.get(key) != want:
            raise CheckpointError(
                f"{folder}: checkpoint has model.{key}={saved.get(key)!r}, this run has model.{key}={want!r}"
            )
    return common


@contextlib.contextmanager
def _torch_adam_fallback(optimizer):
    """Work around megatron 0.16's distributed optimizer on torch's AdamW (no TE, no apex).

    torch's AdamW keeps a per-parameter ``step`` that megatron's fused optimizers
    don't have, and loading trips three times: ``state_dict()`` needs a ``step``
    in every parameter's state (megatron's initialiser creates only the moments);
    ``load_state_dict`` copies every state key from the checkpoint's
    per-parameter tensors, which carry no ``step``; and it gives all parameters
    one shared ``step`` tensor, which torch then increments once per parameter.
    So: create the full state first, keep the restored ``step`` in that copy, and
    give each parameter its own ``step`` afterwards. The checkpoint fills the rest.
    """
    chained = [] if HAVE_APEX_OR_TE or optimizer is None else getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in chained:
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                state = opt.optimizer.state[param]
                state.setdefault("step", torch.zeros((), dtype=torch.float32))
                state.setdefault("exp_avg", torch.zeros_like(param))
                state.setdefault("exp_avg_sq", torch.zeros_like(param))
        if isinstance(opt, DistributedOptimizer):
            opt._set_main_param_and_optimizer_states = partial(_set_states_keeping_step, opt)
    yield
    for opt in chained:
        opt.__dict__.pop("_set_main_param_and_optimizer_states", None)
        for state in opt.optimizer.state.values():
            state["step"] = state["step"].clone()


def _set_states_keeping_step(opt, model_param, tensors):
    group_index, group_order = opt.model_param_group_index_map[model_param]
    main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
    step = opt.optimizer.state[main_param].get("step")
    if "step" not in tensors and step is not None:
        tensors = {**tensors, "step": step.clone()}
    DistributedOptimizer._set_main_param_and_optimizer_states(opt, model_param, tensors)


def load(folder: Path, model, optimizer=None, scheduler=None) -> dict:
    """Load model (and optimizer, scheduler, and RNG where the layout matches) from ``folder``.

    Returns the checkpoint's common state (config, progress).
    """
    reason = problem(Path(folder))
    if reason is not None:
        raise CheckpointError(f"cannot load {folder}: {reason}")
    common = dist_checkpointing.load_common_state_dict(str(folder))
    with _torch_adam_fallback(optimizer):
        state = sharded_state(model, optimizer, scheduler, is_loading=True)
        if optimizer is None:
            state = {"model": state["model"]}
        elif tuple(common.get("layout", ())) != layout.current().sizes:
            del state["rng_state"]  # RNG streams belong to ranks; another layout starts from its seeds
        loaded = dist_checkpointing.load(state, str(folder))
        _load_model_state(unwrap(model), loaded["model"], folder)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
            scheduler.load_state_dict(loaded["scheduler"])
            if "rng_state" in state:
                _set_rng_state(loaded["rng_state"])
    return common
