"""What each process does in the multi-rank tests (imported by the spawned processes)."""

import gc
import os

import torch
from megatron.core import parallel_state

import nemo_dpo

from nemo_dpo.config import load_config
from nemo_dpo.data.batching import global_batches
from nemo_dpo.distributed import layout
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.losses.logprobs import vocab_parallel_log_probs, vocab_parallel_log_sum_sq_probs
from nemo_dpo.models.gpt import unwrap
from nemo_dpo.models.sharding import local_to_global_names
from nemo_dpo.training.reference import ReferenceWeights
from nemo_dpo.training.trainer import DPOTrainer

# A small model that still has every moving part: GQA, 2 layers (one per stage at PP=2).
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.global_batch_size=8",
    "model.micro_batch_size=2",
    "model.log_prob_chunk_size=0",  # the one-shot log-prob path; "llama_dpo_chunked" covers chunks
    "model.recompute_modules=null",  # everything kept; the "_recompute_" variants recompute
    # Adam's first step is lr * g / (|g| + eps); a larger eps keeps gradients at
    # rounding-noise level from turning into full-size updates of random sign.
    "model.optim.eps=1e-4",
    "model.optim.sched.warmup_steps=0",
    "model.data.packing=false",  # rows padded; the variants below say where they pack (true) or let the data decide
]

# Architectures and losses, so that every layout is checked on more than one combination.
VARIANTS = {
    "llama_dpo": [],
    "gpt2_ipo_sft": [
        "model.activation=gelu",
        "model.position_embedding_type=learned_absolute",
        "model.normalization=LayerNorm",
        "model.share_embeddings_and_output_weights=false",
        "model.bias=true",
        "model.num_query_groups=null",
        "model.dpo.preference_loss=ipo",
        "model.dpo.sft_loss_weight=0.5",
        "model.dpo.preference_average_log_probs=true",
    ],
    "rpo_fwd_kl": ["model.dpo.preference_loss=rpo_fwd_kl", "model.dpo.gt_reward_scale=2.0"],
    "rpo_bwd_kl": ["model.dpo.preference_loss=rpo_bwd_kl"],
    "rpo_sq_sft_avg": [
        "model.dpo.preference_loss=rpo_sq",
        "model.dpo.sft_loss_weight=0.1",
        "model.dpo.sft_average_log_probs=true",
    ],
    "dpo_label_smoothing": ["model.dpo.label_smoothing=0.1"],
    "llama_dpo_distopt": ["model.optim.use_distributed_optimizer=true"],
    "lora": [
        "model.peft.peft_scheme=lora",
        "model.peft.lora_tuning.adapter_dim=4",
        "model.peft.lora_tuning.alpha=8",
        "model.peft.lora_tuning.target_modules=[attention_qkv,attention_dense,mlp_fc1,mlp_fc2]",
        "model.optim.lr=1e-2",
    ],
    "llama_dpo_chunked": ["model.log_prob_chunk_size=20"],
    "llama_dpo_bf16": ["trainer.precision=bf16"],
    "llama_dpo_packed": ["model.data.packing=true"],  # each pair's prompt once (model.data.share_prompts=auto)
    "llama_dpo_packed_unshared": ["model.data.packing=true", "model.data.share_prompts=false"],
    "llama_dpo_recompute_full": ["model.activations_checkpoint_granularity=full"],
    "llama_dpo_recompute_selective": ["model.activations_checkpoint_granularity=selective"],
    "llama_dpo_recompute_elementwise": ["model.recompute_modules=auto"],  # the default: swiglu and layernorm here
    "llama_dpo_recompute_mlp": ["model.recompute_modules=[mlp]"],
    "llama_dpo_bf16_chunked": ["trainer.precision=bf16", "model.log_prob_chunk_size=20"],  # not a divisor of the tokens: a short last chunk
    # The global batch of 8 pairs in 1, 2 and 4 microbatches (SMALL has 4 at DP=1).
    "llama_dpo_1mb": ["model.micro_batch_size=8"],
    "llama_dpo_2mb": ["model.micro_batch_size=4"],
}

