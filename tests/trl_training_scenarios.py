"""Training steps of nemo-dpo and of TRL's trainers on one workload, one process per framework.

    python tests/trl_training_scenarios.py {nemo_dpo|trl} <workload dir> <result.json>

The workload (``write_workload``) is a tiny Hugging Face Llama with random
weights, a word-level tokenizer (``w<id>`` is token ``id``; no BOS, so TRL's CPO
and ORPO trainers add none), preference pairs and unpaired examples (KTO's). Both
frameworks load the same folder and take the same pairs in the same order, one
batch of ``PAIRS`` pairs (KTO: ``EXAMPLES`` examples) per step, with the same AdamW
(no weight decay, no clipping, constant learning rate) in fp32, for each loss of
``LOSSES``: TRL's DPOTrainer with its ``loss_type``, its CPO (SimPO) and ORPO
trainers, or its KTOTrainer. Each records, per step, the loss and the mean chosen
and rejected rewards its loss computed before the update (KTO: desirable and
undesirable, and the KL estimate).

BCO's running mean is not in TRL 1.16: its DPOTrainer's bco_pair gets the
reference's summed log-probs moved by delta / beta (the same loss,
-log sigmoid(beta u_c - delta) - log sigmoid(-(beta u_r - delta))), with delta the
running mean of the steps' mean reward before it, as the BCO paper defines it.
"""

import json
import os
import random
import sys

import torch

