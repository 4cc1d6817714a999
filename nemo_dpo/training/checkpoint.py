"""Distributed checkpoints that are never half-written, and that load at any layout.

Layout on disk::

    <log_dir>/checkpoints/
        step_10/            megatron-core dist_checkpointing (torch_dist) + COMPLETE.json
            nemo_dpo.json   config, progress and layout (METADATA)
            tokenizer/      the run's tokenizer files (TOKENIZER_DIR), so the folder is self-contained
            generation_config.json  the initial model's, when it had one (for the Hugging Face export)
        step_20/
        latest              "step_20", replaced atomically after step_20 is complete

A checkpoint is written into ``.tmp_step_<N>``; when every rank has finished,
rank 0 writes ``COMPLETE.json`` (a manifest of every file and its size) and
renames the folder to ``step_<N>``. Only then is ``latest`` updated and are old
checkpoints beyond ``checkpoint.keep_last_k`` removed. A folder without the
marker, or whose files no longer match the manifest (truncated, missing), is
never loaded: resume falls back to the newest complete one and says so.

Model and optimizer state are megatron ShardedTensors (the optimizer in its
fully reshardable form), so a checkpoint saved at one TP/PP/CP/DP layout (with
or without the interleaved schedule's model chunks) loads at another. Other
weights shaped like the model's (TR-DPO's moving reference) are sharded the same
way under their own prefix. Everything else is tensors too (each rank's RNG
streams) or JSON (``nemo_dpo.json``: the config, the progress, a loss's state
such as BCO's running mean, the layout): loading a checkpoint
never unpickles anything but the shard index, and that only through
safe_load.py's restricted unpickler. The LR schedule is not stored: it is a
function of the config and the step, rebuilt on resume.
"""

import contextlib
import ctypes
import dataclasses
import json
import os
import random
import shutil
import signal
import stat
import struct
import sys
from functools import partial
from multiprocessing.managers import SyncManager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer
from omegaconf import OmegaConf
from torch import multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from nemo_dpo.distributed import layout
from nemo_dpo.files import fsync_dir, read_json_object, write_atomic
from nemo_dpo.models import architecture
from nemo_dpo.models.gpt import unwrap
from nemo_dpo.ranges import Flag, Integer
from nemo_dpo.training import safe_load
from nemo_dpo.training.safe_load import CheckpointError

MARKER = "COMPLETE.json"
LATEST = "latest"
PREFIX = "step_"
TOKENIZER_DIR = "tokenizer"
METADATA = "nemo_dpo.json"
FORMAT = 2  # 1: metadata and RNG states pickled (not loaded any more); 2: tensors and JSON only
EXTRA_STATE = "._extra_state"  # megatron layers' pickled extra state, left out of checkpoints
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

RANGES = {
    "checkpoint.keep_last_k": Integer(ge=1, special={0: "keep all"}),
    "checkpoint.async_save": Flag(nullable=True),
}


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


def _latest_problem(root: Path, latest: Path) -> tuple:
    """(why ``latest`` cannot be followed or None, the step folder it names): it must name a complete
    ``step_<N>`` of this ``checkpoints/`` folder, never a path elsewhere."""
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return f"it cannot be read as text ({err})", None
    if not (name.startswith(PREFIX) and name[len(PREFIX):].isdigit()):
        return f"it holds {name[:80]!r}, not the name of a step_<N> folder of {root}", None
    named = root / name
    return (problem(named) if named.is_dir() else f"{named} does not exist"), named


