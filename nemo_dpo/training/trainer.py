"""The DPO training loop, top to bottom.

setup: tokenizer -> data -> loss -> model (this rank's model chunks: one, or one
per virtual pipeline stage; layout-independent init, or the weights of
``model.restore_from_path``) -> DDP -> reference policy (a snapshot of those
initial weights; none for a reference-free loss) -> optimizer and schedule ->
resume from the newest complete checkpoint if there is one. Each step: take the
next global batch of pairs, keep this DP rank's share, split it into
microbatches (this CP rank's share of each sequence), compute the reference
values the loss asks for (reference weights swapped in), for KTO estimate the
batch's KL reference point (a forward-only policy pass), run the policy
forward/backward, step the optimizer, then let the loss update its state (BCO's
running mean) and, with TR-DPO, move the reference. Validation runs every
``val_check_interval`` steps (or that fraction of an epoch) and at the end;
checkpoints every ``save_interval`` steps and at the end.
"""

import itertools
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.transformer.module import Float16Module
from omegaconf import OmegaConf

from nemo_dpo.compiled import seconds_compiling
from nemo_dpo.data.batching import Microbatcher, global_batches
from nemo_dpo.data.packing import PackingChoice, choose_packing, shares_prompts
from nemo_dpo.data.pipeline import load_run_data
from nemo_dpo.data.tokenizer import source_files
from nemo_dpo.distributed.failures import Heartbeat
from nemo_dpo.distributed.layout import Layout
from nemo_dpo.losses import build_loss
from nemo_dpo.models import fusion
from nemo_dpo.models.gpt import HAVE_TE, OURS_TO_RECOMPUTE, build_model_chunks, recomputes, transformer_config
from nemo_dpo.models.init_weights import init_weights
from nemo_dpo.models.lora import add_lora
from nemo_dpo.ranges import Either, Flag, Integer, OneOf, Real
from nemo_dpo.training import checkpoint, initial_policy, reference_cache
from nemo_dpo.training.dpo_step import DPOStep, whole_sequence_masks
from nemo_dpo.training.kl_estimate import KLEstimate
from nemo_dpo.training.log_dir import log_dir
from nemo_dpo.training.metrics_log import MetricsLog
from nemo_dpo.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from nemo_dpo.training.preemption import Preemption
from nemo_dpo.training.progress import clock
from nemo_dpo.training.reference import (
    REFERENCE_KEY,
    OnlineReference,
    PrecomputedReference,
    ReferenceFree,
    reference_model,
)

NAN_POLICIES = ("skip_step", "stop")  # trainer.dpo.nan_policy

RANGES = {
    "trainer.dpo.max_epochs": Integer(ge=1),
    "trainer.dpo.max_steps": Integer(ge=1, special={-1: "no limit"}),
    "trainer.dpo.val_check_interval": Either(first=Integer(ge=1, special={0: "only at the end"}), first_is="steps",
                                             second=Real(gt=0, le=1), second_is="a fraction of an epoch"),
    "trainer.dpo.limit_val_batches": Either(first=Integer(ge=1, special={-1: "the whole split"}), first_is="batches",
                                            second=Real(gt=0, le=1), second_is="a fraction of the split"),
    "trainer.dpo.save_interval": Integer(ge=1, special={0: "only at the end"}),
    "trainer.dpo.nan_policy": OneOf(choices=NAN_POLICIES),
    "trainer.gradient_clip_val": Real(gt=0, special={0: "no clipping"}),
    "exp_manager.resume_if_exists": Flag(),
}


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (trainer.dpo.nan_policy=stop)."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite: its smallest and largest are (``aminmax`` returns NaN when any element is
    NaN). One pass with no temporaries, where ``isfinite(tensor).all()`` makes three tensors of its size (abs and
    two masks): on a 34M-parameter gradient buffer on 2 CPU cores, 4 ms against 113 ms a step."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def steps_between_validations(val_check_interval, steps_per_epoch: int) -> int:
    """``trainer.dpo.val_check_interval`` in steps: an integer is steps (0: only at the end), a float a fraction of an
    epoch (NeMo-Aligner's form), rounded down as Aligner does, and at least one step."""
    if isinstance(val_check_interval, float):
        return max(1, int(val_check_interval * steps_per_epoch))
    return val_check_interval


