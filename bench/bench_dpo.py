"""DPO training speed, memory and MFU: nemo-dpo against Hugging Face TRL's DPOTrainer.

    pip install -e ".[bench]"
    python bench/bench_dpo.py                                   # llama-33m, seq 512, 4 pairs/step
    python bench/bench_dpo.py --data spread                     # lengths 32..512: packed (model.data.packing=auto)
    python bench/bench_dpo.py --shape tiny --steps 1 --frameworks nemo_dpo   # smoke run

One run builds the workload once and feeds it to both frameworks, each in a fresh
process on the same device and thread count:
- a Llama-style model with random weights saved as a Hugging Face folder (nemo-dpo
  loads it with ``model.restore_from_path``, TRL with ``from_pretrained``);
- a word-level tokenizer (``w<id>`` is token ``id``), so that text maps to exactly the
  planned token ids in both;
- pairs whose prompt + response lengths are all ``--seq`` (``full``) or uniform in
  ``[--min-len, --seq]`` (``spread``), the same batches in the same order;
- the same dtype: bf16 means bf16 matmuls in both (nemo-dpo: bf16 weights with fp32
  master weights; TRL: bf16 autocast over fp32 weights), with the reference online.

Reported per framework: real (non-pad) tokens/s and pairs/s over the timed steps,
the time split (reference forward, policy forward+backward, optimizer), peak memory
(resident set of the process on CPU, ``max_memory_allocated`` on GPU) and MFU:

    model FLOPs per step = sum over the batch's sequences of
        8 N L  +  16 n_layers d_attn L^2
    policy: 6 N per token (forward + backward) plus 12 n_layers d_attn L per token of attention;
    reference: 2 N per token plus 4 n_layers d_attn L per token; N = parameters used in
    matmuls (all linear layers and the output layer, not the embedding lookup), L = the
    sequence's real length, d_attn = heads x head dim, attention counted without the
    causal halving (as in PaLM's MFU). Padding is never counted.
    MFU = model FLOPs per second / peak, with the peak measured here by timing a large
    matmul in the run's dtype on the same threads, before the runs and again after them
    (the higher of the two: a slow moment of a shared machine would inflate MFU).

The console gets a table with the ratios nemo-dpo / TRL (above 1 is better for tokens/s and
MFU, below 1 for times and memory); ``--out`` gets everything as JSON. ``--ours key=value ...`` adds nemo-dpo
config overrides (``model.data.packing=false`` to pad, chunked log-probs, recomputation).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

from memory_inventory import Inventory, SavedForBackward
from peak_memory import run_sampling_rss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # Llama style: RMSNorm, SwiGLU, RoPE, untied output layer
    "llama-33m": {"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "ffn": 1376, "vocab": 8192},
    "llama-125m": {"layers": 12, "hidden": 768, "heads": 12, "kv_heads": 12, "ffn": 1664, "vocab": 32000},
    "llama-1b": {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "ffn": 5632, "vocab": 32000},  # GPU check
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 176, "vocab": 512},
}
SPECIAL = ["<pad>", "</s>", "<s>"]  # ids 0, 1, 2; words are w3 ... w<vocab-1>
FRAMEWORKS = ("nemo_dpo", "trl")
LR = 1e-6


# ---------------------------------------------------------------- the workload


def write_workload(folder: str, shape: dict, args) -> dict:
    """Model + tokenizer folder and the data file; returns the planned sequence lengths per step."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), shape["vocab"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    model_dir = os.path.join(folder, "model")
    hf_tok.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=args.seq, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(model_dir)

    rng = random.Random(args.seed)
    words = lambda n: " ".join(f"w{rng.randrange(len(SPECIAL), shape['vocab'])}" for _ in range(n))  # noqa: E731
    steps, lengths = [], []
    data_path = os.path.join(folder, "pairs.jsonl")
    with open(data_path, "w") as f:
        for _ in range((args.warmup + args.steps) * args.pairs):
            if args.data == "full":
                chosen_len = rejected_len = args.seq
                prompt_len = args.seq // 4
            else:
                chosen_len, rejected_len = rng.randint(args.min_len, args.seq), rng.randint(args.min_len, args.seq)
                prompt_len = rng.randint(1, min(chosen_len, rejected_len) // 2)
            # Responses end with EOS, which both frameworks append themselves.
            record = {
                "prompt": words(prompt_len),
                "chosen": " " + words(chosen_len - prompt_len - 1),
                "rejected": " " + words(rejected_len - prompt_len - 1),
            }
            f.write(json.dumps(record) + "\n")
            lengths += [chosen_len, rejected_len]
    for step in range(args.warmup + args.steps):
        steps.append(lengths[step * 2 * args.pairs : (step + 1) * 2 * args.pairs])
    return {"model_dir": model_dir, "data": data_path, "lengths": steps}


def matmul_params(shape: dict) -> int:
    """N: parameters that take part in a matmul for every token (linear layers and the output layer)."""
    h, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    attention = h * head_dim * (shape["heads"] * 2 + shape["kv_heads"] * 2)  # q, o and k, v
    mlp = 3 * h * shape["ffn"]  # SwiGLU: gate, up, down
    return shape["layers"] * (attention + mlp) + shape["vocab"] * h


def model_flops(shape: dict, lengths: list) -> float:
    """Useful FLOPs of one DPO step (policy forward+backward and reference forward) over real tokens."""
    n = matmul_params(shape)
    attention = 16 * shape["layers"] * shape["hidden"]
    return sum(8 * n * length + attention * length**2 for length in lengths)


def matmul_peak(dtype: torch.dtype, device: str, largest: int) -> float:
    """FLOP/s of the fastest square matmul in the run's dtype (the MFU denominator).

    Sizes double from 512 up to ``largest``, stopping early once one takes a second
    (bf16 on a CPU without bf16 instructions is hundreds of times slower than fp32).
    """
    best, size = 0.0, 512
    while size <= largest:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        fastest = float("inf")
        for _ in range(4):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            fastest = min(fastest, time.perf_counter() - start)
            if fastest > 1.0:
                break
        best = max(best, 2 * size**3 / fastest)
        if fastest > 1.0:
            break
        size *= 2
    return best


# ---------------------------------------------------------------- the workers (one process each)


def workload_overrides(spec: dict, pairs: int) -> list:
    """The config overrides of one benchmarked job: the workload's model and data, ``pairs`` per step, warm-up and
    timed steps at a constant learning rate, a fresh log dir (bench_long_context.py runs its jobs with them too)."""
    return [
        f"model.restore_from_path={spec['model_dir']}",
        f"model.data.data_prefix.train={spec['data']}",
        f"model.data.data_prefix.validation={spec['data']}",
        f"model.encoder_seq_length={spec['seq']}",
        f"model.micro_batch_size={pairs}",
        f"model.global_batch_size={pairs}",
        f"trainer.dpo.max_steps={spec['warmup'] + spec['steps']}",
        f"model.optim.lr={LR}",
        "model.optim.sched.warmup_steps=0",
        f"model.optim.sched.min_lr={LR}",
        f"exp_manager.explicit_log_dir={spec['log_dir']}",
        "exp_manager.resume_if_exists=false",
    ]


def nemo_dpo_tensor_roles(trainer) -> dict:
    """The tensors a nemo-dpo run keeps between steps, by role (memory_inventory.Inventory.count_tensors)."""
    chunks = trainer.model
    params = [p for chunk in chunks for p in chunk.parameters()]
    buffers = [b for chunk in chunks for b in chunk.buffers + chunk.expert_parallel_buffers]
    reference = getattr(trainer.reference, "runs_as_reference", None)
    wrappers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])  # megatron's, around torch's
    optimizers = [o.optimizer for o in wrappers]
    return {
        "weights": params,
        "fp32 master weights": [t for o in wrappers for group in getattr(o, "fp32_from_float16_groups", []) for t in group],
        "gradients": [b.grad_data for b in buffers] + [p.grad for p in params if p.grad is not None],
        "reference weights": [*getattr(reference, "weights", []), *(getattr(reference, "stash", None) or [])],
        "optimizer state": [t for o in optimizers for state in o.state.values() for t in state.values()],
    }


