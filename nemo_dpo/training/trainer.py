"""The DPO training loop, top to bottom.

setup: tokenizer -> data -> model (layout-independent init, or the weights of
``model.restore_from_path``) -> DDP -> reference policy (a snapshot of those
initial weights) -> optimizer and schedule -> resume from the newest complete
checkpoint if there is one. Each step: take the next global batch of pairs,
keep this DP rank's share, split it into microbatches, compute reference
log-probs (reference weights swapped in), run the policy forward/backward, step
the optimizer. Validation runs every ``val_check_interval`` steps and at the
end; checkpoints every ``save_interval`` steps and at the end.
"""

import itertools
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.transformer.module import Float16Module
from omegaconf import OmegaConf

from nemo_dpo.config import data_files, preference_loss_config
from nemo_dpo.data.batching import collate_microbatches, collate_packed_microbatches, dp_shard, global_batches
from nemo_dpo.data.chat_template import record_options
from nemo_dpo.data.preference_dataset import read_preference_pairs, tokenize_pairs
from nemo_dpo.data.schemas import RecordOptions
from nemo_dpo.data.tokenizer import SentencePieceTokenizer, load_or_train_tokenizer, open_tokenizer, tokenizer_files
from nemo_dpo.distributed.init import Layout
from nemo_dpo.models.gpt import build_gpt, transformer_config
from nemo_dpo.models.init_weights import init_weights
from nemo_dpo.models.lora import add_lora
from nemo_dpo.training import checkpoint, initial_policy, reference_cache
from nemo_dpo.training.dpo_step import DPOStep
from nemo_dpo.training.metrics_log import MetricsLog
from nemo_dpo.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from nemo_dpo.training.preemption import Preemption
from nemo_dpo.training.reference import BaseModelReference, ReferencePolicy


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (trainer.dpo.nan_policy=stop)."""


def clock() -> float:
    """Seconds, after the device has finished the work queued so far (for honest time splits)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def log0(layout: Layout, message: str) -> None:
    if layout.rank == 0:
        print(message, flush=True)


def load_tokenizer(cfg, train_file: str, layout: Layout, options: RecordOptions):
    """The configured tokenizer, or one trained by rank 0 on the training data's text (per ``options``) and sent to all.

    Sending the model bytes (rather than training on every node) guarantees every
    rank uses the identical vocabulary, with or without a shared filesystem.
    """
    tok_cfg = cfg.model.tokenizer
    if tok_cfg.model is not None:
        return open_tokenizer(tok_cfg.model)
    cache_dir = os.path.expanduser(tok_cfg.cache_dir)
    payload = [None, None]
    if layout.rank == 0:
        tokenizer = load_or_train_tokenizer(None, [train_file], tok_cfg.vocab_size, cache_dir, options)
        with open(tokenizer.model_path, "rb") as f:
            payload = [os.path.basename(tokenizer.model_path), f.read()]
    dist.broadcast_object_list(payload, src=0)
    if layout.rank == 0:
        return tokenizer
    name, blob = payload
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".spm_recv_")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    return SentencePieceTokenizer(path)


