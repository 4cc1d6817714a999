"""megatron-core DDP, optimizer and LR schedule, configured from ``model.optim``."""

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_dpo.models.moe import sum_router_grads_over_tp
from nemo_dpo.ranges import Flag, Integer, ListOf, OneOf, Real

# name -> decoupled weight decay. NeMo's fused_adam / distributed_fused_adam are AdamW.
OPTIMIZERS = {"adamw": True, "adam": False, "fused_adam": True, "distributed_fused_adam": True}

RANGES = {
    "model.optim.name": OneOf(choices=tuple(OPTIMIZERS)),
    "model.optim.lr": Real(gt=0),
    "model.optim.weight_decay": Real(ge=0),
    "model.optim.betas": ListOf(each=Real(ge=0, lt=1), length=2),
    "model.optim.eps": Real(gt=0),
    "model.optim.use_distributed_optimizer": Flag(),
    "model.optim.sched.name": OneOf(choices=("CosineAnnealing",)),
    "model.optim.sched.warmup_steps": Integer(ge=0),
    "model.optim.sched.min_lr": Real(ge=0),
}


def check_optim_config(optim_cfg) -> None:
    """The schedule decays towards ``min_lr`` from ``lr`` (each key is in its range already; ValueError naming both)."""
    if optim_cfg.sched.min_lr > optim_cfg.lr:
        raise ValueError(
            f"model.optim.sched.min_lr ({optim_cfg.sched.min_lr}) must be <= model.optim.lr ({optim_cfg.lr})"
        )


def uses_distributed_optimizer(optim_cfg) -> bool:
    return optim_cfg.use_distributed_optimizer or optim_cfg.name == "distributed_fused_adam"


def finalize_grads(model_chunks, *args, **kwargs) -> None:
    """megatron's ``finalize_model_grads``, then the sum over TP of MoE routers' gradients (models/moe.py)."""
    finalize_model_grads(model_chunks, *args, **kwargs)
    sum_router_grads_over_tp(model_chunks)


def wrap_ddp(model_chunks: list, config, optim_cfg) -> list:
    """Wrap each model chunk in megatron DDP (contiguous fp32 grad buffers) and wire gradient finalisation.

    ``finalize_model_grads`` is what all-reduces gradients across data-parallel
    ranks (DP x CP: context-parallel ranks are replicas too, each with its share
    of the tokens), sums sequence-parallel norm gradients over TP, and ties
    embeddings across pipeline stages; without it megatron's schedule leaves every
    DP rank with its own gradient. Under the interleaved schedule only the first
    chunk's buffers are bucketed (as in megatron-LM). Expert parameters of MoE
    layers have grad buffers of their own, reduced over the expert-data-parallel
    ranks that hold the same experts.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=uses_distributed_optimizer(optim_cfg),
    )
    ddp_chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(model_chunks)
    ]
    config.finalize_model_grads_func = finalize_grads
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return ddp_chunks


def build_optimizer(ddp_chunks: list, optim_cfg, grad_clip: float, bf16: bool = False):
    """Adam(W) over all trainable parameters; no weight decay on biases and norms (megatron's rule).

    With bf16 weights the optimizer keeps fp32 master copies and steps those.
    """
    config = OptimizerConfig(
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.sched.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.betas[0],
        adam_beta2=optim_cfg.betas[1],
        adam_eps=optim_cfg.eps,
        decoupled_weight_decay=OPTIMIZERS[optim_cfg.name],
        clip_grad=grad_clip,
        use_distributed_optimizer=uses_distributed_optimizer(optim_cfg),
    )
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    use_fused_torch_adam(optimizer)
    return optimizer


def use_fused_torch_adam(optimizer) -> None:
    """Step megatron's torch Adam(W) fallback with torch's fused kernel.

    Without transformer-engine or apex (always on CPU), megatron builds
    ``torch.optim.AdamW`` (``Adam`` without decoupled weight decay) with no
    ``fused``/``foreach`` flag, which on CPU is torch's loop over parameters in
    Python, each update six elementwise kernels and as many passes over the
    parameter, its gradient and moments. The fused kernel makes one pass per
    tensor: about 6x faster at the bench's 34M parameters, and the same update to
    fp32 rounding (tests/test_fused_adam.py). The flag lives in the param groups,
    which keep this run's settings when a checkpoint loads (training/checkpoint.py).
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer  # None on a rank without trainable parameters
        if isinstance(inner, torch.optim.Adam):  # AdamW is one; TE's and apex's fused Adams are not
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at the last step."""
    warmup = min(optim_cfg.sched.warmup_steps, max(total_steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.sched.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
