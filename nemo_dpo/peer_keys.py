"""What NeMo-Aligner's and TRL's config names are in nemo-dpo, so that their users are answered in their own words.

NeMo-Aligner is no longer maintained and nemo-dpo keeps its key names, so most
of an Aligner command line means the same here. Where Aligner spelled a key
differently, :data:`ALIGNER_SPELLINGS` says which key it is, and the command
runs unchanged; where Aligner had a setting that nemo-dpo does not implement,
:data:`ALIGNER_UNSUPPORTED` says so and why, so that it is not taken for a typo.

TRL users bring ``DPOConfig`` field names (flat: ``learning_rate``, ``beta``).
:data:`TRL_KEYS` gives the nemo-dpo key each points to (a did-you-mean, not an
alias: TRL's values do not always mean the same, e.g. ``loss_type=sigmoid``),
and :data:`TRL_UNSUPPORTED` why the others have no counterpart. TRL's loss
options that nemo-dpo's losses take under TRL's own name are ``model.dpo.<name>``;
one that no loss here takes is answered as unsupported.

nemo_dpo/config.py applies these tables; this module only holds them.
"""

# NeMo-Aligner's key -> the nemo-dpo key it is (accepted as written).
ALIGNER_SPELLINGS = {
    "pretrained_checkpoint.restore_from_path": "model.restore_from_path",
    "trainer.dpo.gradient_clip_val": "trainer.gradient_clip_val",
    "exp_manager.name": "name",
}

# PyTorch Lightning's trainer.precision values (NeMo-Aligner's) -> nemo-dpo's; fp16 is not implemented.
PRECISION_SPELLINGS = {"bf16-mixed": "bf16", "bf16-true": "bf16", 32: "fp32", "32": "fp32", "32-true": "fp32"}
FP16_SPELLINGS = (16, "16", "16-mixed", "16-true", "fp16")

_LIGHTNING = "a PyTorch Lightning trainer setting; nemo-dpo runs its own loop"
_CHECKPOINTS = ("checkpoints are written every trainer.dpo.save_interval steps and at the end, and the last "
                "checkpoint.keep_last_k are kept (no best-by-metric choice, no .nemo files)")
_DATA_IN_MEMORY = ("data is read, checked and tokenized in memory before step 1 (python -m nemo_dpo.data.prepare "
                   "shows what a run will read); there are no index files or loader workers")
_TIME = ("a run ends at trainer.dpo.max_steps or max_epochs; to stop one earlier send it SIGTERM (it saves and exits "
         "0) or let Slurm's time limit send --signal")
_LORA_LAYOUT = "adapters go on every layer of model.peft.lora_tuning.target_modules, A drawn from model.seed and B zero"