def read_records(files: dict, model_cfg, log_dir: str, layout: Layout, options: RecordOptions) -> dict:
    """Every input file read and checked before anything else; bad records follow ``model.data.on_bad_record``.

    Skipped records are counted on the console and listed in ``<log dir>/skipped_records.txt``.
    """
    policy = model_cfg.data.on_bad_record
    records, skipped = {}, []
    for split, path in files.items():
        data = read_preference_pairs(path, policy, options)
        records[split], bad = data.records, data.skipped
        schemas = ", ".join(f"{count} {name}" for name, count in data.schemas.items())
        log0(layout, f"{split}: {data.file_format} file {path}: {schemas}")
        if bad:
            log0(layout, f"{split}: skipped {len(bad)} bad record(s) of {path} (model.data.on_bad_record={policy}), "
                         f"e.g. {bad[0]}")
        skipped += bad
    if layout.rank == 0:
        listing = os.path.join(log_dir, "skipped_records.txt")
        if skipped:
            os.makedirs(log_dir, exist_ok=True)
            with open(listing + ".tmp", "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in skipped))
            os.replace(listing + ".tmp", listing)
            log0(layout, f"data: {len(skipped)} skipped record(s) listed in {listing}")
        elif os.path.exists(listing):
            os.remove(listing)  # from an earlier run of this log dir
    return records


def tokenize_split(records: list, path: str, tokenizer, model_cfg, split: str, layout: Layout):
    pairs, stats = tokenize_pairs(records, tokenizer, model_cfg.encoder_seq_length, model_cfg.data.overflow)
    log0(
        layout,
        f"{split}: {stats['pairs']} pairs from {path} (longest {stats['max_len']} tokens, "
        f"{stats['truncated']} prompt-truncated and {stats['dropped']} dropped by "
        f"model.data.overflow={model_cfg.data.overflow}, encoder_seq_length={model_cfg.encoder_seq_length})",
    )
    if len(pairs) < model_cfg.global_batch_size:
        raise ValueError(
            f"{path}: {len(pairs)} usable pairs, fewer than model.global_batch_size ({model_cfg.global_batch_size})"
        )
    return pairs


def pair_tokens(pair) -> int:
    return 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)


