"""nemo-dpo against TRL as the model and the sequences grow: tokens/s and peak memory per (shape, length).

    pip install -e ".[bench]"
    python bench/bench_scaling.py                     # llama-33m and llama-125m, sequences of 512 and 2048
    python bench/bench_scaling.py --shapes tiny --seqs 64 128 --steps 1 --warmup 0   # smoke run

Each cell is one ``bench/bench_dpo.py`` run (the same workload through both
frameworks, each in a fresh process, shipped defaults only), so each ratio comes
from one run. Every sequence is the cell's full length. The pairs per step shrink
as the cell grows (``pairs_per_step``: 4,096 tokens per step for the 33M model,
2,048 for larger ones, and at least one pair), so that a cell takes minutes on a
CPU; both frameworks get the same pairs, in one microbatch each.

Writes ``--out`` (JSON, every bench_dpo.py report), a Markdown table on the
console and ``--plot`` (PNG: tokens/s and peak memory per cell, both frameworks).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FRAMEWORKS = ("nemo_dpo", "trl")


def pairs_per_step(shape: str, seq: int) -> int:
    """About 4,096 tokens of pairs per step for the 33M model, half that for larger ones; at least one pair."""
    tokens = 4096 if shape in ("llama-33m", "tiny") else 2048
    return max(1, tokens // (2 * seq))


def run_cell(shape: str, seq: int, args, folder: str) -> dict:
    out = os.path.join(folder, f"{shape}_{seq}.json")
    cmd = [sys.executable, os.path.join(HERE, "bench_dpo.py"), "--shape", shape, "--seq", str(seq),
           "--pairs", str(pairs_per_step(shape, seq)), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--out", out]
    print(" ".join(cmd[1:]), flush=True)
    ran = subprocess.run(cmd, capture_output=True, text=True)
    if ran.returncode != 0:
        raise SystemExit(f"bench_dpo.py failed for {shape} at {seq} tokens:\n{ran.stdout[-3000:]}{ran.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def table(reports: list) -> str:
    lines = ["| model | sequence | pairs/step | tokens/s nemo-dpo | tokens/s TRL | ratio | peak MiB nemo-dpo "
             "| peak MiB TRL | ratio | MFU nemo-dpo | MFU TRL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        ours, trl = (report["results"][name] for name in FRAMEWORKS)
        shape = report["shape"]
        lines.append(
            f"| {shape['name']} ({(shape['matmul_params'] + shape['vocab'] * shape['hidden']) / 1e6:.0f}M) "
            f"| {report['workload']['seq']} | {report['workload']['pairs']} "
            f"| {ours['tokens_per_s']:,.0f} | {trl['tokens_per_s']:,.0f} | {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x "
            f"| {ours['peak_memory_mib']:,.0f} | {trl['peak_memory_mib']:,.0f} "
            f"| {ours['peak_memory_mib'] / trl['peak_memory_mib']:.2f}x | {ours['mfu']:.1%} | {trl['mfu']:.1%} |")
    return "\n".join(lines)


def plot(reports: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']['name']}\n{r['workload']['seq']} tokens" for r in reports]
    x = range(len(reports))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "tokens_per_s", "real tokens/s (higher is better)"),
                           (axes[1], "peak_memory_mib", "peak memory, MiB (lower is better)")):
        for i, name in enumerate(FRAMEWORKS):
            values = [r["results"][name][key] for r in reports]
            bars = ax.bar([p + (i - 0.5) * 0.4 for p in x], values, width=0.4, label=name.replace("_", "-"))
            ax.bar_label(bars, fmt="{:,.0f}", fontsize=7)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_title(title)
        ax.legend()
    first = reports[0]
    fig.suptitle(f"DPO, nemo-dpo vs TRL: {first['dtype']} on {first['device']}, {first['threads']} threads, "
                 f"shipped defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-33m", "llama-125m"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per framework and cell")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench_scaling.json")
    parser.add_argument("--plot", default="bench_scaling.png")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory() as folder:
        reports = [run_cell(shape, seq, args, folder) for shape in args.shapes for seq in args.seqs]
    with open(args.out, "w") as f:
        json.dump(reports, f, indent=1)
    print(table(reports))
    plot(reports, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