def run_nemo_dpo(spec: dict, inventory: Inventory) -> dict:
    from nemo_dpo.config import load_config, prepare
    from nemo_dpo.distributed.init import destroy_distributed, init_distributed
    from nemo_dpo.training.trainer import DPOTrainer

    inventory.moment("imports")

    total = spec["warmup"] + spec["steps"]
    overrides = [*workload_overrides(spec, spec["pairs"]), f"trainer.precision={spec['dtype']}", *spec["ours"]]
    cfg = load_config("gpt_dpo", overrides)
    prepare(cfg, 1)
    layout = init_distributed(1, 1, cfg.model.seed)
    try:
        trainer = DPOTrainer(cfg, layout)
        inventory.moment("set up")
        pairs = spec["pairs"]
        rows = []
        saved = None
        for step in range(total):
            batch = list(range(step * pairs, (step + 1) * pairs))
            if spec["saved_for_backward"] and step == total - 1:
                with SavedForBackward((name, m) for chunk in trainer.model for name, m in chunk.named_modules()) as saved:
                    metrics = trainer.train_step(batch)
            else:
                metrics = trainer.train_step(batch)
            inventory.moment(f"after step {step + 1}")
            rows.append({
                "step": metrics["time_step"],
                "reference": metrics["time_reference"],
                "policy": metrics["time_policy"],
                "optimizer": metrics["time_optimizer"],
                "loss": metrics["loss"],
            })
        inventory.count_tensors(nemo_dpo_tensor_roles(trainer))
    finally:
        destroy_distributed()
    return {"steps": rows, "saved_for_backward_mib": saved.report() if saved else None}


