"""What each process does in the checkpoint tests (imported by the spawned processes)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from distributed_harness import fresh_master_port
from nemo_dpo.config import load_config
from nemo_dpo.distributed import layout
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.training import checkpoint
from nemo_dpo.training.trainer import DPOTrainer
from parallel_scenarios import SMALL


def _flatten(tree, prefix=""):
    if isinstance(tree, (list, tuple)):
        tree = dict(enumerate(tree))
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree.clone() if isinstance(tree, torch.Tensor) else tree}


def plain_tensors(folder: str) -> dict:
    """Every tensor of a checkpoint, unsharded, by dotted name (one process)."""
    init_distributed(1, 1, seed=0)
    try:
        return _flatten(dist_checkpointing.load_plain_tensors(folder))
    finally:
        destroy_distributed()


def steps_with_checkpoint(tp: int, pp: int, log_dir: str, cache_dir: str, save_after: int, extra=(), cp: int = 1,
                          start_from: str = None) -> dict:
    """Resume from ``log_dir`` if it holds a checkpoint; else train ``save_after`` steps and save.

    Then run two more steps. Returns validation metrics right after the (re)start and
    the metrics of the two steps that follow: they depend on the loaded weights
    (validation, first step) and the loaded optimizer state (second step).
    ``start_from``: a run's ``checkpoints`` folder, copied into ``log_dir`` first.
    """
    layout = init_distributed(tp, pp, seed=1234, cp=cp)
    try:
        if start_from is not None:
            if layout.rank == 0:
                shutil.copytree(start_from, os.path.join(log_dir, "checkpoints"))
            dist.barrier()
        overrides = SMALL + ["model.recompute_modules=auto"] + list(extra) + [  # the shipped default
            f"model.tensor_model_parallel_size={tp}",
            f"model.pipeline_model_parallel_size={pp}",
            f"model.context_parallel_size={cp}",
            f"model.tokenizer.cache_dir={cache_dir}",
            f"exp_manager.explicit_log_dir={log_dir}",
            "trainer.dpo.limit_val_batches=1",
            "trainer.dpo.max_steps=20",
        ]
        trainer = DPOTrainer(load_config("gpt_dpo", overrides), layout)
        resumed_at = trainer.step
        if resumed_at == 0:
            gbs = trainer.cfg.model.global_batch_size
            for i in range(save_after):
                trainer.train_step(list(range(i * gbs, (i + 1) * gbs)))
            trainer.save_checkpoint()
        gbs = trainer.cfg.model.global_batch_size
        after = [trainer.validate()]
        for i in range(save_after, save_after + 2):
            after.append(trainer.train_step(list(range(i * gbs, (i + 1) * gbs))))
        return {"resumed_at": resumed_at, "after": after}
    finally:
        destroy_distributed()


def runs_one_after_another(runs: dict, cache_dir: str) -> dict:
    """``{name: steps_with_checkpoint(...)}`` for ``runs`` = ``{name: (tp, pp, cp, log_dir, extra, start_from)}``,
    in order, each rendezvousing on a fresh port as a separate launch would."""
    results = {}
    for name, (tp, pp, cp, log_dir, extra, start_from) in runs.items():
        fresh_master_port()
        results[name] = steps_with_checkpoint(tp, pp, log_dir, cache_dir, 1, extra, cp, start_from)
    return results


class Payload:
    """What an attacker stores in a checkpoint: unpickling it runs a shell command (creating ``marker``)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _seal(folder: Path) -> None:
    """Rewrite COMPLETE.json for the folder's files as they are now, as an attacker would."""
    manifest = {str(p.relative_to(folder)): p.stat().st_size
                for p in sorted(folder.rglob("*")) if p.is_file() and p.name != checkpoint.MARKER}
    (folder / checkpoint.MARKER).write_text(json.dumps({"files": manifest}))


def crafted_checkpoints_are_refused(log_dir: str, cache_dir: str, marker: str) -> dict:
    """Save a real checkpoint at DP=2, craft malicious copies of it, and try to load each.

    Returns {case: the error message, or None if it loaded}; the payload must never run.
    """
    init_distributed(1, 1, seed=1234)
    try:
        overrides = SMALL + [f"model.tokenizer.cache_dir={cache_dir}", f"exp_manager.explicit_log_dir={log_dir}",
                             "exp_manager.resume_if_exists=false", "exp_manager.create_tensorboard_logger=false"]
        trainer = DPOTrainer(load_config("gpt_dpo", overrides), layout.current())
        trainer.train_step(list(range(trainer.cfg.model.global_batch_size)))
        trainer.save_checkpoint()
        genuine = trainer.checkpoint_dir / "step_1"
        root = Path(log_dir) / "crafted"
        cases = {name: root / name for name in ("genuine", "pickled_rng_object", "pickled_index", "pickled_common")}

        # An earlier nemo-dpo's layout: RNG state as a pickled object (here a payload) among the tensors.
        state = checkpoint.sharded_state(trainer.model, trainer.optimizer)
        grid, offset = layout.current().rng_grid
        state["rng_state"] = ShardedObject("rng_state", Payload(marker), grid, offset, replica_id=0)
        if dist.get_rank() == 0:
            cases["pickled_rng_object"].mkdir(parents=True)
        dist.barrier()
        checkpoint._writer_results_queue_without_spawn()
        dist_checkpointing.save(state, str(cases["pickled_rng_object"]))
        if dist.get_rank() == 0:
            shutil.copytree(genuine, cases["genuine"])
            shutil.copy(genuine / checkpoint.METADATA, cases["pickled_rng_object"])
            for name in ("pickled_index", "pickled_common"):
                shutil.copytree(genuine, cases[name])
            with open(cases["pickled_index"] / ".metadata", "wb") as f:
                pickle.dump(Payload(marker), f)
            torch.save({"optimizer": Payload(marker)}, cases["pickled_common"] / "common.pt")
            for folder in cases.values():
                _seal(folder)
        dist.barrier()
        results = {}
        for name, folder in cases.items():
            try:
                checkpoint.load(folder, trainer.model, trainer.optimizer)
                results[name] = None
            except checkpoint.CheckpointError as err:
                results[name] = str(err)
        return results
    finally:
        destroy_distributed()
