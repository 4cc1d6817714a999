"""Per-process work for the Hugging Face pipeline tests (imported by the spawned processes)."""

import torch
from megatron.core import parallel_state

from nemo_dpo.config import load_config, prepare
from nemo_dpo.data.batching import Microbatch
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.training.trainer import DPOTrainer


def score(source: str, tp: int, pp: int, log_dir: str, tokens: torch.Tensor, config_name="gpt_dpo", extra=()):
    """Per-token log-probs of ``tokens[:, 1:]`` under the policy restored from ``source`` (rank-0 of the last stage).

    A ``log_dir`` holding checkpoints resumes from them (a LoRA run's adapters, say).
    """
    overrides = [*extra,
        f"model.restore_from_path={source}",
        f"model.tensor_model_parallel_size={tp}",
        f"model.pipeline_model_parallel_size={pp}",
        f"exp_manager.explicit_log_dir={log_dir}",
        "model.global_batch_size=8",
        "model.micro_batch_size=2",
    ]
    cfg = load_config(config_name, overrides)
    prepare(cfg, world_size=tp * pp)
    layout = init_distributed(tp, pp, cfg.model.seed)
    try:
        trainer = DPOTrainer(cfg, layout)
        batch = Microbatch(  # forward only: no loss, so no mask and no rewards
            tokens=tokens,
            labels=torch.roll(tokens, -1, dims=1),
            loss_mask=torch.zeros(tokens.shape),
            position_ids=torch.arange(tokens.shape[1]).expand_as(tokens),
            gt_rewards=torch.zeros(tokens.shape[0]),
        )
        log_probs = trainer.step_fn.log_probs([batch])
        keep = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        return log_probs[0][:, :-1] if keep else None
    finally:
        destroy_distributed()