VARIANTS["gpt2_ipo_sft_chunked"] = VARIANTS["gpt2_ipo_sft"] + ["model.log_prob_chunk_size=7"]  # untied output layer
VARIANTS["gpt2_ipo_sft_packed"] = VARIANTS["gpt2_ipo_sft"] + ["model.data.packing=true"]  # learned positions
# Sequence parallelism (at TP > 1): the same steps as without.
VARIANTS["llama_dpo_sp"] = ["model.sequence_parallel=true"]
# LoRA on fc2 reads the SwiGLU output that the recomputation releases (at TP=2 too).
VARIANTS["lora_recompute_elementwise"] = VARIANTS["lora"] + VARIANTS["llama_dpo_recompute_elementwise"]
VARIANTS["llama_dpo_chunked_packed"] = VARIANTS["llama_dpo_chunked"] + VARIANTS["llama_dpo_packed"]
VARIANTS["llama_dpo_sp_chunked_packed"] = VARIANTS["llama_dpo_sp"] + VARIANTS["llama_dpo_chunked_packed"]
# RMSNorm, SwiGLU and RoPE compiled (models/fusion.py), under sequence parallelism: rows of another length per rank.
VARIANTS["llama_dpo_fused_sp"] = ["model.fused_elementwise=true", "model.sequence_parallel=true"]
# ... and in bf16 at TP=1, the chunked output layer's log-softmax tail too.
VARIANTS["llama_dpo_bf16_chunked_fused"] = VARIANTS["llama_dpo_bf16_chunked"] + ["model.fused_elementwise=true"]
# ... with their outputs recomputed, and RoPE compiled on a shared-prompt row (each token at its position id).
VARIANTS["llama_dpo_fused_sp_recompute_packed"] = (VARIANTS["llama_dpo_fused_sp"] + VARIANTS["llama_dpo_recompute_elementwise"]
                                                   + VARIANTS["llama_dpo_packed"])
VARIANTS["gpt2_ipo_sft_sp"] = VARIANTS["gpt2_ipo_sft"] + ["model.sequence_parallel=true"]  # biases, LayerNorm
# Four layers: two model chunks of one layer per pipeline rank under the interleaved schedule at PP=2.
VARIANTS["llama_dpo_4_layers"] = ["model.num_layers=4"]
VARIANTS["llama_dpo_4_layers_recompute"] = VARIANTS["llama_dpo_4_layers"] + VARIANTS["llama_dpo_recompute_elementwise"]
# The reference computed once before the step (over a small training file: the validation split).
SMALL_TRAIN = f"model.data.data_prefix.train={os.path.join(os.path.dirname(nemo_dpo.__file__), 'data', 'default', 'validation.jsonl')}"
VARIANTS["llama_dpo_precomputed"] = ["model.dpo.reference_logprobs=precomputed", SMALL_TRAIN]
VARIANTS["gpt2_ipo_sft_packed_chunked"] = VARIANTS["gpt2_ipo_sft_packed"] + ["model.log_prob_chunk_size=7"]

