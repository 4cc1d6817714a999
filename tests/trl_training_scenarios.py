"""Training steps of nemo-dpo and of TRL's trainers on one workload, one process per framework.

    python tests/trl_training_scenarios.py {nemo_dpo|trl} <workload dir> <result.json>

The workload (``write_workload``) is a tiny Hugging Face Llama with random
weights, a word-level tokenizer (``w<id>`` is token ``id``; no BOS, so TRL's CPO
and ORPO trainers add none) and preference pairs. Both frameworks load the same
folder and take the same pairs in the same order, one batch of ``PAIRS`` pairs
per step, with the same AdamW (no weight decay, no clipping, constant learning
rate) in fp32, for each loss of ``LOSSES``: TRL's DPOTrainer with its
``loss_type``, or its CPO (SimPO) and ORPO trainers. Each records, per step, the
loss and the mean chosen and rejected rewards its loss computed before the update.

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
}


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


def run_nemo_dpo(folder: str) -> dict:
    from nemo_dpo.config import load_config, prepare
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed
    from nemo_dpo.training.trainer import DPOTrainer

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 1000))
    data = os.path.join(folder, "pairs.jsonl")
    results = {}
    layout = init_distributed(1, 1, seed=1234)
    try:
        for name, (overrides, _, _) in LOSSES.items():
            cfg = load_config("gpt_dpo", [
                f"model.restore_from_path={folder}", f"model.data.data_prefix.train={data}",
                f"model.data.data_prefix.validation={data}", f"model.encoder_seq_length={SEQ}",
                f"model.micro_batch_size={PAIRS}", f"model.global_batch_size={PAIRS}", "trainer.precision=fp32",
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
                metrics = trainer.train_step(list(range(step * PAIRS, (step + 1) * PAIRS)))
                rows.append({key: metrics[key] for key in ("loss", "rewards_chosen_mean", "rewards_rejected_mean")})
            results[name] = rows
    finally:
        destroy_distributed()
    return results


def run_trl(folder: str) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    kinds = {"dpo": (DPOTrainer, DPOConfig, "_metrics"), "cpo": (CPOTrainer, CPOConfig, "_stored_metrics"),
             "orpo": (ORPOTrainer, ORPOConfig, "_stored_metrics")}
    with open(os.path.join(folder, "pairs.jsonl")) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    results = {}
    for name, (_, kind, options) in LOSSES.items():
        base, config, store = kinds[kind]
        rows, shift = [], {"delta": 0.0, "steps": 0}  # BCO's running mean (bco_pair only)

        class Recorded(base):
            """TRL's trainer taking the pairs in order and recording each step's loss and mean rewards."""

            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                logged = getattr(self, store)["train"]
                chosen, rejected = logged["rewards/chosen"][-1], logged["rewards/rejected"][-1]
                if name == "bco_pair":  # TRL's rewards are beta u - delta here; the step's rewards are beta u
                    chosen, rejected = chosen + shift["delta"], rejected + shift["delta"]
                    shift["steps"] += 1
                    shift["delta"] += ((chosen + rejected) / 2 - shift["delta"]) / shift["steps"]
                rows.append({"loss": loss.item(), "rewards_chosen_mean": chosen, "rewards_rejected_mean": rejected})
                return loss

        args = config(output_dir=os.path.join(folder, f"trl_{name}"), per_device_train_batch_size=PAIRS,
                      gradient_accumulation_steps=1, max_length=SEQ, max_steps=STEPS, learning_rate=LR,
                      lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                      adam_epsilon=EPS, max_grad_norm=0.0, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                      seed=1234, **({"beta": BETA} | options))
        if kind == "dpo":
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