def remove_partial_writes(log_dir: Path, log=print) -> None:
    """Remove what a run killed in the middle of a write left: ``.tmp_step_<N>`` folders and ``*.tmp`` files
    in the log dir and its ``checkpoints/`` (rank 0, with the log dir to itself)."""
    for folder in (Path(log_dir), Path(log_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".tmp_" + PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                log(f"checkpoint: removed {entry}, a save that did not finish")
            elif entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)


def newest_complete(root: Path, log=print):
    """The newest complete checkpoint under ``root`` (or None), reporting every one skipped."""
    root = Path(root)
    latest = root / LATEST
    if latest.is_file():
        reason, named = _latest_problem(root, latest)
        if reason is None:
            return named
        log(f"checkpoint: {latest} is not usable: {reason}; looking for the newest complete checkpoint")
    for step in _steps(root):
        folder = step_dir(root, step)
        reason = problem(folder)
        if reason is None:
            return folder
        log(f"checkpoint: skipping {folder}: {reason}")
    return None


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _rng_tensors() -> dict:
    """This rank's RNG streams as tensors (no pickled objects): Python's, NumPy's, torch's and megatron's tracker."""
    version, mt_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor([version, *mt_state, gauss is not None, _float_bits(gauss or 0.0)], dtype=torch.int64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss, _float_bits(cached)], dtype=torch.int64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = state
    return tensors


def _set_rng_tensors(tensors: dict) -> None:
    python = tensors["python"].tolist()
    random.setstate((python[0], tuple(python[1:-2]), _bits_float(python[-1]) if python[-2] else None))
    numpy = tensors["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(numpy[:-3], dtype=np.uint32), numpy[-3], numpy[-2], _bits_float(numpy[-1])))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"])
    prefix = "tracker."
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name[len(prefix):]: state for name, state in tensors.items() if name.startswith(prefix)}
    )


def _sharded_rng_state() -> dict:
    """The RNG tensors, each addressed by this rank's place in the (PP, TP, DP) grid."""
    grid, offset = layout.current().rng_grid
    axes = [(axis, rank, size) for axis, (rank, size) in enumerate(zip(offset, grid))]
    return {
        name: ShardedTensor.from_rank_offsets(f"rng_state.{name}", tensor, *axes, replica_id=0, prepend_axis_num=3)
        for name, tensor in _rng_tensors().items()
    }


def _trainable(sharded) -> bool:
    return getattr(getattr(sharded, "data", None), "requires_grad", False)


def _model_keys(model_chunks: list) -> list:
    """Where each model chunk's tensors sit in the state: ``model``, or ``model0``, ``model1``, ... for several
    (the tensors' own keys are global, so the chunks of one layout load into those of another)."""
    return ["model"] if len(model_chunks) == 1 else [f"model{index}" for index in range(len(model_chunks))]


def sharded_state(model_chunks: list, optimizer=None, is_loading=False) -> dict:
    """What a checkpoint's shards hold: the model's tensors (and the optimizer's, and the RNG streams).

    When part of the model is frozen (LoRA), only the trainable parameters are
    stored: the frozen base comes from the run's base (``model.restore_from_path``
    or the seed), which the checkpoint's config records. Layers' ``_extra_state``
    (a pickled object; transformer-engine's FP8 scaling, unused here) is left out.
    """
    state = {}
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        chunk_state = unwrap(chunk).sharded_state_dict()
        chunk_state = {k: v for k, v in chunk_state.items() if not k.endswith(EXTRA_STATE)}
        if any(not p.requires_grad for p in chunk.parameters()):
            chunk_state = {k: v for k, v in chunk_state.items() if _trainable(v)}
        state[key] = chunk_state
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
        state["rng_state"] = _sharded_rng_state()
    return state


def sharded_like_model(model, copies: dict, prefix: str) -> dict:
    """ShardedTensors of ``copies`` ({parameter: a tensor of its shape}), sharded as the model's own parameters and
    named ``prefix`` + the parameter's name: other weights of the same model, such as a moving reference."""
    by_storage = {param.data_ptr(): copy for param, copy in copies.items()}
    return {
        key: dataclasses.replace(entry, key=prefix + entry.key, data=by_storage[entry.data.data_ptr()])
        for key, entry in unwrap(model).sharded_state_dict().items()
        if not key.endswith(EXTRA_STATE)
    }


def save(
    folder: Path, state: dict, metadata: dict, keep_last_k: int = 0, extra_files=None, update_latest: bool = True,
    async_queue=None,
) -> Path:
    """Collectively write ``state`` to ``folder`` (``.../step_<N>``) so that it is complete or absent.

    ``metadata`` (the run's config, its progress; plain data) goes to
    ``nemo_dpo.json`` with the layout it was saved at. ``extra_files`` ({relative
    path: source file}) are copied in by rank 0 (the tokenizer, generation_config.json). ``update_latest``
    points ``<parent>/latest`` at the new checkpoint (a run's checkpoints; not for a
    standalone converted model). With an ``async_queue`` (megatron's
    AsyncCallsQueue) the shards are written in the background and the checkpoint is
    completed when the queue finalizes the write.
    """
    folder = Path(folder)
    tmp = folder.parent / f".tmp_{folder.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _writer_results_queue_without_spawn()
    metadata = {"format": FORMAT, "layout": list(layout.current().sizes), **metadata}
    finish = partial(_complete, folder, tmp, metadata, keep_last_k, extra_files or {}, update_latest)
    if async_queue is None:
        try:
            dist_checkpointing.save(state, str(tmp))
        except (Exception, CheckpointException) as err:  # megatron raises on every rank when any rank's write failed
            _abandon(folder.parent, [tmp], err, _bytes_to_write(state))
        finish()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(finish)
        async_queue.schedule_async_request(request)
    return folder