class DPOTrainer:
    def __init__(self, cfg, layout: Layout):
        self.cfg, self.layout = cfg, layout
        m = cfg.model
        self.log_dir = cfg.exp_manager.explicit_log_dir or os.path.join("runs", cfg.name)
        files = data_files(cfg)
        options = record_options(m)
        records = read_records(files, m, self.log_dir, layout, options)
        self.tokenizer = load_tokenizer(cfg, files["train"], layout, options)
        self.train_pairs = tokenize_split(records["train"], files["train"], self.tokenizer, m, "train", layout)
        self.val_pairs = tokenize_split(records["validation"], files["validation"], self.tokenizer, m, "validation",
                                        layout)

        if m.vocab_size is None:
            m.vocab_size = self.tokenizer.vocab_size
        elif self.tokenizer.vocab_size > m.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than model.vocab_size ({m.vocab_size})"
            )
        self.config = transformer_config(m, cfg.trainer.precision)
        self.model = wrap_ddp(self.build_model(), self.config, m.optim)
        lora = m.peft.peft_scheme == "lora"
        self.reference = BaseModelReference(self.model) if lora else ReferencePolicy(self.model)

        dpo = cfg.trainer.dpo
        self.steps_per_epoch = len(self.train_pairs) // m.global_batch_size
        by_epochs = dpo.max_epochs * self.steps_per_epoch
        self.total_steps = by_epochs if dpo.max_steps < 0 else min(dpo.max_steps, by_epochs)
        self.optimizer = build_optimizer(self.model, m.optim, cfg.trainer.gradient_clip_val, self.config.bf16)
        self.scheduler = build_scheduler(self.optimizer, m.optim, self.total_steps)
        self.step_fn = DPOStep(self.model, preference_loss_config(cfg), m.vocab_size, m.log_prob_chunk_size)

        self.ref_tables = None
        if m.dpo.reference_logprobs == "precomputed":  # from the initial weights, so before resuming
            key = reference_cache.cache_key(
                [*files.values(), *options.files()], list(self.tokenizer_files().values()), self.model, m
            )
            splits = {"train": self.train_pairs, "validation": self.val_pairs}
            self.ref_tables = reference_cache.load_or_compute(self, key, splits)
        self.checkpoint_dir = Path(self.log_dir) / "checkpoints"
        async_save = cfg.checkpoint.async_save
        if async_save is None:
            async_save = torch.cuda.is_available()
        self.async_queue = AsyncCallsQueue() if async_save else None
        self.step = self.saved_step = self.skipped_steps = 0
        # Test hook (fault injection): NaN gradients on rank 0 only, at this step.
        self.nan_at_step = int(os.environ.get("NEMO_DPO_FAULT_NAN_AT_STEP", "0"))
        if cfg.exp_manager.resume_if_exists:
            self.resume()
        self.metrics = MetricsLog(cfg, self.log_dir, enabled=layout.rank == 0, resume_step=self.step,
                                  total_steps=self.total_steps)
        if layout.rank == 0:
            OmegaConf.save(cfg, os.path.join(self.log_dir, "config.yaml"), resolve=True)
        self._val_reference = None

    def build_model(self):
        """This stage's GPT with its initial weights (and LoRA adapters), on the compute device."""
        m, layout = self.cfg.model, self.layout
        model = build_gpt(m, m.vocab_size, self.config).to(layout.device)
        if m.restore_from_path is None:
            init_weights(model, self.config, m.seed)
        else:
            initial_policy.load_weights(model, self.config, m)
            log0(layout, f"initial policy and reference: {m.restore_from_path}")
        if m.peft.peft_scheme == "lora":
            add_lora(model, self.config, m.peft.lora_tuning, m.seed)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log0(layout, f"model: {total:,} parameters on rank 0 ({trainable:,} trainable)")
        if self.config.bf16:
            model = Float16Module(self.config, model)  # bf16 in, fp32 out of the last stage
        return model

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

    def save_checkpoint(self) -> None:
        common = {"config": OmegaConf.to_container(self.cfg, resolve=True), "progress": self.progress()}
        state = checkpoint.sharded_state(self.model, self.optimizer, self.scheduler, common)
        checkpoint.save(
            checkpoint.step_dir(self.checkpoint_dir, self.step),
            state,
            self.cfg.checkpoint.keep_last_k,
            extra_files=self.tokenizer_files(),
            async_queue=self.async_queue,
        )
        self.saved_step = self.step

    def finish_checkpoints(self, blocking: bool) -> None:
        """Complete background checkpoint writes that are done (all of them if ``blocking``)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def tokenizer_files(self) -> dict:
        """The tokenizer, stored in every checkpoint (``tokenizer/``) so that it is self-contained."""
        path = self.tokenizer.model_path
        if isinstance(self.tokenizer, SentencePieceTokenizer):
            names = {"tokenizer.model": path}
        else:
            names = {os.path.basename(f): f for f in tokenizer_files(os.path.dirname(path))}
        return {f"{checkpoint.TOKENIZER_DIR}/{name}": source for name, source in names.items()}

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
        progress = checkpoint.load(folder, self.model, self.optimizer, self.scheduler)["progress"]
        for key, value in self.progress().items():
            if key not in ("step", "consumed_samples", "skipped_steps") and progress[key] != value:
                raise checkpoint.CheckpointError(
                    f"{folder}: saved with {key}={progress[key]}, this run has {key}={value}; the data "
                    f"position cannot be restored (use a new exp_manager.explicit_log_dir, or "
                    f"exp_manager.resume_if_exists=false)"
                )
        self.step = self.saved_step = progress["step"]
        self.skipped_steps = progress.get("skipped_steps", 0)
        log0(self.layout, f"checkpoint: resumed from {folder} at step {self.step}")

    # -- one global batch -------------------------------------------------------------

    def microbatches(self, global_pairs: list, ref_sums=None) -> list:
        """This DP rank's share of a global batch, as microbatches on the compute device.

        ``ref_sums`` ([pairs, 2], chosen and rejected) are the precomputed reference sums.
        """
        layout, m = self.layout, self.cfg.model
        mbs = m.micro_batch_size
        local = dp_shard(global_pairs, layout.dp_rank, layout.dp)
        if m.data.packing:
            microbatches = collate_packed_microbatches(local, mbs, self.tokenizer.pad_id)
        else:
            microbatches = collate_microbatches(local, mbs, self.tokenizer.pad_id)
        if ref_sums is not None:
            local_ref = dp_shard(list(ref_sums), layout.dp_rank, layout.dp)
            for i, mb in enumerate(microbatches):
                mb["ref_sums"] = torch.stack(local_ref[i * mbs : (i + 1) * mbs]).reshape(-1).float()
        return [{k: v.to(layout.device) for k, v in mb.items()} for mb in microbatches]

    def forward_backward(self, global_pairs: list, ref_sums=None) -> dict:
        """Reference pass (unless precomputed), then policy forward/backward; gradients stay in DDP's buffers.

        The metrics include the seconds spent in each pass (``time_reference``, ``time_policy``).
        """
        start = clock()
        microbatches = self.microbatches(global_pairs, ref_sums)
        if ref_sums is None:
            self.step_fn.reference(microbatches, self.reference)
        reference_done = clock()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self.step_fn.policy(microbatches)
        metrics.update(time_reference=reference_done - start, time_policy=clock() - reference_done)
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

    def numerics_ok(self, metrics: dict) -> bool:
        """Whether the loss and every gradient are finite on every rank (one all-reduce, before the update)."""
        buffers = self.model.buffers + self.model.expert_parallel_buffers
        ok = math.isfinite(metrics["loss"]) and all(bool(torch.isfinite(b.grad_data).all()) for b in buffers)
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

    def train_step(self, global_pairs: list, ref_sums=None) -> dict:
        """One optimizer step on a global batch; ``tokens_per_sec`` counts real (non-pad) tokens."""
        start = clock()
        metrics = self.forward_backward(global_pairs, ref_sums)
        if self.step + 1 == self.nan_at_step and self.layout.rank == 0:
            self.model.buffers[0].grad_data[0] = float("nan")
        metrics.update(self.optimizer_step() if self.numerics_ok(metrics) else self.skip_step(metrics))
        metrics["skipped_steps"] = self.skipped_steps
        metrics["time_step"] = clock() - start
        metrics["tokens_per_sec"] = sum(map(pair_tokens, global_pairs)) / metrics["time_step"]
        return metrics

    # -- validation ---------------------------------------------------------------------

    def validate(self) -> dict:
        """Mean metrics over the validation split (whole global batches), dropout off.

        The reference never changes: its validation sums are computed once (or precomputed).
        """
        m, dpo = self.cfg.model, self.cfg.trainer.dpo
        batches = [
            self.val_pairs[i : i + m.global_batch_size]
            for i in range(0, len(self.val_pairs) - m.global_batch_size + 1, m.global_batch_size)
        ]
        if dpo.limit_val_batches >= 0:
            batches = batches[: dpo.limit_val_batches]
        start, rows = time.perf_counter(), []
        if self._val_reference is None:
            self._val_reference = (
                self.ref_tables["validation"] if self.ref_tables else reference_cache.compute(self, self.val_pairs)
            )
        self.model.eval()
        for index, pairs in enumerate(batches):
            ref = self._val_reference[index * m.global_batch_size : (index + 1) * m.global_batch_size]
            with torch.no_grad():
                rows.append(self.step_fn.policy(self.microbatches(pairs, ref), forward_only=True))
        self.model.train()
        metrics = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        tokens = sum(pair_tokens(p) for pairs in batches for p in pairs)
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
            log0(self.layout, f"nothing to do: the checkpoint is at step {self.step} of {self.total_steps}")
            return None
        log0(
            self.layout,
            f"training {self.total_steps} steps: TP={self.layout.tp} PP={self.layout.pp} DP={self.layout.dp}, "
            f"global batch {m.global_batch_size} pairs = {m.micro_batch_size} x "
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
                ref = None if self.ref_tables is None else self.ref_tables["train"][indices]
                metrics = self.train_step([self.train_pairs[i] for i in indices], ref)
                self.finish_checkpoints(blocking=False)
                console = self.step % dpo.log_interval == 0 or self.step == self.total_steps
                self.log("train", metrics, console)
                if dpo.val_check_interval > 0 and self.step % dpo.val_check_interval == 0:
                    last_val = self.log("val", self.validate())
                if dpo.save_interval > 0 and self.step % dpo.save_interval == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if preemption.requested():
                    if self.saved_step != self.step:
                        self.save_checkpoint()
                    self.finish_checkpoints(blocking=True)
                    log0(self.layout, f"preempted: checkpoint of step {self.step} complete in {self.checkpoint_dir}; "
                                      "exiting 0 (rerun the same command to resume)")
                    return last_val, True
        return last_val, False