# NeMo-Aligner's settings (its examples/nlp/gpt/conf/gpt_dpo.yaml, and the flags its DPO guide names) that nemo-dpo
# does not implement -> why. A key here covers what is under it.
ALIGNER_UNSUPPORTED = {
    "trainer.accelerator": "a run uses CUDA when there is a GPU, else the CPU (gloo)",
    "trainer.logger": _LIGHTNING,
    "trainer.enable_checkpointing": _LIGHTNING,
    "trainer.use_distributed_sampler": _LIGHTNING,
    "trainer.max_time": _TIME,
    "trainer.max_epochs": "PyTorch Lightning's copy of trainer.dpo.max_epochs (Aligner's config said not to change it); "
                          "set trainer.dpo.max_epochs",
    "trainer.max_steps": "PyTorch Lightning's copy of trainer.dpo.max_steps (Aligner's config said not to change it); "
                         "set trainer.dpo.max_steps",
    "precision": "a copy of trainer.precision in Aligner's config; set trainer.precision",
    "trainer.dpo.limit_train_batches": "a run takes whole epochs of the training split; trainer.dpo.max_steps "
                                       "stops it earlier",
    "exp_manager.exp_dir": "the log dir is exp_manager.explicit_log_dir, or ./runs/<name>",
    "exp_manager.max_time_per_run": _TIME,
    "exp_manager.resume_from_checkpoint": "a run resumes from the newest complete checkpoint of its own log dir "
                                          "(exp_manager.resume_if_exists); other weights are model.restore_from_path",
    "exp_manager.resume_ignore_no_checkpoint": "a log dir without a checkpoint always starts at step 0",
    "exp_manager.create_checkpoint_callback": _CHECKPOINTS,
    "exp_manager.checkpoint_callback_params": _CHECKPOINTS,
    "model.mcore_gpt": "every nemo-dpo model is a megatron-core GPT",
    "model.megatron_amp_O2": "trainer.precision=bf16 keeps fp32 master weights in the optimizer, as O2 did",
    "model.transformer_engine": "transformer-engine is used on GPU whenever it is installed",
    "model.dpo.log_prob_forward_micro_batch_size": "reference log-probs are computed with model.micro_batch_size",
    "model.peft.restore_from_path": "LoRA adapters start from zero; a LoRA run resumes from its own log dir",
    "model.peft.restore_from_ckpt": "LoRA adapters start from zero; a LoRA run resumes from its own log dir",
    "model.peft.lora_tuning.column_init_method": _LORA_LAYOUT,
    "model.peft.lora_tuning.row_init_method": _LORA_LAYOUT,
    "model.peft.lora_tuning.layer_selection": _LORA_LAYOUT,
    "model.peft.lora_tuning.weight_tying": _LORA_LAYOUT,
    "model.peft.lora_tuning.position_embedding_strategy": _LORA_LAYOUT,
    "model.optim.bucket_cap_mb": "megatron-core's DDP runs with its own bucket and overlap defaults",
    "model.optim.overlap_grad_sync": "megatron-core's DDP runs with its own bucket and overlap defaults",
    "model.optim.contiguous_grad_buffer": "megatron-core's DDP always uses a contiguous gradient buffer",
    "model.optim.sched.constant_steps": "the schedule is linear warmup, then cosine decay to min_lr over the whole run",
    "model.data.data_impl": "files are read by their extension (.jsonl, .json, .parquet, .arrow, or a folder of "
                            "them); packing is model.data.packing=true at run time, not a packed file",
    "model.data.splits_string": "each split has its own files: model.data.data_prefix.train and .validation",
    "model.data.seq_length": "the sequence length is model.encoder_seq_length",
    "model.data.pad_length_to_multiple_of": "microbatches are padded to their longest sequence (or packed)",
    "model.data.skip_warmup": _DATA_IN_MEMORY,
    "model.data.num_workers": _DATA_IN_MEMORY,
    "model.data.index_mapping_dir": _DATA_IN_MEMORY,
    "model.data.reset_position_ids": "every sequence has its own positions, from 0",
    "model.data.reset_attention_mask": "attention always stays within a sequence",
    "model.data.eod_mask_loss": "the loss sees the response tokens and their EOS only",
    "model.data.default_chosen_reward": "records without rewards get chosen_reward 1 and rejected_reward 0; give "
                                        "chosen_reward / rejected_reward in the data for others",
    "model.data.default_rejected_reward": "records without rewards get chosen_reward 1 and rejected_reward 0; give "
                                          "chosen_reward / rejected_reward in the data for others",
    "model.overwrite_base_config": "only the architecture and the tokenizer come from model.restore_from_path; every "
                                   "other key is the run's own",
}

# TRL's DPOConfig field -> the nemo-dpo key for it. The model.dpo.<TRL's name> entries are the loss options that
# nemo-dpo's losses take under TRL's own name; where none does, the field is answered as unsupported.
TRL_KEYS = {
    "output_dir": "exp_manager.explicit_log_dir",
    "run_name": "name",
    "project": "exp_manager.wandb_logger_kwargs.project",
    "per_device_train_batch_size": "model.micro_batch_size",
    "per_device_eval_batch_size": "model.micro_batch_size",
    "gradient_accumulation_steps": "model.global_batch_size",
    "num_train_epochs": "trainer.dpo.max_epochs",
    "max_steps": "trainer.dpo.max_steps",
    "learning_rate": "model.optim.lr",
    "lr_scheduler_type": "model.optim.sched.name",
    "warmup_steps": "model.optim.sched.warmup_steps",
    "optim": "model.optim.name",
    "weight_decay": "model.optim.weight_decay",
    "adam_beta1": "model.optim.betas",
    "adam_beta2": "model.optim.betas",
    "adam_epsilon": "model.optim.eps",
    "max_grad_norm": "trainer.gradient_clip_val",
    "bf16": "trainer.precision",
    "gradient_checkpointing": "model.activations_checkpoint_granularity",
    "gradient_checkpointing_kwargs": "model.activations_checkpoint_method",
    "activation_checkpointing": "model.activations_checkpoint_granularity",
    "activation_checkpointing_kwargs": "model.activations_checkpoint_method",
    "logging_strategy": "trainer.dpo.log_interval",
    "logging_steps": "trainer.dpo.log_interval",
    "disable_tqdm": "trainer.enable_progress_bar",
    "eval_strategy": "trainer.dpo.val_check_interval",
    "eval_steps": "trainer.dpo.val_check_interval",
    "save_strategy": "trainer.dpo.save_interval",
    "save_steps": "trainer.dpo.save_interval",
    "save_total_limit": "checkpoint.keep_last_k",
    "seed": "model.seed",
    "data_seed": "model.seed",
    "resume_from_checkpoint": "exp_manager.resume_if_exists",
    "ddp_timeout": "trainer.distributed_timeout_minutes",
    "disable_dropout": "model.hidden_dropout",
    "max_length": "model.encoder_seq_length",
    "truncation_mode": "model.data.overflow",
    "padding_free": "model.data.packing",
    "router_aux_loss_coef": "model.moe_aux_loss_coeff",
    "precompute_ref_log_probs": "model.dpo.reference_logprobs",
    "loss_type": "model.dpo.preference_loss",
    "loss_weights": "model.dpo.preference_loss_weights",
    "beta": "model.dpo.ref_policy_kl_penalty",
    "label_smoothing": "model.dpo.label_smoothing",
    "rpo_alpha": "model.dpo.sft_loss_weight",  # earlier TRL versions: the weight of the NLL loss on chosen responses
    **{name: f"model.dpo.{name}" for name in (
        "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "discopop_tau",
        "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "simpo_gamma", "cpo_alpha",
        "desirable_weight", "undesirable_weight",  # KTOConfig's
    )},
}

