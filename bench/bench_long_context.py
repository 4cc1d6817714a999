"""Long sequences with context parallelism: per-rank peak memory and tokens/s at CP=1 and CP=2.

    python bench/bench_long_context.py                             # 4k, 8k, 16k tokens per sequence, CP=1 and CP=2
    python bench/bench_long_context.py --seq 8192 --cp 1 2 --steps 1
    python bench/bench_long_context.py --shape tiny --seq 64 128 --steps 1 --warmup 0   # smoke run

Each (sequence length, CP) is a fresh ``torchrun`` job of CP processes (gloo) on
this machine's cores: CP=1 is one process with every thread, CP=2 two processes
with half the threads each, so both use the same cores. The workload is DPO on
a Llama-style model with random weights (RoPE, grouped-query attention, RMSNorm,
SwiGLU, untied output layer; written as a Hugging Face folder, with the
word-level tokenizer of bench_dpo.py so every sequence has exactly the planned
length), one pair per step whose two sequences are both ``--seq`` tokens, the
reference online and the log-probs chunked (the defaults).

Reported per job: tokens/s over the timed steps (both sequences of each pair,
every token real) and each rank's peak resident memory, the kernel's high-water
mark of the process (``getrusage``: everything the rank held at its worst
moment, the Python runtime and the libraries included). ``--out`` gets the
numbers as JSON and ``--plot`` a PNG of both against the sequence length.

Memory is what glibc's allocator keeps resident, and its default depends on
tensor sizes: blocks above a sliding threshold (at most 32 MiB) are mapped and
returned when freed, smaller ones stay in the heap, where freed activations
linger. At 8k tokens CP=1's activations are 32 MiB tensors and CP=2's 16 MiB
ones, so the default would compare two allocation regimes, not two layouts.
Every job therefore runs with one fixed threshold (``--mmap-threshold``, glibc's
``MALLOC_MMAP_THRESHOLD_``; 0 keeps glibc's default). It costs speed: mapped
blocks are faulted in afresh on every step.

A step is minutes long at these lengths on a CPU, so by default one step is
timed with no warm-up (its one-time costs, the optimizer's state, are small).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import psutil
import torch

from bench_dpo import workload_overrides, write_workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # Llama style, untied output layer
    "llama-40m": {"layers": 6, "hidden": 512, "heads": 8, "kv_heads": 4, "ffn": 1376, "vocab": 8192},
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 176, "vocab": 512},
}


def worker(spec_path: str) -> int:
    """One rank of a job: DPO steps on the workload; writes its step times and peak memory."""
    from nemo_dpo.config import load_config, prepare
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed
    from nemo_dpo.training.trainer import DPOTrainer

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    total = spec["warmup"] + spec["steps"]
    overrides = [*workload_overrides(spec, 1), f"model.context_parallel_size={spec['cp']}",
                 "exp_manager.create_tensorboard_logger=false"]
    cfg = load_config("gpt_dpo", overrides)
    prepare(cfg, spec["cp"])
    layout = init_distributed(1, 1, cfg.model.seed, cp=spec["cp"])
    try:
        trainer = DPOTrainer(cfg, layout)
        setup_rss = psutil.Process().memory_info().rss
        steps = [trainer.train_step([step])["time_step"] for step in range(total)]
    finally:
        destroy_distributed()
    result = {"step_s": steps, "setup_rss_bytes": setup_rss,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(os.path.join(spec["out_dir"], f"rank{layout.rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


def run_job(seq: int, cp: int, args, folder: str) -> dict:
    """One torchrun job of ``cp`` ranks at ``seq`` tokens per sequence; its tokens/s and each rank's peak memory."""
    shape = SHAPES[args.shape]
    job = os.path.join(folder, f"seq{seq}_cp{cp}")
    os.makedirs(job)
    plan = SimpleNamespace(seq=seq, data="full", min_len=seq, pairs=1, warmup=args.warmup, steps=args.steps,
                           seed=args.seed)
    work = write_workload(job, shape, plan)  # the Hugging Face model folder, the tokenizer and the pairs
    threads = max(args.threads // cp, 1)
    spec = {"model_dir": work["model_dir"], "data": work["data"], "seq": seq, "cp": cp, "warmup": args.warmup,
            "steps": args.steps, "threads": threads, "log_dir": os.path.join(job, "run"), "out_dir": job}
    spec_path = os.path.join(job, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    if args.mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cp),
               os.path.abspath(__file__), "--worker", spec_path]
    log_path = os.path.join(job, "job.log")
    with open(log_path, "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=job).returncode
    if status != 0:
        with open(log_path) as f:
            raise RuntimeError(f"seq {seq}, CP={cp}: the job failed (exit {status}):\n{f.read()[-4000:]}")
    ranks = []
    for rank in range(cp):
        with open(os.path.join(job, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    timed = ranks[0]["step_s"][args.warmup :]
    return {
        "seq": seq,
        "cp": cp,
        "threads_per_rank": threads,
        "tokens_per_s": 2 * seq * len(timed) / sum(timed),
        "step_s": sum(timed) / len(timed),
        "peak_rss_mib_per_rank": [r["peak_rss_bytes"] / 2**20 for r in ranks],
        "setup_rss_mib_per_rank": [r["setup_rss_bytes"] / 2**20 for r in ranks],
        "steps_s": [r["step_s"] for r in ranks],
    }


def table(rows: list) -> str:
    """A Markdown table: per sequence length, each CP's peak memory (its largest rank) and tokens/s, and the
    memory of each CP > 1 as a fraction of CP=1's."""
    by = {(r["seq"], r["cp"]): r for r in rows}
    cps = sorted({r["cp"] for r in rows})
    header = ["tokens per sequence"] + [f"CP={cp} peak MiB per rank" for cp in cps]
    header += [f"CP={cp} / CP=1" for cp in cps if cp > 1] + [f"CP={cp} tokens/s" for cp in cps]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for seq in sorted({r["seq"] for r in rows}):
        peak = {cp: max(by[seq, cp]["peak_rss_mib_per_rank"]) for cp in cps if (seq, cp) in by}
        cells = [f"{seq:,}"] + [f"{peak[cp]:,.0f}" if cp in peak else "-" for cp in cps]
        cells += [f"{peak[cp] / peak[1]:.2f}x" if cp in peak and 1 in peak else "-" for cp in cps if cp > 1]
        cells += [f"{by[seq, cp]['tokens_per_s']:,.0f}" if (seq, cp) in by else "-" for cp in cps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for cp in sorted({r["cp"] for r in rows}):
        mine = sorted((r for r in rows if r["cp"] == cp), key=lambda r: r["seq"])
        seqs = [r["seq"] for r in mine]
        memory.plot(seqs, [max(r["peak_rss_mib_per_rank"]) for r in mine], marker="o", label=f"CP={cp}")
        speed.plot(seqs, [r["tokens_per_s"] for r in mine], marker="o", label=f"CP={cp}")
    for axes, label in ((memory, "peak resident memory per rank (MiB)"), (speed, "tokens/s")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("tokens per sequence")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle("DPO, one pair per step, CP ranks sharing this machine's cores")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-40m")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384], help="tokens per sequence")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="context-parallel sizes (processes)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first")
    parser.add_argument("--mmap-threshold", type=int, default=2**20,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for every rank, in bytes; 0 = glibc's default")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of all ranks together")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="bench_long_context.json")
    parser.add_argument("--plot", default="bench_long_context.png")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    for seq in args.seq:
        for cp in args.cp:
            if seq % (2 * cp):
                parser.error(f"--seq {seq} is not divisible by 2 x CP = {2 * cp}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # writing each model folder
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seq in args.seq:
            for cp in args.cp:
                rows.append(run_job(seq, cp, args, folder))
                row = rows[-1]
                print(f"seq {seq:>6,} CP={cp}: {row['tokens_per_s']:8,.0f} tokens/s, {row['step_s']:7.1f} s/step, "
                      f"peak memory per rank " + ", ".join(f"{m:,.0f} MiB" for m in row["peak_rss_mib_per_rank"]),
                      flush=True)
    shape = SHAPES[args.shape]
    print(f"{args.shape}: {shape['layers']} layers x hidden {shape['hidden']}, {shape['heads']} heads "
          f"({shape['kv_heads']} KV groups), vocab {shape['vocab']}; 1 pair per step, {args.steps} timed steps after "
          f"{args.warmup} warm-up; {args.threads} threads in all, fp32 on CPU; MALLOC_MMAP_THRESHOLD_="
          f"{args.mmap_threshold or 'glibc default'}")
    print(table(rows))
    with open(args.out, "w") as f:
        json.dump({"shape": {"name": args.shape, **shape}, "threads": args.threads, "steps": args.steps,
                   "warmup": args.warmup, "mmap_threshold": args.mmap_threshold, "results": rows}, f, indent=1)
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