def finish_background_saves(async_queue, root: Path, blocking: bool) -> None:
    """Complete the background writes that are done (all if ``blocking``); a failed one is cleaned up and raised."""
    try:
        async_queue.maybe_finalize_async_calls(blocking=blocking)
    except CheckpointWriteError:
        raise
    except (Exception, CheckpointException) as err:  # a shard writer failed; megatron raises on every rank
        _abandon(Path(root), sorted(Path(root).glob(".tmp_" + PREFIX + "*")), err, needed=None)


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, I/O error); the partial folder is gone, ``latest`` unchanged."""


def _bytes_to_write(state: dict) -> int:
    """The checkpoint's tensor bytes, every rank's main replicas together."""
    local = sum(
        item.data.numel() * item.data.element_size()
        for item in nested_values(state)
        if isinstance(item, ShardedTensor) and is_main_replica(item.replica_id) and item.data is not None
    )
    total = torch.tensor([float(local)], device=layout.current().device)
    dist.all_reduce(total)
    return int(total.item())


def _abandon(root: Path, partial_folders: list, err: BaseException, needed) -> None:
    """Every rank, after a failed write: remove the partial folder(s) and raise one clear error."""
    if dist.get_rank() == 0:
        for folder in partial_folders:
            shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    free = shutil.disk_usage(root).free
    # torch's writer reports a full disk as ENOSPC, or only as a short write ("unexpected pos"): judge by the space.
    full = "No space left on device" in str(err) or (needed is not None and free < needed)
    reason = "the disk has no room for it" if full else str(err).strip().splitlines()[-1][:300]
    needs = f"it needs about {needed / 2**20:.1f} MiB; " if needed is not None else ""
    newest = newest_complete(root, log=lambda _: None)
    kept = f"{newest.name} stays the newest checkpoint" if newest is not None else "there is no earlier checkpoint"
    names = ", ".join(f.name[len(".tmp_"):] for f in partial_folders) or "a checkpoint"
    raise CheckpointWriteError(
        f"{root}: {names} could not be written: {reason} ({needs}{free / 2**20:.1f} MiB are free); the partial "
        f"write was removed and {kept}"
    ) from err


def _complete(folder: Path, tmp: Path, metadata: dict, keep_last_k: int, extra_files: dict,
              update_latest: bool) -> None:
    """After every rank has written its shards: metadata, marker, rename, ``latest``, then pruning (rank 0)."""
    dist.barrier()
    failed = [None, 0]  # rank 0's error writing the last files, and the bytes written so far
    if dist.get_rank() == 0:
        try:
            for name, source in extra_files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / name)
            write_atomic(tmp / METADATA, json.dumps(metadata, indent=1))
            write_atomic(tmp / MARKER, json.dumps({"files": _manifest(tmp)}, indent=1))
        except OSError as err:
            failed = [err, sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())]
    dist.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        _abandon(folder.parent, [tmp], failed[0], failed[1])
    if dist.get_rank() == 0:
        root = folder.parent
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fsync_dir(root)
        if update_latest:
            write_atomic(root / LATEST, folder.name)
        if keep_last_k > 0:
            older = [step_dir(root, s) for s in _steps(root) if step_dir(root, s) != folder]
            for old in [f for f in older if problem(f) is None][keep_last_k - 1 :]:
                shutil.rmtree(old)
        print(f"checkpoint: saved {folder}", flush=True)
    dist.barrier()


def load_model_state(module, state: dict, folder) -> None:
    """Load all parameters and buffers, or (frozen base) exactly the trainable parameters."""
    frozen = any(not p.requires_grad for p in module.parameters())
    if frozen:
        required = {n for n, p in module.named_parameters() if p.requires_grad}
    else:
        required = {k for k in module.state_dict() if not k.endswith(EXTRA_STATE)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) & required:
        raise CheckpointError(
            f"{folder}: parameters missing from the checkpoint: {sorted(set(missing) & required)}; "
            f"unexpected: {sorted(unexpected)}"
        )


def read_metadata(folder) -> dict:
    """``nemo_dpo.json`` of a checkpoint: its config, progress, layout (plain JSON, never unpickled)."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no {METADATA} (not a checkpoint written by this nemo-dpo; earlier versions kept their "
            f"metadata in a pickle, which is not loaded)"
        )
    try:
        return read_json_object(str(path))
    except ValueError as err:
        raise CheckpointError(str(err)) from err


