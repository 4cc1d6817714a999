r"""Train a GPT with DPO (or IPO / RPO) on megatron-core.

    torchrun --nproc_per_node 2 examples/train_dpo.py                      # embedded default task
    torchrun --nproc_per_node 8 examples/train_dpo.py --config-name gpt_dpo \
        model.tensor_model_parallel_size=2 model.pipeline_model_parallel_size=2 \
        model.data.data_prefix.train=/data/train.jsonl model.dpo.preference_loss=ipo

Arguments after the options are OmegaConf ``key=value`` overrides of conf/<config-name>.yaml
(Hydra's ``+key=value`` and ``++key=value``, as NeMo-Aligner's commands write them, are read the same).
"""

import argparse
import os
import sys
import time

from nemo_dpo.distributed import launcher  # first: it notes torchrun's pid before the imports below take seconds
from torch.distributed.elastic.multiprocessing.errors import record

from nemo_dpo.config import CONF_DIR, ConfigError, load_config, prepare
from nemo_dpo.distributed.failures import Heartbeat, is_timeout, say_once
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.training import run_lock
from nemo_dpo.training.checkpoint import CheckpointError
from nemo_dpo.training.log_dir import log_dir
from nemo_dpo.training.trainer import DPOTrainer, NonFiniteError

# What bad input looks like while a run starts (data, files, a checkpoint) and while it trains (a full disk,
# a checkpoint that cannot be written): said once, without a traceback. Anything else is a bug: traceback.
STARTUP_ERRORS = (ValueError, OSError, ImportError, CheckpointError)
TRAINING_ERRORS = (OSError, CheckpointError)
CONFIG_ERROR_GRACE_S = 30  # how long the other ranks of a node wait for local rank 0 to say a config error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-path", default=str(CONF_DIR), help="folder holding the YAML configs")
    parser.add_argument("--config-name", default="gpt_dpo", help="config file name without .yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    return parser


@record  # torchrun's failure report then names the first rank that failed, with its traceback
def main(argv=None) -> int:
    if not launcher.follow_launcher():
        print(f"rank {os.environ.get('RANK')}: its torchrun (pid {launcher.PARENT_AT_IMPORT}) has already ended; "
              "exiting", file=sys.stderr, flush=True)
        return 1
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config_name, args.overrides, args.config_path)
        changes = prepare(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # every rank of a node checks the same files: one line a node
            print(f"config error: {err}", file=sys.stderr, flush=True)
        else:  # Local rank 0 says it. Exiting first could get it killed before it does (srun --kill-on-bad-exit, or
            time.sleep(CONFIG_ERROR_GRACE_S)  # torchrun ending the others); once it exits, the launcher ends this one.
        return 2

    m = cfg.model
    if changes and int(os.environ.get("RANK", "0")) == 0:
        print(f"from {m.restore_from_path}: " + "; ".join(changes), flush=True)
    layout = init_distributed(
        m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.seed, cfg.trainer.distributed_timeout_minutes,
        m.context_parallel_size, m.virtual_pipeline_model_parallel_size, m.expert_model_parallel_size,
    )
    try:
        lock = run_lock.hold(log_dir(cfg), layout.rank)  # before anything is written to the log dir
    except run_lock.LogDirInUse as err:
        if layout.rank == 0:
            print(f"not started: {err}", file=sys.stderr, flush=True)
        destroy_distributed()
        return 4
    started = False
    try:
        trainer = DPOTrainer(cfg, layout)
        started = True
        trainer.fit()
    except NonFiniteError as err:
        say_once(f"stopped: {err}", layout.rank)
        return 3
    except STARTUP_ERRORS as err:
        if started and not isinstance(err, TRAINING_ERRORS):
            raise
        say_once(f"error: {err}", layout.rank)
        return 1
    except RuntimeError as err:
        if not is_timeout(err):
            raise
        say_once(Heartbeat(layout.rank, layout.world_size).timeout_message(cfg.trainer.distributed_timeout_minutes),
                 layout.rank)
        return 1
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()
    return 0