# The loss family: every paired loss inside a weighted mixture (each term's gradient is in the step), the options
# that change what the step computes (LD-DPO's shared-length sums, WPO's log sum p^2 across vocab shards, f-DPO,
# DPOP), the reference-free losses (ORPO's whole-sequence sums) and TR-DPO's moving reference.
LOSS_VARIANTS = {
    "paired_a": ["model.dpo.preference_loss=[dpo,hinge,robust,exo_pair,nca_pair,bco_pair,sppo_hard]",
                 "model.dpo.preference_loss_weights=[1.0,0.5,0.5,1.0,0.5,0.5,0.01]", "model.dpo.label_smoothing=0.1"],
    "paired_b": ["model.dpo.preference_loss=[aot,aot_unpaired,apo_zero,apo_down,discopop,sigmoid_norm,sft]",
                 "model.dpo.preference_loss_weights=[1.0,1.0,0.5,0.5,1.0,1.0,0.1]"],
    "options": ["model.dpo.preference_loss=[sigmoid,ipo,hinge]", "model.dpo.preference_loss_weights=[1.0,0.01,0.5]",
                "model.dpo.f_divergence_type=alpha_divergence", "model.dpo.f_alpha_divergence_coef=0.3",
                "model.dpo.ld_alpha=0.5", "model.dpo.use_weighting=true", "model.dpo.dpop_lambda=2.0"],
    "simpo": ["model.dpo.preference_loss=simpo", "model.dpo.ref_policy_kl_penalty=2.0", "model.dpo.simpo_gamma=0.5"],
    "cpo": ["model.dpo.preference_loss=cpo", "model.dpo.label_smoothing=0.1"],
    "orpo": ["model.dpo.preference_loss=orpo"],
    "trdpo": ["model.dpo.sync_ref_model=true", "model.dpo.ref_model_sync_steps=1", "model.dpo.ref_model_mixup_alpha=0.5"],
    # KTO on the default pairs unpaired (each a desirable and an undesirable example), its KL estimate reduced over
    # microbatches and DP ranks; one_step moves the policy first, so that the estimate is not 0.
    "kto": ["model.dpo.preference_loss=kto", "model.dpo.desirable_weight=2.0", "model.dpo.undesirable_weight=0.5",
            SMALL_TRAIN],
}
VARIANTS.update(LOSS_VARIANTS)
# The per-sequence values from packed rows and from log-probs in chunks (compared with the plain variants above).
VARIANTS["options_packed_chunked"] = VARIANTS["options"] + ["model.data.packing=true", "model.log_prob_chunk_size=20"]
VARIANTS["orpo_packed_chunked"] = VARIANTS["orpo"] + ["model.data.packing=true", "model.log_prob_chunk_size=20"]
VARIANTS["kto_packed_chunked"] = VARIANTS["kto"] + ["model.data.packing=true", "model.log_prob_chunk_size=20"]
VARIANTS["kto_precomputed"] = VARIANTS["kto"] + ["model.dpo.reference_logprobs=precomputed"]
# model.data.packing=auto (the default outside these tests) taking any saving, so that it packs the default data's
# mixed lengths (11% fewer tokens, below the 20% it asks for by default): with the precomputed reference, LoRA and
# the per-sequence values of LD-DPO and WPO too.
AUTO_VARIANTS = {f"{name}_auto": VARIANTS[name] + ["model.data.packing=auto", "model.data.packing_min_saving=0"]
                 for name in ("llama_dpo", "llama_dpo_precomputed", "lora", "options")}
VARIANTS.update(AUTO_VARIANTS)


def _tp_attrs(param):
    return {
        "tensor_model_parallel": getattr(param, "tensor_model_parallel", False),
        "partition_dim": getattr(param, "partition_dim", -1),
        "partition_stride": getattr(param, "partition_stride", 1),
    }


def one_step(trainer: DPOTrainer) -> dict:
    """One optimizer step on the first global batch, and what follows it (the loss's state, TR-DPO's reference);
    loss, grads (before the step), new weights and the reference's weights after the step.

    KTO's step is the second of the epoch: at the first the policy is the reference and the KL estimate is 0, so a
    first step moves it away. Its data holds the desirable examples, then the undesirable ones: the shuffled
    batches hold both."""
    # (global name, parameter) over this rank's model chunks
    params = []
    for chunk in trainer.model:
        module = unwrap(chunk)
        names = local_to_global_names(module, trainer.config)
        params += [(names[n], p) for n, p in module.named_parameters()]
    runs_as_reference = getattr(trainer.reference, "runs_as_reference", None)
    moving = trainer.cfg.model.dpo.sync_ref_model

    def reference_weights():
        by_param = dict(zip(runs_as_reference.params, runs_as_reference.weights))
        return {n: by_param[p].clone() for n, p in params}

    reference_before = reference_weights() if moving else {}
    m = trainer.cfg.model
    batch = list(range(m.global_batch_size))
    if trainer.loss.estimates_kl:
        first, batch = global_batches(len(trainer.train_pairs), m.global_batch_size, m.seed, 0)[:2]
        trainer.forward_backward(first)
        trainer.after_update(trainer.optimizer_step())
    metrics = trainer.forward_backward(batch)
    use_grads = not trainer.cfg.model.optim.use_distributed_optimizer  # sharded grads otherwise
    grads = {n: p.main_grad.detach().clone() for n, p in params if p.requires_grad} if use_grads else {}
    frozen = {n: p.detach().clone() for n, p in params if not p.requires_grad}
    metrics.update(trainer.optimizer_step())
    trainer.after_update(metrics)
    gc.collect()  # the earlier variants' trainers are gone: any copy of reference weights alive now is this one's
    return {
        "metrics": metrics,
        "loss_state": trainer.loss.state_dict(),
        "reference_source": type(trainer.reference).__name__,
        "reference_copies": sum(isinstance(o, ReferenceWeights) for o in gc.get_objects()),
        "reference": reference_weights() if moving else {},
        "reference_before": reference_before,
        "grads": grads,
        "weights": {n: p.detach().clone() for n, p in params},
        "attrs": {n: _tp_attrs(p) for n, p in params},
        "frozen_before_step": frozen,
        "main_param_dtypes": {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]},
        "packed": trainer.microbatcher.packing,
        "shared_prompts": trainer.microbatcher.packing and trainer.microbatcher.share_prompts,
        "fused_log_probs": trainer.step_fn.fused_log_probs,
        "attention": {type(layer.self_attention).__name__ for chunk in trainer.model for layer in unwrap(chunk).decoder.layers},
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
    }


