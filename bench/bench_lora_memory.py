"""Peak memory of LoRA DPO against full-parameter DPO on the same model.

    python bench/bench_lora_memory.py [--steps 5] [key=value ...]

Runs ``examples/train_dpo.py`` twice in fresh single processes (full fine-tuning,
then ``--config-name gpt_dpo_lora``) with the same model and data, samples each
process's resident memory every 20 ms, and reports the peaks next to the size of
one copy of the weights. Full DPO holds weights, fp32 gradients, two Adam moments
and the host copy of the reference (plus the stash it swaps through); LoRA holds
the weights and small adapters, and its reference costs nothing.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

from peak_memory import run_sampling_rss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = [  # 8 layers x hidden 512: about 25M parameters, 100 MB in fp32
    "model.num_layers=8",
    "model.hidden_size=512",
    "model.ffn_hidden_size=1408",
    "model.num_attention_heads=8",
]


def peak_rss(args: list) -> tuple:
    """(peak resident bytes, output) of a child process."""
    with tempfile.TemporaryFile("w+") as out:
        status, peak = run_sampling_rss(args, interval=0.02, stdout=out, stderr=subprocess.STDOUT, text=True)
        out.seek(0)
        output = out.read()
    if status != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{output[-3000:]}")
    return peak, output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    common = SHAPE + [f"trainer.dpo.max_steps={args.steps}", "trainer.dpo.val_check_interval=0",
                      "trainer.dpo.limit_val_batches=1", "trainer.dpo.save_interval=0", *args.overrides]
    results, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("full", "gpt_dpo"), ("lora", "gpt_dpo_lora")):
            cmd = [sys.executable, os.path.join(ROOT, "examples", "train_dpo.py"), "--config-name", config, *common,
                   f"exp_manager.explicit_log_dir={tmp}/{name}"]
            results[name], out = peak_rss(cmd)
            counts[name] = re.search(r"model: ([\d,]+) parameters on rank 0 \(([\d,]+) trainable\)", out).groups()
    n_params = int(counts["full"][0].replace(",", ""))
    weights = 4 * n_params
    saved = results["full"] - results["lora"]
    print(f"model: {n_params / 1e6:.1f}M parameters, one fp32 copy = {weights / 2**20:.0f} MiB; "
          f"LoRA trains {counts['lora'][1]} of them")
    print(f"peak RSS  full DPO: {results['full'] / 2**20:.0f} MiB   LoRA DPO: {results['lora'] / 2**20:.0f} MiB")
    print(f"LoRA saves {saved / 2**20:.0f} MiB = {saved / weights:.1f} copies of the weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
