"""What each process does in tests/test_hf_moe_families.py (imported by the spawned processes).

Expert parallelism against none, on 2 processes (DP=2): the same DPO step
from the same Hugging Face folder at EP=2 and at EP=1, with the routers'
load-balancing loss and without it, a checkpoint saved at EP=2 and resumed at
EP=2 for the next step; and each family's DPO program run at TP=2. Every result is keyed by the
parameters' global names (models/sharding.py), so that an EP=2 rank's half of
the experts lines up with EP=1's whole.
"""

import os

import torch

from dense_scenarios import convert_and_score, export_and_score, log_probs, train
from distributed_harness import fresh_master_port
from nemo_dpo.config import load_config, prepare
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.models.gpt import unwrap
from nemo_dpo.models.sharding import local_to_global_names
from nemo_dpo.training.trainer import DPOTrainer

RUN = [
    "model.global_batch_size=8",
    "model.micro_batch_size=2",  # two microbatches per DP rank
    "model.optim.lr=1e-3",
    "model.optim.eps=1e-4",  # rounding-level gradients must not become full-size Adam updates
    "model.optim.sched.warmup_steps=0",
    "trainer.dpo.max_steps=2",
    "exp_manager.create_tensorboard_logger=false",
    "model.data.packing=false",  # rows as transformers sees them: the routers' loss is recomputed from them
]


def _steps(source: str, ep: int, log_dir: str, steps: int, save: bool, overrides=()) -> dict:
    """Resume from ``log_dir`` if it holds a checkpoint, then ``steps`` optimizer steps (and a checkpoint).

    Returns the step it started at, the weights then, and for each step its
    metrics, gradients and new weights, and the token ids of the policy pass's
    microbatches (for an independent computation of the load-balancing loss).
    Each run rendezvouses on a fresh port, as a separate launch would.
    """
    fresh_master_port()
    layout = init_distributed(1, 1, seed=1234, ep=ep)
    try:
        cfg = load_config("gpt_dpo", [
            f"model.restore_from_path={source}", f"model.expert_model_parallel_size={ep}", *RUN,
            f"exp_manager.explicit_log_dir={log_dir}", *overrides,
        ])
        prepare(cfg, int(os.environ["WORLD_SIZE"]))
        trainer = DPOTrainer(cfg, layout)
        module = unwrap(trainer.model[0])
        names = local_to_global_names(module, trainer.config)
        tokens = []
        policy = trainer.step_fn.policy

        def recording_policy(microbatches, forward_only=False):
            tokens.append([mb.tokens.clone() for mb in microbatches])
            return policy(microbatches, forward_only)

        trainer.step_fn.policy = recording_policy
        result = {"start": trainer.step, "weights_at_start": _weights(module, names), "steps": [],
                  "shared_prompts": trainer.microbatcher.packing and trainer.microbatcher.share_prompts}
        gbs = cfg.model.global_batch_size
        for i in range(trainer.step, trainer.step + steps):
            metrics = trainer.forward_backward(list(range(i * gbs, (i + 1) * gbs)))
            grads = {names[n]: p.main_grad.detach().clone() for n, p in module.named_parameters()}
            metrics.update(trainer.optimizer_step())
            result["steps"].append({"metrics": metrics, "grads": grads, "weights": _weights(module, names)})
        if save:
            trainer.save_checkpoint()
            trainer.finish_checkpoints(blocking=True)
        result["tokens"] = tokens
        return result
    finally:
        destroy_distributed()


def _weights(module, names) -> dict:
    return {names[n]: p.detach().clone() for n, p in module.named_parameters()}


def expert_parallel_training(source: str, log_root: str) -> dict:
    """One step at EP=2 (saved), two at EP=1, then the EP=2 checkpoint resumed at EP=2 for the second step;
    one step at EP=2 and at EP=1 without the load-balancing loss, in packed rows with shared prompts."""
    no_aux = ["model.moe_aux_loss_coeff=0", "model.data.packing=true"]
    return {
        "ep2": _steps(source, 2, os.path.join(log_root, "ep2"), steps=1, save=True),
        "ep1": _steps(source, 1, os.path.join(log_root, "ep1"), steps=2, save=False),
        "ep2_resumed": _steps(source, 2, os.path.join(log_root, "ep2"), steps=1, save=False),
        "ep2_no_aux": _steps(source, 2, os.path.join(log_root, "ep2_no_aux"), 1, False, no_aux),
        "ep1_no_aux": _steps(source, 1, os.path.join(log_root, "ep1_no_aux"), 1, False, no_aux),
    }


def layouts_and_training(layouts: list, sources: dict, tokens: torch.Tensor, trained: str, log_root: str,
                         dpo_runs: dict) -> dict:
    """The log-probs of every source at each layout (dense_scenarios.log_probs), the EP training check, then
    the DPO program's ``dpo_runs`` (dense_scenarios.train)."""
    return {
        "log_probs": log_probs(layouts, sources, tokens),
        "training": expert_parallel_training(trained, log_root),
        "dpo": train(dpo_runs),
    }


def convert_export_and_score(hf_dirs: dict, mcore_root: str, export_root: str, checkpoints: dict,
                             trained_export_root: str, tokens: torch.Tensor) -> dict:
    """Each folder through hf-to-mcore and mcore-to-hf (TP=1 log-probs of each), each checkpoint exported too."""
    return {
        "folders": convert_and_score(hf_dirs, mcore_root, export_root, tokens),
        "checkpoints": export_and_score(checkpoints, trained_export_root, tokens),
    }