def layout_steps(plan: dict, log_dir: str, cache_dir: str) -> dict:
    """Several layouts in one process group: ``{layout name: (sizes, variants)}`` -> ``{layout name: {variant:
    one step}}``. ``sizes`` holds any of tp, pp, cp (1 if absent) and vpp (None); megatron's groups are built for
    each layout in turn on the same processes, which saves a launch per layout."""
    results = {}
    try:
        for layout_name, (sizes, variants) in plan.items():
            tp, pp, cp, vpp = sizes.get("tp", 1), sizes.get("pp", 1), sizes.get("cp", 1), sizes.get("vpp")
            ranks = init_distributed(tp, pp, seed=1234, cp=cp, vpp=vpp)
            results[layout_name] = {}
            for name in variants:
                overrides = SMALL + VARIANTS[name] + [
                    f"model.tensor_model_parallel_size={tp}",
                    f"model.pipeline_model_parallel_size={pp}",
                    f"model.context_parallel_size={cp}",
                    f"model.virtual_pipeline_model_parallel_size={'null' if vpp is None else vpp}",
                    f"model.tokenizer.cache_dir={cache_dir}",
                    f"exp_manager.explicit_log_dir={log_dir}/{layout_name}/{name}",
                ]
                results[layout_name][name] = one_step(DPOTrainer(load_config("gpt_dpo", overrides), ranks))
            if tp > 1:
                results[layout_name]["logprobs"] = vocab_parallel_logprob_check()
            parallel_state.destroy_model_parallel()  # the process group stays for the next layout
    finally:
        destroy_distributed()
    return results


def vocab_parallel_logprob_check() -> dict:
    """Log-probs and their gradient, and log sum p^2 (WPO), from this rank's vocab slice, for comparison with a full
    softmax."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    gen = torch.Generator().manual_seed(0)
    padded_vocab, vocab = 128, 120  # the last 8 ids are padding
    full_logits = torch.randn(3, 5, padded_vocab, generator=gen) * 4
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    upstream = torch.randn(3, 5, generator=gen)
    shard = padded_vocab // tp
    local = full_logits[..., tp_rank * shard : (tp_rank + 1) * shard].clone().requires_grad_(True)
    log_probs = vocab_parallel_log_probs(local, target, vocab, layout.current().tp_group)
    (log_probs * upstream).sum().backward()
    log_sum_sq = vocab_parallel_log_sum_sq_probs(local, vocab, layout.current().tp_group)
    return {
        "full_logits": full_logits,
        "target": target,
        "upstream": upstream,
        "vocab": vocab,
        "log_probs": log_probs.detach(),
        "log_sum_sq": log_sum_sq,
        "local_grad": local.grad,
        "shard": (tp_rank * shard, (tp_rank + 1) * shard),
    }
