"""The GPU check: the paths a CPU machine cannot run, in one command of at most 8 minutes on one GPU.

    python bench/gpu_check.py [--out DIR] [--skip bench]

Run from the repository root where nemo-dpo's dependencies are installed (the
Dockerfile's NGC image has transformer-engine; `pip install -e ".[test,bench]"`).
On a lent machine that reaches no package registry, bench/gpu_wheels.sh
downloads beforehand, as wheels, what its image lacks, and says how to install
them there and run this.
Each check runs in its own process with its own time limit and prints one
summary line (PASS / FAIL / SKIP, seconds, what it measured); logs go to
``--out``. The CPU suite covers the same code paths wherever it can (gloo for
NCCL, the local layer spec for transformer-engine's, fp32 next to bf16, forced
background saves), and tests/test_gpu_check.py runs this script on CPU with the
checks a CPU can run (te_packed's comparison on the local spec, async_save); this
script is what only a GPU can tell:

- env          the GPU, torch, CUDA, transformer-engine and megatron-core versions
- nccl         a world of one on NCCL: all-reduce, broadcast, the store
- te_packed    transformer-engine's layer spec: packed (thd) rows give the unpacked rows' log-probs
- bf16_train   `torchrun` DPO in bf16 with fp32 master weights: finite, learning, tokens/s
- async_save   background checkpoint writes (the GPU default), then a resume that continues the run exactly
- unit_tests   the suite's unit layer (`pytest -m "not slow"`) on a machine with CUDA
- bench        bench/bench_dpo.py at a ~1B-parameter shape in bf16 against TRL, MFU against the measured bf16 peak
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train_dpo.py")
SMALL = ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=1024", "model.num_attention_heads=8",
         "model.num_query_groups=4", "model.global_batch_size=16", "model.micro_batch_size=4",
         "exp_manager.create_tensorboard_logger=false", "trainer.enable_progress_bar=false"]
# name: time limit in seconds (each check runs in a process of its own)
CHECKS = {"env": 30, "nccl": 60, "te_packed": 90, "bf16_train": 90, "async_save": 120, "unit_tests": 150, "bench": 240}


def _python(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _torchrun(log_dir, *overrides, timeout=90) -> subprocess.CompletedProcess:
    return _python("-m", "torch.distributed.run", "--nproc_per_node", "1", TRAIN, *SMALL, *overrides,
                   f"exp_manager.explicit_log_dir={log_dir}", timeout=timeout)


def _rows(log_dir, split="train") -> list:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["split"] == split]


def _needs_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("SKIP no CUDA device")


def check_env(out: str) -> str:
    import torch

    _needs_cuda()
    versions = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("megatron.core", "transformer_engine"):
        try:
            module = __import__(package, fromlist=["__version__"])
            versions[package] = getattr(module, "__version__", "?")
        except ImportError:
            versions[package] = "missing"
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def check_nccl(out: str) -> str:
    import torch
    import torch.distributed as dist

    _needs_cuda()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        value = torch.ones(1024, device="cuda")
        dist.all_reduce(value)
        payload = [{"ok": True}]
        dist.broadcast_object_list(payload, src=0)
        store = dist.distributed_c10d._get_default_store()
        store.set("gpu_check", "1")
        assert value.sum().item() == 1024 and payload[0]["ok"] and store.get("gpu_check") == b"1"
        return f"backend {dist.get_backend()}: all-reduce, broadcast and the store work"
    finally:
        dist.destroy_process_group()


def check_te_packed(out: str) -> str:
    """One process: the same pairs packed and unpacked through the TE layer spec give the same response sums."""
    from nemo_dpo.models.gpt import HAVE_TE

    if not HAVE_TE:
        raise SystemExit("SKIP transformer-engine is not installed: the local spec is the CPU suite's")
    return packed_matches_unpacked(out)


def packed_matches_unpacked(out: str) -> str:
    """The te_packed comparison with whatever layer spec this machine builds (transformer-engine's where it is
    installed, else the local one: the CPU suite runs it so), in a world of one."""
    import torch

    from nemo_dpo.config import load_config
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed
    from nemo_dpo.training.dpo_step import response_sums
    from nemo_dpo.training.trainer import DPOTrainer

    layout = init_distributed(1, 1, seed=1234)
    sums = {}
    try:
        for packing in (False, True):
            cfg = load_config("gpt_dpo", SMALL + [f"model.data.packing={str(packing).lower()}",
                                                 f"exp_manager.explicit_log_dir={out}/te_{packing}",
                                                 "exp_manager.resume_if_exists=false"])
            trainer = DPOTrainer(cfg, layout)
            microbatches = trainer.microbatcher(trainer.train_pairs[:16])
            with torch.no_grad():
                sums[packing] = torch.cat([response_sums(lp, mb) for lp, mb in
                                           zip(trainer.step_fn.log_probs(microbatches), microbatches)])
    finally:
        destroy_distributed()
    gap = (sums[True] - sums[False]).abs().max().item()
    if gap > 1e-3:
        raise AssertionError(f"packed and unpacked response log-prob sums differ by {gap:.2e}")
    return f"packed thd = unpacked within {gap:.1e} over {sums[True].numel()} sequences"


def check_bf16_train(out: str) -> str:
    log_dir = os.path.join(out, "bf16")
    done = _torchrun(log_dir, "trainer.precision=bf16", "trainer.dpo.max_steps=40", "trainer.dpo.val_check_interval=0")
    if done.returncode != 0:
        raise AssertionError(done.stdout[-2000:] + done.stderr[-2000:])
    rows = _rows(log_dir)
    first, last = rows[0], rows[-1]
    assert first["loss"] == first["loss"] and abs(first["loss"] - 0.6931) < 1e-3, first
    assert last["accuracy"] > first["accuracy"] or last["loss"] < first["loss"], (first, last)
    tokens = sum(r["tokens_per_sec"] for r in rows[5:]) / max(len(rows[5:]), 1)
    return f"40 steps: loss {first['loss']:.4f} -> {last['loss']:.4f}, accuracy {last['accuracy']:.2f}, {tokens:.0f} tokens/s"


def check_async_save(out: str) -> str:
    """10 steps saved in the background every 5; a second run resumes from the 5th step's checkpoint. Both runs
    have the same ``max_steps`` (the learning-rate schedule depends on it), so steps 6-10 must agree bitwise."""
    straight, resumed = os.path.join(out, "straight"), os.path.join(out, "resumed")
    common = ["trainer.dpo.max_steps=10", "trainer.dpo.save_interval=5", "checkpoint.async_save=true",
              "checkpoint.keep_last_k=0", "trainer.dpo.val_check_interval=0"]
    done = _torchrun(straight, *common)
    if done.returncode != 0:
        raise AssertionError(done.stdout[-2000:] + done.stderr[-2000:])
    shutil.copytree(os.path.join(straight, "checkpoints", "step_5"), os.path.join(resumed, "checkpoints", "step_5"))
    done = _torchrun(resumed, *common)
    if done.returncode != 0:
        raise AssertionError(done.stdout[-2000:] + done.stderr[-2000:])
    a, b = _rows(straight), _rows(resumed)
    assert [r["step"] for r in b] == list(range(6, 11)), [r["step"] for r in b]
    assert [r["loss"] for r in a[5:]] == [r["loss"] for r in b], "the resumed run differs from the straight one"
    return "saved in the background every 5 steps; resumed from step 5, steps 6-10 equal the straight run's, bitwise"


def check_unit_tests(out: str) -> str:
    done = _python("-m", "pytest", "-q", "-m", "not slow", "tests", "-x", "-p", "no:cacheprovider", "-n", "4",
                   timeout=140)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode != 0:
        raise AssertionError(done.stdout[-3000:])
    return summary


def check_bench(out: str) -> str:
    _needs_cuda()  # a ~1B-parameter model: hours on a CPU
    result = os.path.join(out, "bench.json")
    done = _python("bench/bench_dpo.py", "--shape", "llama-1b", "--dtype", "bf16", "--seq", "1024", "--pairs", "4",
                   "--steps", "3", "--warmup", "1", "--out", result, timeout=230)
    if done.returncode != 0:
        raise AssertionError(done.stdout[-3000:] + done.stderr[-3000:])
    with open(result) as f:
        report = json.load(f)
    ours, trl = report["results"]["nemo_dpo"], report["results"].get("trl")
    line = (f"{report['shape']['matmul_params'] / 1e9:.2f}B bf16, peak {report['matmul_peak_flops']['bf16'] / 1e12:.0f} "
            f"TFLOP/s: nemo-dpo {ours['tokens_per_s']:.0f} tokens/s, MFU {100 * ours['mfu']:.1f}%")
    if trl:
        line += (f"; TRL {trl['tokens_per_s']:.0f} tokens/s, MFU {100 * trl['mfu']:.1f}%; nemo-dpo / TRL "
                 f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s, "
                 f"{ours['peak_memory_mib'] / trl['peak_memory_mib']:.2f}x peak memory")
    return line


def run_one(name: str, out: str) -> int:
    """In the check's own process: one line on stdout, exit 0 (pass), 3 (skip) or 1 (fail)."""
    try:
        print(globals()[f"check_{name}"](out), flush=True)
        return 0
    except SystemExit as skip:
        print(str(skip), flush=True)
        return 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for logs and results (default: a new temporary one)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(CHECKS))
    parser.add_argument("--one", choices=sorted(CHECKS), help=argparse.SUPPRESS)  # run a single check in-process
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)
    if args.one:
        return run_one(args.one, out)
    failed = 0
    for name, limit in CHECKS.items():
        if name in args.skip:
            print(f"{name:12s} SKIP     0 s  (--skip)", flush=True)
            continue
        start = time.perf_counter()
        try:
            done = _python(__file__, "--one", name, "--out", out, timeout=limit)
            lines = (done.stdout.strip() or done.stderr.strip() or "no output").splitlines()
            status = {0: "PASS", 3: "SKIP"}.get(done.returncode, "FAIL")
            detail = lines[-1] if status != "SKIP" else lines[-1].removeprefix("SKIP ")
            with open(os.path.join(out, f"{name}.log"), "w") as f:
                f.write(done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            status, detail = "FAIL", f"over its {limit} s limit"
        failed += status == "FAIL"
        print(f"{name:12s} {status:4s} {time.perf_counter() - start:5.0f} s  {detail[:300]}", flush=True)
    print(f"logs in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