NO_LOSS_TAKES_IT = "no preference loss of nemo-dpo takes this option (model.dpo holds the loss options)"

_WHY_NOT = {
    "training and validation run in fp32 or bf16 (trainer.precision)": (
        "fp16", "fp16_full_eval", "bf16_full_eval", "tf32"),
    "the kernels are megatron-core's (and transformer-engine's on GPU when it is installed)": (
        "torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config"),
    "memory is set by model.micro_batch_size, model.activations_checkpoint_granularity and "
    "model.log_prob_chunk_size": (
        "auto_find_batch_size", "torch_empty_cache_steps", "skip_memory_metrics", "activation_offloading"),
    "nothing is generated during training": ("use_cache",),
    "no noise is added to the embeddings": ("neftune_noise_alpha",),
    "the optimizer is set by the model.optim keys": ("optim_args", "optim_target_modules"),
    "the schedule is linear warmup, then cosine decay to model.optim.sched.min_lr": ("lr_scheduler_kwargs",),
    "the loss is the mean over the pairs of the global batch": ("average_tokens_across_devices",),
    "there is no token-level label smoothing (model.dpo.label_smoothing smooths the preference labels)": (
        "label_smoothing_factor",),
    "rank 0 records every step in metrics.jsonl and prints every trainer.dpo.log_interval-th": (
        "logging_first_step", "log_on_each_node", "logging_nan_inf_filter", "include_num_input_tokens_seen",
        "log_level", "log_level_replica"),
    "loggers are switched on one by one: exp_manager.create_tensorboard_logger, exp_manager.create_wandb_logger": (
        "report_to", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"),
    "validation runs every trainer.dpo.val_check_interval steps and at the end over trainer.dpo.limit_val_batches, "
    "and no best checkpoint is chosen": (
        "eval_delay", "eval_on_start", "prediction_loss_only", "eval_do_concat_batches", "eval_use_gather_object",
        "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics", "load_best_model_at_end",
        "metric_for_best_model", "greater_is_better"),
    "a checkpoint always holds the model, the optimizer and the RNG streams, and a resume is exact": (
        "save_only_model", "save_on_each_node", "enable_jit_checkpoint", "restore_callback_states_from_checkpoint",
        "ignore_data_skip"),
    "nothing is pushed to the Hugging Face Hub: export with python -m nemo_dpo.convert mcore-to-hf and push the "
    "folder": (
        "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
        "hub_revision"),
    "every random stream is seeded from model.seed": ("full_determinism",),
    "the GPU is used when there is one, else the CPU": ("use_cpu",),
    "parallelism is megatron-core's (model.tensor_model_parallel_size, model.pipeline_model_parallel_size, data "
    "parallel over the rest), launched by torchrun": (
        "accelerator_config", "parallelism_config", "fsdp", "fsdp_config", "deepspeed", "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "local_rank"),
    "data is read, checked and tokenized in each process before step 1, and pairs are shuffled by model.seed": (
        "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order",
        "remove_unused_columns", "label_names", "train_sampling_strategy", "length_column_name", "dataset_num_proc"),
    "a run trains and validates; python -m nemo_dpo.data.prepare checks data without training": (
        "do_train", "do_eval", "do_predict", "debug"),
    "the model comes from model.restore_from_path, and no code of a model folder ever runs": (
        "model_init_kwargs", "trust_remote_code"),
    "sequences are padded with the tokenizer's pad token to the longest of the step (or packed: "
    "model.data.packing)": ("pad_to_multiple_of", "pad_token"),
    "the precomputed reference runs in model.micro_batch_size pairs": ("precompute_ref_batch_size",),
    "a prompt is cut from the left only as far as its pair must fit model.encoder_seq_length "
    "(model.data.overflow)": ("max_prompt_length", "max_completion_length"),
    "there is always a reference policy: the initial weights": ("reference_free",),
}
TRL_UNSUPPORTED = {name: reason for reason, names in _WHY_NOT.items() for name in names}