def trl_tensor_roles(trainer) -> dict:
    """The tensors a TRL run keeps between steps, by role (memory_inventory.Inventory.count_tensors)."""
    params = list(trainer.model.parameters())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return {
        "weights": params,
        "gradients": [p.grad for p in params if p.grad is not None],
        "reference weights": list(trainer.ref_model.parameters()),
        "optimizer state": [t for state in optimizer.state.values() for t in state.values()],
    }


def run_trl(spec: dict, inventory: Inventory) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    inventory.moment("imports")

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    clock = lambda: (sync(), time.perf_counter())[1]  # noqa: E731
    rows, marks, recording = [], {}, {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if spec["saved_for_backward"] and state.global_step + 1 == args.max_steps:
                recording["saved"] = SavedForBackward(trainer.model.named_modules()).__enter__()
            marks.update(start=clock(), reference=0.0)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == args.max_steps:  # the gradients exist only until the update
                inventory.count_tensors(trl_tensor_roles(trainer))
                if "saved" in recording:
                    recording["saved"].__exit__(None, None, None)
            marks["optimizer"] = clock()

        def on_optimizer_step(self, args, state, control, **kwargs):
            marks["optimizer_done"] = clock()

        def on_step_end(self, args, state, control, **kwargs):
            end = clock()
            inventory.moment(f"after step {state.global_step}")
            optimizer = marks["optimizer_done"] - marks["optimizer"]
            rows.append({
                "step": end - marks["start"],
                "reference": marks["reference"],
                "policy": end - marks["start"] - marks["reference"] - optimizer,
                "optimizer": optimizer,
            })

    class InOrder(DPOTrainer):  # the same batches, in the same order, as nemo-dpo
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with open(spec["data"]) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    args = DPOConfig(
        output_dir=spec["log_dir"],
        per_device_train_batch_size=spec["pairs"],
        gradient_accumulation_steps=1,
        max_length=spec["seq"],
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        beta=0.1,
        bf16=spec["dtype"] == "bf16",
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=1234,
    )
    trainer = InOrder(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()])
    reference_forward = trainer.ref_model.forward

    def timed_reference(*a, **k):
        start = clock()
        out = reference_forward(*a, **k)
        marks["reference"] += clock() - start
        return out

    trainer.ref_model.forward = timed_reference
    inventory.moment("set up")
    trainer.train()
    return {"steps": rows, "saved_for_backward_mib": recording["saved"].report() if recording else None}