SPECIAL = ["<pad>", "</s>"]  # ids 0 and 1; words are w2 ... w<VOCAB-1>
VOCAB, PAIRS, STEPS, SEQ = 256, 4, 4, 64
EXAMPLES = 8  # KTO's batch: one chunk of TRL's KL completions (per_device_train_batch_size, our micro_batch_size)
LR, EPS, BETA = 1e-3, 1e-4, 0.1  # Adam's eps above gradient noise, so that rounding cannot flip an update's sign
# name -> (nemo-dpo overrides, TRL trainer, TRL arguments)
LOSSES = {
    "sigmoid": (["model.dpo.preference_loss=sigmoid"], "dpo", {"loss_type": ["sigmoid"]}),
    "hinge": (["model.dpo.preference_loss=hinge"], "dpo", {"loss_type": ["hinge"]}),
    "robust": (["model.dpo.preference_loss=robust", "model.dpo.label_smoothing=0.1"], "dpo",
               {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "apo_zero": (["model.dpo.preference_loss=apo_zero"], "dpo", {"loss_type": ["apo_zero"]}),
    "bco_pair": (["model.dpo.preference_loss=bco_pair"], "dpo", {"loss_type": ["bco_pair"]}),
    "simpo": (["model.dpo.preference_loss=simpo", "model.dpo.ref_policy_kl_penalty=2.0", "model.dpo.simpo_gamma=0.5"],
              "cpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5, "beta": 2.0}),
    "orpo": (["model.dpo.preference_loss=orpo"], "orpo", {}),
    "kto": (["model.dpo.preference_loss=kto", "model.dpo.desirable_weight=1.33", "model.dpo.undesirable_weight=0.8"],
            "kto", {"desirable_weight": 1.33, "undesirable_weight": 0.8}),
    # KTO on the pairs: both frameworks unpair them (all chosen, then all rejected), so a batch may hold one side
    "kto_paired": (["model.dpo.preference_loss=kto"], "kto", {}),
}
KEYS = ("loss", "rewards_chosen_mean", "rewards_rejected_mean", "kl")  # what a step records (kl: KTO only)


def write_workload(folder: str, seed: int = 1234) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(len(SPECIAL), VOCAB)}" for _ in range(n))  # noqa: E731
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        for _ in range(PAIRS * STEPS):
            prompt = words(rng.randint(2, 8))  # responses start with a space; both frameworks append EOS
            record = {"prompt": prompt, "chosen": " " + words(rng.randint(1, 12)), "rejected": " " + words(rng.randint(1, 12))}
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(folder, "unpaired.jsonl"), "w") as f:
        for step in range(STEPS):
            labels = [True, False] + [rng.random() < 0.5 for _ in range(EXAMPLES - 2)]  # both sides in every batch
            rng.shuffle(labels)
            for label in labels:
                record = {"prompt": words(rng.randint(2, 8)), "completion": " " + words(rng.randint(1, 12)),
                          "label": label}
                f.write(json.dumps(record) + "\n")


def data_file(folder: str, name: str) -> str:
    """The workload's data for a loss: unpaired examples for KTO, pairs for the others (and kto_paired)."""
    return os.path.join(folder, "unpaired.jsonl" if name == "kto" else "pairs.jsonl")


def batch_size(name: str) -> int:
    return EXAMPLES if name.startswith("kto") else PAIRS


def run_nemo_dpo(folder: str) -> dict:
    from nemo_dpo.config import load_config, prepare
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed
    from nemo_dpo.training.trainer import DPOTrainer

    results = {}
    layout = init_distributed(1, 1, seed=1234)
    try:
        for name, (overrides, _, _) in LOSSES.items():
            data, size = data_file(folder, name), batch_size(name)
            cfg = load_config("gpt_dpo", [
                f"model.restore_from_path={folder}", f"model.data.data_prefix.train={data}",
                f"model.data.data_prefix.validation={data}", f"model.encoder_seq_length={SEQ}",
                f"model.micro_batch_size={size}", f"model.global_batch_size={size}", "trainer.precision=fp32",
                f"trainer.dpo.max_steps={STEPS}", "trainer.gradient_clip_val=0", f"model.optim.lr={LR}",
                "model.optim.weight_decay=0", "model.optim.betas=[0.9,0.999]", f"model.optim.eps={EPS}",
                "model.optim.sched.warmup_steps=0", f"model.optim.sched.min_lr={LR}",
                f"model.dpo.ref_policy_kl_penalty={BETA}", f"exp_manager.explicit_log_dir={folder}/nemo_{name}",
                "exp_manager.resume_if_exists=false", "exp_manager.create_tensorboard_logger=false", *overrides,
            ])
            prepare(cfg, 1)
            trainer = DPOTrainer(cfg, layout)
            rows = []
            for step in range(STEPS):
                metrics = trainer.train_step(list(range(step * size, (step + 1) * size)))
                rows.append({key: metrics[key] for key in KEYS if key in metrics})
            results[name] = rows
    finally:
        destroy_distributed()
    return results


def run_trl(folder: str) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    kinds = {"dpo": (DPOTrainer, DPOConfig, "_metrics"), "cpo": (CPOTrainer, CPOConfig, "_stored_metrics"),
             "orpo": (ORPOTrainer, ORPOConfig, "_stored_metrics"), "kto": (KTOTrainer, KTOConfig, "_metrics")}
    results = {}
    for name, (_, kind, options) in LOSSES.items():
        base, config, store = kinds[kind]
        with open(data_file(folder, name)) as f:
            dataset = Dataset.from_list([json.loads(line) for line in f])
        rows, shift = [], {"delta": 0.0, "steps": 0}  # BCO's running mean (bco_pair only)

        class Recorded(base):
            """TRL's trainer taking the pairs in order and recording each step's loss and mean rewards."""

            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                logged = getattr(self, store)["train"]
                before = {key: len(values) for key, values in logged.items()}
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                # What this step logged (KTO leaves out the rewards of a side its batch lacks)
                new = {key: values[-1] for key, values in logged.items() if len(values) > before.get(key, 0)}
                row = {"loss": loss.item()}
                for ours, theirs in (("rewards_chosen_mean", "rewards/chosen"),
                                     ("rewards_rejected_mean", "rewards/rejected"), ("kl", "kl")):
                    if theirs in new:
                        row[ours] = new[theirs]
                if name == "bco_pair":  # TRL's rewards are beta u - delta here; the step's rewards are beta u
                    row["rewards_chosen_mean"] += shift["delta"]
                    row["rewards_rejected_mean"] += shift["delta"]
                    shift["steps"] += 1
                    batch_mean = (row["rewards_chosen_mean"] + row["rewards_rejected_mean"]) / 2
                    shift["delta"] += (batch_mean - shift["delta"]) / shift["steps"]
                rows.append(row)
                return loss

        args = config(output_dir=os.path.join(folder, f"trl_{name}"), per_device_train_batch_size=batch_size(name),
                      gradient_accumulation_steps=1, max_length=SEQ, max_steps=STEPS, learning_rate=LR,
                      lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                      adam_epsilon=EPS, max_grad_norm=0.0, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                      seed=1234, **({"beta": BETA} | options))
        if kind in ("dpo", "kto"):
            args.gradient_checkpointing = False
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer = Recorded(model=model, args=args, train_dataset=dataset,
                           processing_class=AutoTokenizer.from_pretrained(folder))
        if name == "bco_pair":
            reference_forward = trainer.ref_model.forward

            def shifted(*inputs, labels=None, **kwargs):
                """The reference's log-probs with delta / beta added at each sequence's first completion token."""
                out = reference_forward(*inputs, labels=labels, **kwargs)
                first = (labels[:, 1:] != -100).int().argmax(1)
                out.log_probs[torch.arange(first.shape[0]), first] += shift["delta"] / BETA
                return out

            trainer.ref_model.forward = shifted
        trainer.train()
        results[name] = rows
    return results


if __name__ == "__main__":
    framework, folder, out = sys.argv[1:]
    torch.set_num_threads(1)
    result = (run_nemo_dpo if framework == "nemo_dpo" else run_trl)(folder)
    with open(out, "w") as f:
        json.dump(result, f)
