"""Per-process work for the precomputed-reference tests (imported by the spawned processes)."""

import os
from types import SimpleNamespace

from nemo_dpo.config import load_config
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.training.reference import PrecomputedReference
from nemo_dpo.training.reference_cache import FILE, compute_table
from nemo_dpo.training.trainer import DPOTrainer
from parallel_scenarios import SMALL


def three_steps(trainer) -> dict:
    gbs = trainer.cfg.model.global_batch_size
    losses = []
    for step in range(3):
        losses.append(trainer.train_step(list(range(step * gbs, (step + 1) * gbs))))
    return {"train": losses, "val": trainer.validate()}


def validation_forward_passes(trainer) -> list:
    """Sequences put through forward-only passes (the reference's) by each of two validations."""
    seen, log_probs = [0], trainer.step_fn.log_probs

    def counting(microbatches):
        seen[0] += sum(mb.num_sequences for mb in microbatches)
        return log_probs(microbatches)

    trainer.step_fn.log_probs = counting
    trainer.reference.log_probs = counting
    counts = []
    for _ in range(2):
        seen[0] = 0
        trainer.validate()
        counts.append(seen[0])
    return counts


def ld_table_vs_online(trainer) -> float:
    """Largest difference between LD-DPO's reference values (sums and shared-length sums) looked up in a table of
    two global batches and computed by the online pass."""
    values, gbs = trainer.loss.reference_values, trainer.cfg.model.global_batch_size
    table = compute_table(trainer.train_pairs[: 2 * gbs], trainer.reference.runs_as_reference, trainer.step_fn.log_probs,
                          trainer.microbatcher, trainer.layout, gbs, SimpleNamespace(advance=lambda n: None), values)
    precomputed = PrecomputedReference({"train": table}, trainer.microbatcher, values)
    worst = 0.0
    for start in (0, gbs):
        indices = list(range(start, start + gbs))
        online, looked_up = (trainer.microbatcher([trainer.train_pairs[i] for i in indices]) for _ in range(2))
        trainer.reference.attach(online, "train", indices)
        precomputed.attach(looked_up, "train", indices)
        for a, b in zip(online, looked_up):
            assert set(a.reference) == set(b.reference) == set(values)
            worst = max(worst, *(float((a.reference[v] - b.reference[v]).abs().max()) for v in values))
    return worst


def online_then_precomputed(root: str, cache: str) -> dict:
    layout = init_distributed(1, 1, seed=1234)
    try:
        def trainer(mode, log, *extra):
            overrides = SMALL + [f"model.dpo.reference_logprobs={mode}", f"model.tokenizer.cache_dir={cache}",
                                 f"exp_manager.explicit_log_dir={root}/{log}", "trainer.dpo.limit_val_batches=4", *extra]
            return DPOTrainer(load_config("gpt_dpo", overrides), layout)

        online = trainer("online", "online")
        results = {"validation_passes": validation_forward_passes(online), "online": three_steps(online)}
        results["precomputed"] = three_steps(trainer("precomputed", "pre"))
        stamp = os.stat(f"{root}/pre/{FILE}").st_mtime_ns
        results["reused"] = three_steps(trainer("precomputed", "pre"))
        results["cache_untouched"] = os.stat(f"{root}/pre/{FILE}").st_mtime_ns == stamp
        try:
            trainer("precomputed", "pre", "model.seed=99")  # other initial weights
        except ValueError as err:
            results["refused"] = str(err)
        try:
            trainer("precomputed", "pre", "model.dpo.ld_alpha=0.5")  # LD-DPO needs more values than the table holds
        except ValueError as err:
            results["refused_values"] = str(err)
        results["ld_table_vs_online"] = ld_table_vs_online(trainer("online", "ld", "model.dpo.ld_alpha=0.5"))
        return results
    finally:
        destroy_distributed()