def check_compatible(folder: Path, model_cfg) -> dict:
    """The checkpoint's metadata, after checking its architecture matches ``model_cfg``."""
    metadata = read_metadata(folder)
    saved = (metadata.get("config") or {}).get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{folder}/{METADATA}: no model config (not a nemo-dpo checkpoint?)")
    settings = _architecture_of(folder, saved)
    if (saved.get("peft") or {}).get("peft_scheme", "none") != "none":
        for key in ("peft", "restore_from_path", "seed"):  # adapters only: the base must be the same
            settings[key] = saved.get(key)
    for key, value in settings.items():
        want = model_cfg.get(key)
        want = OmegaConf.to_container(want) if OmegaConf.is_config(want) else want
        if value != want:
            raise CheckpointError(f"{folder}: checkpoint has model.{key}={value!r}, this run has model.{key}={want!r}")
    return metadata


def _architecture_of(folder, saved_model_cfg: dict) -> dict:
    try:
        return architecture.saved_architecture(saved_model_cfg)
    except KeyError as err:
        raise CheckpointError(f"{folder}/{METADATA}: the model config has no {err.args[0]}") from None


def saved_architecture(folder) -> dict:
    """The architecture keys of checkpoint ``folder`` (models/architecture.py), keys it predates included."""
    return _architecture_of(folder, read_metadata(folder)["config"]["model"])


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


def _same_layout(saved: list, current: tuple) -> bool:
    """Whether a checkpoint's layout is this run's (checkpoints written before context parallelism record no CP)."""
    saved = tuple(saved)
    return (saved + (1,) if len(saved) == 3 else saved) == current


def load(folder: Path, model_chunks: list, optimizer=None, extra=None) -> dict:
    """Load model (and optimizer, and RNG where the layout matches) from ``folder``; returns its metadata.

    ``extra``: {name: sharded state} of further tensors saved with the checkpoint (``sharded_like_model``), loaded
    into the tensors they hold. Nothing in the checkpoint is unpickled beyond its shard index (see safe_load.py).
    The optimizer keeps this run's settings (learning rates, betas, eps, weight
    decay, from the config) and takes only its state (moments, step) from the
    checkpoint, so a resume with changed settings runs what its config says.
    """
    reason = problem(Path(folder))
    if reason is not None:
        raise CheckpointError(f"cannot load {folder}: {reason}")
    metadata = read_metadata(folder)
    safe_load.install()
    safe_load.check_tensors_only(folder)
    with _torch_adam_fallback(optimizer):
        state = {**sharded_state(model_chunks, optimizer, is_loading=True), **(extra or {})}
        # loading replaces the state's entries (a factory by its parts): note where each extra tensor goes first
        targets = {name: {key: entry.data for key, entry in entries.items()} for name, entries in (extra or {}).items()}
        if optimizer is not None and not _same_layout(metadata.get("layout", ()), layout.current().sizes):
            del state["rng_state"]  # RNG streams belong to ranks; another layout starts from its seeds
        loaded = dist_checkpointing.load(state, str(folder), common_strategy=safe_load.WeightsOnlyCommonLoad())
        for key, chunk in zip(_model_keys(model_chunks), model_chunks):
            load_model_state(unwrap(chunk), loaded[key], folder)
        if optimizer is not None:
            settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(loaded["optimizer"])
            for group, own in zip(optimizer.param_groups, settings):
                group.update(own)
            if "rng_state" in state:
                _set_rng_tensors(loaded["rng_state"])
        with torch.no_grad():
            for name, tensors in targets.items():
                for key, tensor in tensors.items():
                    tensor.copy_(loaded[name][key])  # a factory's parts come back merged, not in place
    return metadata