def validation_batches_used(limit_val_batches, available: int) -> int:
    """``trainer.dpo.limit_val_batches`` in batches: -1 all, an integer at most that many, a float that fraction of
    them (NeMo-Aligner's form, 1.0 = all), rounded down and at least one."""
    if isinstance(limit_val_batches, float):
        return max(1, int(limit_val_batches * available))
    return available if limit_val_batches < 0 else min(limit_val_batches, available)




class DPOTrainer:
    def __init__(self, cfg, layout: Layout):
        self.cfg, self.layout = cfg, layout
        m = cfg.model
        self.log_dir = log_dir(cfg)
        self.data = load_run_data(m, self.log_dir, layout.rank, self.log0)
        self.tokenizer = self.data.tokenizer
        self.train_pairs, self.val_pairs = self.data.pairs["train"], self.data.pairs["validation"]

        if m.vocab_size is None:
            m.vocab_size = self.tokenizer.vocab_size
        elif self.tokenizer.vocab_size > m.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than model.vocab_size ({m.vocab_size})"
            )
        self.config = transformer_config(m, cfg.trainer.precision)
        self.loss = build_loss(m.dpo)
        self.model = wrap_ddp(self.build_model(), self.config, m.optim)  # the model chunks
        fused_log_probs = fusion.fuses_log_probs(m, cfg.trainer.precision)
        fused = ([] if HAVE_TE else fusion.fused_parts(m)) + (["the log-softmax tail"] if fused_log_probs else [])
        if fused:
            self.log0(f"model: {', '.join(fused)} compiled into fused kernels (model.fused_elementwise="
                      f"{m.fused_elementwise}, hidden size {m.hidden_size}); the first step includes compiling them "
                      f"(cached on disk for later runs)")
        recomputed = [part for part in OURS_TO_RECOMPUTE if recomputes(m, part)]
        if recomputed and not HAVE_TE:
            self.log0(f"model: the {' and '.join(recomputed)} outputs recomputed in backward instead of kept "
                      f"(model.recompute_modules={m.recompute_modules})")
        runs_as_reference = None
        if self.loss.needs_reference:
            runs_as_reference = reference_model(self.model, lora=m.peft.peft_scheme == "lora")  # the initial weights

        dpo = cfg.trainer.dpo
        self.steps_per_epoch = len(self.train_pairs) // m.global_batch_size
        by_epochs = dpo.max_epochs * self.steps_per_epoch
        self.total_steps = by_epochs if dpo.max_steps < 0 else min(dpo.max_steps, by_epochs)
        if self.total_steps < m.optim.sched.warmup_steps:
            self.log0(
                f"warning: the run has {self.total_steps} steps (trainer.dpo.max_steps={dpo.max_steps}, max_epochs="
                f"{dpo.max_epochs}), fewer than model.optim.sched.warmup_steps={m.optim.sched.warmup_steps}: "
                "the warmup is cut short to fit"
            )
        self.val_every = steps_between_validations(dpo.val_check_interval, self.steps_per_epoch)
        if isinstance(dpo.val_check_interval, float):
            self.log0(f"validation every {self.val_every} steps (trainer.dpo.val_check_interval={dpo.val_check_interval} "
                      f"of an epoch of {self.steps_per_epoch} steps)")
        self.optimizer = build_optimizer(self.model, m.optim, cfg.trainer.gradient_clip_val, self.config.bf16)
        self.scheduler = build_scheduler(self.optimizer, m.optim, self.total_steps)
        self.step_fn = DPOStep(self.model, self.loss, m.vocab_size, m.log_prob_chunk_size, layout, fused_log_probs)
        # Sequence parallelism splits each CP share over the TP ranks: rows must divide by CP x TP.
        pad_multiple = math.lcm(8, layout.cp * layout.tp) if m.sequence_parallel else 8
        values = tuple(dict.fromkeys(self.loss.policy_values + self.loss.reference_values))
        share_prompts = shares_prompts(m.data.share_prompts, layout.cp, local_attention=not HAVE_TE)
        self.microbatcher = Microbatcher(m.micro_batch_size, m.data.packing is True, self.tokenizer.pad_id,
                                         layout.dp_rank, layout.dp, layout.device, layout.cp_rank, layout.cp,
                                         pad_multiple, whole_sequence_masks(values), share_prompts)
        if m.data.packing == "auto":
            self.microbatcher.packing = self.choose_packing().packed
        self.reference = self.build_reference(runs_as_reference)  # from the initial weights, so before resuming
        self.kl_estimate = KLEstimate(self.loss, self.step_fn.log_probs, layout) if self.loss.estimates_kl else None

        self.checkpoint_dir = Path(self.log_dir) / "checkpoints"
        async_save = cfg.checkpoint.async_save
        if async_save is None:
            async_save = torch.cuda.is_available()
        self.async_queue = AsyncCallsQueue() if async_save else None
        self.step = self.saved_step = self.skipped_steps = 0
        # Test hooks (fault injection): NaN gradients on rank 0 only at a step; an exception at "<step>:<rank>".
        self.nan_at_step = int(os.environ.get("NEMO_DPO_FAULT_NAN_AT_STEP", "0"))
        self.raise_at = os.environ.get("NEMO_DPO_FAULT_RAISE_AT_STEP", "")
        self.heartbeat = Heartbeat(layout.rank, layout.world_size)  # names the ranks behind when a collective times out
        if layout.rank == 0:
            checkpoint.remove_partial_writes(Path(self.log_dir), self.log0)
        if cfg.exp_manager.resume_if_exists:
            self.resume()
        self.metrics = MetricsLog(cfg, self.log_dir, enabled=layout.rank == 0, resume_step=self.step,
                                  total_steps=self.total_steps)
        if layout.rank == 0:
            OmegaConf.save(cfg, os.path.join(self.log_dir, "config.yaml"), resolve=True)

    def log0(self, message: str) -> None:
        """A console line from rank 0 only."""
        if self.layout.rank == 0:
            print(message, flush=True)

    def choose_packing(self) -> PackingChoice:
        """``model.data.packing=auto``: packing if it computes enough fewer tokens over an epoch than padding
        (``model.data.packing_min_saving``), said once."""
        m, batcher = self.cfg.model, self.microbatcher
        choice = choose_packing(self.train_pairs, m.global_batch_size, m.seed, batcher.micro_batch_size, batcher.dp,
                                batcher.pad_multiple, batcher.sequence_multiple, m.data.packing_min_saving,
                                batcher.share_prompts)
        self.log0(choice.message())
        return choice

    def build_model(self) -> list:
        """This stage's GPT (its model chunks) with the initial weights (and LoRA adapters), on the compute device."""
        m, layout = self.cfg.model, self.layout
        chunks = [chunk.to(layout.device) for chunk in build_model_chunks(m, m.vocab_size, self.config)]
        if m.restore_from_path is None:
            for chunk in chunks:
                init_weights(chunk, self.config, m.seed)
        else:
            initial_policy.load_weights(chunks, self.config, m)
            self.log0(f"initial policy and reference: {m.restore_from_path}")
        if m.peft.peft_scheme == "lora":
            for chunk in chunks:
                add_lora(chunk, self.config, m.peft.lora_tuning, m.seed)
        params = [p for chunk in chunks for p in chunk.parameters()]
        trainable = sum(p.numel() for p in params if p.requires_grad)
        self.log0(f"model: {sum(p.numel() for p in params):,} parameters on rank 0 ({trainable:,} trainable)")
        if self.config.bf16:
            chunks = [Float16Module(self.config, chunk) for chunk in chunks]  # bf16 in, fp32 out of the last stage
        return chunks

    def build_reference(self, runs_as_reference):
        """Where the reference values come from (``model.dpo.reference_logprobs``): a pass per batch, or a table
        computed once from the initial weights and cached in the log dir; nowhere for a reference-free loss."""
        m = self.cfg.model
        if not self.loss.needs_reference:
            unused = " (model.dpo.reference_logprobs=precomputed: nothing to compute)"
            self.log0(f"loss {m.dpo.preference_loss}: reference-free: no reference weights, reference pass or "
                      f"reference cache{unused if m.dpo.reference_logprobs == 'precomputed' else ''}")
            return ReferenceFree()
        values = self.loss.reference_values
        if m.dpo.reference_logprobs == "online":
            return OnlineReference(runs_as_reference, self.step_fn.log_probs, values, self.layout.cp_group)
        key = reference_cache.cache_key(self.data.input_files(), list(source_files(self.tokenizer).values()),
                                        self.model, m, self.data.pairs, values)

        def compute(pairs, progress):
            return reference_cache.compute_table(pairs, runs_as_reference, self.step_fn.log_probs, self.microbatcher,
                                                 self.layout, m.global_batch_size, progress, values)

        path = os.path.join(self.log_dir, reference_cache.FILE)
        tables = reference_cache.load_or_compute(path, key, self.data.pairs, compute, self.layout.rank, self.log0)
        return PrecomputedReference(tables, self.microbatcher, values)

    # -- checkpoints --------------------------------------------------------------------

    def progress(self) -> dict:
        """Where training stands; the data position follows from the step and these."""
        m = self.cfg.model
        return {
            "step": self.step,
            "consumed_samples": self.step * m.global_batch_size,
            "train_pairs": len(self.train_pairs),
            "global_batch_size": m.global_batch_size,
            "seed": m.seed,
            "skipped_steps": self.skipped_steps,
        }

    def extra_state(self) -> dict:
        """Sharded training state besides model, optimizer and RNG: TR-DPO's moving reference weights."""
        if not self.cfg.model.dpo.sync_ref_model:
            return {}
        return {REFERENCE_KEY: self.reference.runs_as_reference.sharded_state()}

    def save_checkpoint(self) -> None:
        metadata = {"config": OmegaConf.to_container(self.cfg, resolve=True), "progress": self.progress(),
                    "loss_state": self.loss.state_dict()}
        checkpoint.save(
            checkpoint.step_dir(self.checkpoint_dir, self.step),
            {**checkpoint.sharded_state(self.model, self.optimizer), **self.extra_state()},
            metadata,
            self.cfg.checkpoint.keep_last_k,
            extra_files={**self.tokenizer_files(), **initial_policy.carried_files(self.cfg.model)},
            async_queue=self.async_queue,
        )
        self.saved_step = self.step

    def finish_checkpoints(self, blocking: bool) -> None:
        """Complete background checkpoint writes that are done (all of them if ``blocking``)."""
        if self.async_queue is not None:
            checkpoint.finish_background_saves(self.async_queue, self.checkpoint_dir, blocking)

    def tokenizer_files(self) -> dict:
        """The tokenizer, stored in every checkpoint (``tokenizer/``) so that it is self-contained."""
        return {f"{checkpoint.TOKENIZER_DIR}/{name}": path for name, path in source_files(self.tokenizer).items()}

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in the log dir, if any (rank 0 decides)."""
        found = [None]
        if self.layout.rank == 0:
            found = [checkpoint.newest_complete(self.checkpoint_dir)]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return
        folder = Path(found[0])
        checkpoint.check_compatible(folder, self.cfg.model)
        metadata = checkpoint.load(folder, self.model, self.optimizer, self.extra_state())
        progress = metadata["progress"]
        try:
            self.loss.load_state_dict(metadata.get("loss_state", {}))
        except ValueError as err:
            raise checkpoint.CheckpointError(f"{folder}: {err}") from err
        for key, value in self.progress().items():
            if key not in ("step", "consumed_samples", "skipped_steps") and progress[key] != value:
                raise checkpoint.CheckpointError(
                    f"{folder}: saved with {key}={progress[key]}, this run has {key}={value}; the data "
                    f"position cannot be restored (use a new exp_manager.explicit_log_dir, or "
                    f"exp_manager.resume_if_exists=false)"
                )
        self.step = self.saved_step = progress["step"]
        self.skipped_steps = progress.get("skipped_steps", 0)
        # The LR schedule is this run's config at this step (a changed lr or max_steps applies from here on).
        self.scheduler.num_steps = self.step - self.skipped_steps
        self.scheduler.step(0)
        self.log0(f"checkpoint: resumed from {folder} at step {self.step}")

    # -- one global batch -------------------------------------------------------------

    def forward_backward(self, indices: list) -> dict:
        """Reference sums, then policy forward/backward on the training pairs ``indices``; gradients stay in
        DDP's buffers. The metrics include the seconds spent in each (``time_reference``, ``time_policy``; KTO's
        KL estimate, a policy pass, counts as policy time)."""
        microbatches = self.microbatcher([self.train_pairs[i] for i in indices])
        time_reference = self.reference.attach(microbatches, "train", indices)
        start = clock()
        if self.kl_estimate is not None:
            self.kl_estimate.attach(microbatches)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self.step_fn.policy(microbatches)
        metrics.update(time_reference=time_reference, time_policy=clock() - start)
        return metrics

    def optimizer_step(self) -> dict:
        start = clock()
        self.scheduler.step(1)  # the schedule's value for this step (warmup starts above 0)
        lr = self.optimizer.param_groups[0]["lr"]
        success, grad_norm, _ = self.optimizer.step()
        if not success:
            raise RuntimeError(f"optimizer step {self.step} failed (non-finite gradients)")
        self.step += 1
        return {"grad_norm": float(grad_norm), "lr": lr, "time_optimizer": clock() - start}

    def after_update(self, metrics: dict) -> None:
        """What follows an optimizer update: the loss's state (from the step's averaged metrics), and TR-DPO's
        reference moving towards the policy every ``ref_model_sync_steps`` steps."""
        self.loss.end_step(metrics)
        dpo = self.cfg.model.dpo
        if dpo.sync_ref_model and self.step % dpo.ref_model_sync_steps == 0:
            self.reference.mix_in(dpo.ref_model_mixup_alpha)

    def numerics_ok(self, metrics: dict) -> bool:
        """Whether the loss and every gradient are finite on every rank (one all-reduce, before the update)."""
        buffers = [b for chunk in self.model for b in chunk.buffers + chunk.expert_parallel_buffers]
        ok = math.isfinite(metrics["loss"]) and all(all_finite(b.grad_data) for b in buffers)
        flag = torch.tensor([0.0 if ok else 1.0], device=self.layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

    def skip_step(self, metrics: dict) -> dict:
        """A step whose loss or gradients are not finite: ``trainer.dpo.nan_policy`` decides."""
        step = self.step + 1
        if self.cfg.trainer.dpo.nan_policy == "stop":
            if self.saved_step != self.step:
                self.save_checkpoint()  # the optimizer has not stepped: this is the last good state
            self.finish_checkpoints(blocking=True)
            raise NonFiniteError(
                f"step {step}: non-finite loss or gradients (loss {metrics['loss']}); the last good state is saved "
                f"as step {self.step} in {self.checkpoint_dir} (trainer.dpo.nan_policy=stop)"
            )
        self.step += 1  # the batch is consumed; weights, optimizer and LR schedule stay as they were
        self.skipped_steps += 1
        print(f"rank {self.layout.rank}: step {step}: non-finite loss or gradients on some rank: step skipped "
              f"({self.skipped_steps} skipped so far; trainer.dpo.nan_policy=skip_step)", flush=True)
        return {"grad_norm": float("nan"), "lr": self.optimizer.param_groups[0]["lr"], "time_optimizer": 0.0}

    def train_step(self, indices: list) -> dict:
        """One optimizer step on the training pairs ``indices``; ``tokens_per_sec`` counts real (non-pad) tokens."""
        start, compiling = clock(), seconds_compiling()
        if self.raise_at == f"{self.step + 1}:{self.layout.rank}":
            raise RuntimeError(f"injected fault at step {self.step + 1} on rank {self.layout.rank} "
                               f"(NEMO_DPO_FAULT_RAISE_AT_STEP={self.raise_at})")
        metrics = self.forward_backward(indices)
        if self.step + 1 == self.nan_at_step and self.layout.rank == 0:
            self.model[0].buffers[0].grad_data[0] = float("nan")
        if self.numerics_ok(metrics):
            metrics.update(self.optimizer_step())
            self.after_update(metrics)
        else:
            metrics.update(self.skip_step(metrics))
        metrics["skipped_steps"] = self.skipped_steps
        metrics["time_step"] = clock() - start
        if (compiled_now := seconds_compiling() - compiling) >= 0.5:  # the first step; shapes new to the kernels
            self.log0(f"step {self.step}: {compiled_now:.1f} s of its {metrics['time_step']:.1f} s compiling fused "
                      f"kernels (torch.compile, cached on disk for later runs)")
        metrics["tokens_per_sec"] = sum(self.train_pairs[i].num_tokens for i in indices) / metrics["time_step"]
        return metrics

    # -- validation ---------------------------------------------------------------------

    def validate(self) -> dict:
        """Mean metrics over the validation split (whole global batches, at most ``limit_val_batches``), dropout off."""
        m, dpo = self.cfg.model, self.cfg.trainer.dpo
        batches = [
            list(range(i, i + m.global_batch_size))
            for i in range(0, len(self.val_pairs) - m.global_batch_size + 1, m.global_batch_size)
        ]
        batches = batches[: validation_batches_used(dpo.limit_val_batches, len(batches))]
        start, rows = time.perf_counter(), []
        for chunk in self.model:
            chunk.eval()
        for indices in batches:
            microbatches = self.microbatcher([self.val_pairs[i] for i in indices])
            self.reference.attach(microbatches, "validation", indices)
            if self.kl_estimate is not None:
                self.kl_estimate.attach(microbatches)
            with torch.no_grad():
                rows.append(self.step_fn.policy(microbatches, forward_only=True))
        for chunk in self.model:
            chunk.train()
        # The mean over the batches that have a metric (KTO's batches may lack one side's examples).
        keys = dict.fromkeys(key for row in rows for key in row)
        metrics = {key: sum(r[key] for r in rows if key in r) / sum(key in r for r in rows) for key in keys}
        tokens = sum(self.val_pairs[i].num_tokens for indices in batches for i in indices)
        metrics["tokens_per_sec"] = tokens / (time.perf_counter() - start)
        return metrics

    def log(self, split: str, metrics: dict, console: bool = True) -> dict:
        row = {"step": self.step, "split": split, **metrics}
        row["consumed_samples"] = self.step * self.cfg.model.global_batch_size
        self.metrics.write(row, console)
        return row

    # -- the loop -----------------------------------------------------------------------

    def fit(self) -> dict:
        """Train for ``total_steps``; returns the last validation row (None if already done, or preempted)."""
        try:
            return self._fit()
        finally:
            self.metrics.close()  # flushes TensorBoard / W&B also when training fails

    def _fit(self) -> dict:
        m = self.cfg.model
        if self.step >= self.total_steps:
            self.log0(f"nothing to do: the checkpoint is at step {self.step} of {self.total_steps}")
            return None
        steps = f"{self.total_steps} step" + ("" if self.total_steps == 1 else "s")
        self.log0(
            f"training {steps}: TP={self.layout.tp} PP={self.layout.pp} CP={self.layout.cp} "
            f"DP={self.layout.dp}, "
            f"global batch {m.global_batch_size} {'examples' if m.dpo.preference_loss == 'kto' else 'pairs'} = "
            f"{m.micro_batch_size} x "
            f"{m.global_batch_size // (m.micro_batch_size * self.layout.dp)} microbatches x DP {self.layout.dp}; "
            f"logs in {self.log_dir}",
        )
        with Preemption(self.layout.rank, self.layout.device) as preemption:
            last_val, preempted = self._train(preemption)
        if preempted:
            return None
        if last_val is None or last_val["step"] != self.step:
            last_val = self.log("val", self.validate())
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.finish_checkpoints(blocking=True)
        return last_val

    def _train(self, preemption: Preemption) -> tuple:
        """The steps; returns (the last validation row, whether a signal stopped them after a save)."""
        m, dpo = self.cfg.model, self.cfg.trainer.dpo
        last_val = None
        for epoch in itertools.count(self.step // self.steps_per_epoch):
            if self.step >= self.total_steps:
                break
            batches = global_batches(len(self.train_pairs), m.global_batch_size, m.seed, epoch)
            for indices in batches[self.step % self.steps_per_epoch :]:
                if self.step >= self.total_steps:
                    break
                self.heartbeat.beat(self.step + 1)
                metrics = self.train_step(indices)
                self.finish_checkpoints(blocking=False)
                console = self.step % dpo.log_interval == 0 or self.step == self.total_steps
                self.log("train", metrics, console)
                if self.val_every > 0 and self.step % self.val_every == 0:
                    last_val = self.log("val", self.validate())
                if dpo.save_interval > 0 and self.step % dpo.save_interval == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if preemption.requested():
                    if self.saved_step != self.step:
                        self.save_checkpoint()
                    self.finish_checkpoints(blocking=True)
                    self.log0(f"preempted: checkpoint of step {self.step} complete in {self.checkpoint_dir}; "
                              "exiting 0 (rerun the same command to resume)")
                    return last_val, True
        return last_val, False
