"""Checkpoint save and load time and size for a config (default: the embedded default model).

    torchrun --nproc_per_node 2 bench/bench_checkpoint.py [key=value ...]

Trains one step, then saves a full training checkpoint (model, optimizer, scheduler,
RNG) synchronously and loads it back, ``--repeats`` times; prints the median times
and the size on disk.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from nemo_dpo.config import load_config, prepare
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.training import checkpoint
from nemo_dpo.training.trainer import DPOTrainer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    log_dir = tempfile.mkdtemp(prefix="bench_ckpt_") if int(os.environ.get("RANK", "0")) == 0 else None
    cfg = load_config("gpt_dpo", args.overrides + ["exp_manager.resume_if_exists=false", "checkpoint.async_save=false"])
    prepare(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    m = cfg.model
    layout = init_distributed(m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.seed,
                              cp=m.context_parallel_size, vpp=m.virtual_pipeline_model_parallel_size)
    holder = [log_dir]
    dist.broadcast_object_list(holder, src=0)
    cfg.exp_manager.explicit_log_dir = holder[0]
    try:
        trainer = DPOTrainer(cfg, layout)
        trainer.train_step(list(range(cfg.model.global_batch_size)))
        saves, loads = [], []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            trainer.save_checkpoint()
            saves.append(time.perf_counter() - start)
            folder = checkpoint.step_dir(trainer.checkpoint_dir, trainer.step)
            dist.barrier()
            start = time.perf_counter()
            checkpoint.load(folder, trainer.model, trainer.optimizer)
            dist.barrier()
            loads.append(time.perf_counter() - start)
        if layout.rank == 0:
            size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
            params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
            print(
                f"checkpoint of {params:,} parameters per rank x {layout.world_size} ranks "
                f"(TP={layout.tp} PP={layout.pp} CP={layout.cp} DP={layout.dp}): {size / 2**20:.1f} MiB on disk; "
                f"save {statistics.median(saves):.3f} s, load {statistics.median(loads):.3f} s "
                f"(median of {args.repeats})"
            )
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