def worker(name: str, spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    inventory = Inventory()
    inventory.moment("start")
    result = (run_nemo_dpo if name == "nemo_dpo" else run_trl)(spec, inventory)
    result["memory"] = inventory.report()
    if torch.cuda.is_available():
        result["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------- the driver


def run_worker(name: str, spec: dict, folder: str) -> dict:
    """Run one framework in a fresh process, sampling its resident memory every 10 ms."""
    spec = {**spec, "log_dir": os.path.join(folder, f"run_{name}"), "result": os.path.join(folder, f"{name}.json")}
    spec_path = os.path.join(folder, f"{name}_spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    log_path = os.path.join(folder, f"{name}.log")
    with open(log_path, "w") as log:
        status, peak = run_sampling_rss([sys.executable, os.path.abspath(__file__), "--worker", name, spec_path],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    if status != 0:
        with open(log_path) as f:
            raise RuntimeError(f"the {name} worker failed (exit {status}):\n{f.read()[-4000:]}")
    with open(spec["result"]) as f:
        result = json.load(f)
    result["peak_rss_bytes"] = peak
    return result


def summarize(result: dict, work: dict, shape: dict, args, peak_flops: float) -> dict:
    timed = result["steps"][args.warmup :]
    lengths = [n for step in work["lengths"][args.warmup :] for n in step]
    seconds = sum(row["step"] for row in timed)
    memory = result.get("device_peak_bytes", result["peak_rss_bytes"])
    return {
        "tokens_per_s": sum(lengths) / seconds,
        "pairs_per_s": len(lengths) / 2 / seconds,
        "step_s": seconds / len(timed),
        "reference_s": sum(r["reference"] for r in timed) / len(timed),
        "policy_s": sum(r["policy"] for r in timed) / len(timed),
        "optimizer_s": sum(r["optimizer"] for r in timed) / len(timed),
        "peak_memory_mib": memory / 2**20,
        "peak_rss_mib": result["peak_rss_bytes"] / 2**20,
        "mfu": model_flops(shape, lengths) / seconds / peak_flops,
        "steps": result["steps"],
        "memory": {**result["memory"], "peak_rss_mib": result["peak_rss_bytes"] / 2**20},
        "saved_for_backward_mib": result["saved_for_backward_mib"],
    }


ROWS = [  # (label, key, format)
    ("real tokens/s", "tokens_per_s", "{:,.0f}"),
    ("pairs/s", "pairs_per_s", "{:.3f}"),
    ("step (s)", "step_s", "{:.3f}"),
    ("  reference forward (s)", "reference_s", "{:.3f}"),
    ("  policy fwd+bwd (s)", "policy_s", "{:.3f}"),
    ("  optimizer (s)", "optimizer_s", "{:.3f}"),
    ("peak memory (MiB)", "peak_memory_mib", "{:,.0f}"),
    ("MFU", "mfu", "{:.1%}"),
]


def table(summaries: dict) -> str:
    """One column per framework; with two, a last column of first / second."""
    names = list(summaries)
    ratio = len(names) == 2
    lines = [f"{'':26}" + "".join(f"{n:>14}" for n in names) + (f"{' / '.join(names):>22}" if ratio else "")]
    for label, key, fmt in ROWS:
        line = f"{label:26}" + "".join(f"{fmt.format(summaries[n][key]):>14}" for n in names)
        if ratio and summaries[names[1]][key]:
            line += f"{summaries[names[0]][key] / summaries[names[1]][key]:>21.2f}x"
        lines.append(line)
    return "\n".join(lines)


def memory_table(summaries: dict) -> str:
    """Where each framework's peak resident memory goes (MiB): the process at named moments, the tensors it keeps
    between steps by role, and the peak's excess over the resident set after the last step (the step's
    activations and what the allocator holds)."""
    names = list(summaries)
    memory = {n: summaries[n]["memory"] for n in names}
    last = {n: list(memory[n]["rss_mib"])[-1] for n in names}
    rows = [("resident: python + torch", lambda m, n: m["rss_mib"]["start"]),
            ("resident: + framework imports", lambda m, n: m["rss_mib"]["imports"]),
            ("resident: + model, trainer set up", lambda m, n: m["rss_mib"]["set up"]),
            ("resident: after the last step", lambda m, n: m["rss_mib"][last[n]]),
            ("peak resident", lambda m, n: m["peak_rss_mib"]),
            ("  peak - after the last step", lambda m, n: m["peak_rss_mib"] - m["rss_mib"][last[n]])]
    roles = list(dict.fromkeys(role for n in names for role in memory[n]["tensors_mib"]))
    rows += [(f"tensors kept: {role}", lambda m, n, role=role: m["tensors_mib"].get(role, 0.0)) for role in roles]
    lines = [f"{'memory (MiB)':34}" + "".join(f"{n:>12}" for n in names)]
    lines += [f"{label:34}" + "".join(f"{value(memory[n], n):>12,.0f}" for n in names) for label, value in rows]
    return "\n".join(lines)


def saved_table(summaries: dict) -> str:
    """What each framework's policy pass keeps for backward (MiB), by module role, largest first."""
    lines = []
    for name, summary in summaries.items():
        saved = summary["saved_for_backward_mib"]
        lines.append(f"saved for backward, {name}: {sum(saved.values()):,.0f} MiB")
        lines += [f"  {role:40}{size:>10,.1f}" for role, size in saved.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-33m")
    parser.add_argument("--data", choices=("full", "spread"), default="full",
                        help="full: every sequence --seq tokens; spread: lengths uniform in [--min-len, --seq]")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (one microbatch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 where its measured matmul peak beats fp32's (GPUs, CPUs with AMX/AVX512-BF16)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--saved-for-backward", action="store_true",
                        help="record what the last step's backward keeps, by module (the recording slows that step)")
    parser.add_argument("--ours", nargs="*", default=[], help="nemo-dpo config overrides (key=value)")
    parser.add_argument("--out", default="bench_dpo.json")
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "SPEC"), help=argparse.SUPPRESS)
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    frameworks = args.frameworks.split(",")
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        parser.error(f"--frameworks: unknown {unknown}; choose from {list(FRAMEWORKS)}")
    if args.data == "spread" and not 2 <= args.min_len <= args.seq:
        parser.error(f"--min-len must be in [2, --seq={args.seq}], got {args.min_len}")
    if "trl" in frameworks:
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error('TRL is not installed: pip install -e ".[bench]" (or --frameworks nemo_dpo)')

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    def measure() -> dict:
        return {name: matmul_peak(dtype, device, 8192 if device == "cuda" else 4096)
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    before = measure()
    dtype = args.dtype if args.dtype != "auto" else max(before, key=before.get)
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as folder:
        work = write_workload(folder, shape, args)
        spec = {"model_dir": work["model_dir"], "data": work["data"], "seq": args.seq, "pairs": args.pairs,
                "steps": args.steps, "warmup": args.warmup, "dtype": dtype, "threads": args.threads,
                "ours": args.ours, "saved_for_backward": args.saved_for_backward}
        results = {name: run_worker(name, spec, folder) for name in frameworks}
    # A shared machine's matmul speed moves from minute to minute: the peak is the higher of a measurement before
    # the runs and one after them, so that a slow moment does not inflate MFU.
    after = measure()
    peaks = {name: max(before[name], after[name]) for name in before}
    summaries = {name: summarize(result, work, shape, args, peaks[dtype]) for name, result in results.items()}

    lengths = [n for step in work["lengths"][args.warmup :] for n in step]
    print(f"{args.shape}: {matmul_params(shape) / 1e6:.1f}M matmul parameters, {shape['layers']} layers x hidden "
          f"{shape['hidden']}, vocab {shape['vocab']}; {args.pairs} pairs/step, {args.data} lengths (mean "
          f"{sum(lengths) / len(lengths):.0f}, max {max(lengths)} of seq {args.seq}); {dtype} on {device}, "
          f"{args.threads} threads; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"matmul peak (higher of before / after the runs): fp32 {peaks['fp32'] / 1e9:,.1f} GFLOP/s "
          f"({before['fp32'] / 1e9:,.0f} / {after['fp32'] / 1e9:,.0f}), bf16 {peaks['bf16'] / 1e9:,.1f} GFLOP/s "
          f"({before['bf16'] / 1e9:,.0f} / {after['bf16'] / 1e9:,.0f}); model FLOPs/step "
          f"{model_flops(shape, lengths) / args.steps / 1e12:.3f} TFLOP")
    if args.ours:
        print(f"nemo-dpo overrides: {' '.join(args.ours)}")
    print(table(summaries))
    print(memory_table(summaries))
    if args.saved_for_backward:
        print(saved_table(summaries))
        print("(the last timed step recorded these; its time includes the recording)")
    report = {"shape": {"name": args.shape, **shape, "matmul_params": matmul_params(shape)},
              "workload": {"data": args.data, "seq": args.seq, "min_len": args.min_len, "pairs": args.pairs,
                           "steps": args.steps, "warmup": args.warmup, "lengths": work["lengths"]},
              "dtype": dtype, "device": device, "threads": args.threads, "nemo_dpo_overrides": args.ours,
              "matmul_peak_flops": peaks, "matmul_peak_flops_before": before, "matmul_peak_flops_after": after,
              "results": summaries}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
