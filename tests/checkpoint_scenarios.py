"""What each process does in the checkpoint tests (imported by the spawned processes)."""

import torch
from megatron.core import dist_checkpointing

from nemo_dpo.config import load_config
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
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


def steps_with_checkpoint(tp: int, pp: int, log_dir: str, cache_dir: str, save_after: int, extra=()) -> dict:
    """Resume from ``log_dir`` if it holds a checkpoint; else train ``save_after`` steps and save.

    Then run two more steps. Returns validation metrics right after the (re)start and
    the metrics of the two steps that follow: they depend on the loaded weights
    (validation, first step) and the loaded optimizer state (second step).
    """
    layout = init_distributed(tp, pp, seed=1234)
    try:
        overrides = SMALL + list(extra) + [
            f"model.tensor_model_parallel_size={tp}",
            f"model.pipeline_model_parallel_size={pp}",
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
