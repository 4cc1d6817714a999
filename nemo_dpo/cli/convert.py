"""Convert between Hugging Face model folders and nemo-dpo (megatron-core) checkpoints.

    python -m nemo_dpo.convert hf-to-mcore --hf-dir /models/llama --out /ckpt/llama [--tp 2 --pp 2]
    python -m nemo_dpo.convert mcore-to-hf --ckpt /runs/dpo1/checkpoints/step_500 --out /models/llama-dpo
    python -m nemo_dpo.convert merge --ckpt /runs/lora1/checkpoints/step_500 --out /ckpt/llama-dpo-merged

A LoRA checkpoint holds only the adapters; ``merge`` folds them into their base
first. nemo-dpo checkpoints are megatron distributed checkpoints: they load at any
TP/PP/DP layout, so ``--tp``/``--pp`` only check that the model can be split
that way. Both directions run in one CPU process and never overwrite: the output
folder must not exist (or be empty) and appears only once complete.
"""

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from nemo_dpo.config import ConfigError, load_config, prepare
from nemo_dpo.data.tokenizer import load_tokenizer_from_dir, tokenizer_files
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.models.gpt import build_gpt, check_model_config, transformer_config
from nemo_dpo.models.hf import generation_config_files, global_to_hf, hf_config_from_model, write_hf_dir
from nemo_dpo.models.init_weights import init_weights
from nemo_dpo.models.lora import add_lora, merge_lora
from nemo_dpo.models.sharding import local_to_global_names
from nemo_dpo.training import checkpoint, initial_policy


def _refuse_existing(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} already exists and is not an empty folder; refusing to overwrite it")


def _model_from(source: str):
    """The whole model (TP=PP=1, this process) with the weights of ``source``."""
    cfg = load_config("gpt_dpo", [f"model.restore_from_path={source}"])
    prepare(cfg, world_size=1, training=False)
    init_distributed(1, 1, cfg.model.seed)
    config = transformer_config(cfg.model)
    model = build_gpt(cfg.model, cfg.model.vocab_size, config)
    initial_policy.load_weights([model], config, cfg.model)
    return cfg, model, config


def hf_to_mcore(hf_dir: str, out: str, tp: int, pp: int) -> None:
    _refuse_existing(out)
    cfg, model, _ = _model_from(hf_dir)
    layout = cfg.copy()
    layout.model.tensor_model_parallel_size, layout.model.pipeline_model_parallel_size = tp, pp
    check_model_config(layout.model)
    files = {f"{checkpoint.TOKENIZER_DIR}/{os.path.basename(f)}": f for f in tokenizer_files(hf_dir)}
    files.update(initial_policy.carried_files(cfg.model))
    cfg.model.restore_from_path = None
    cfg.model.tokenizer.model = None
    _save_model(model, cfg, out, files)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters; loads at any TP/PP (checked TP={tp}, PP={pp})")


def mcore_to_hf(ckpt: str, out: str) -> None:
    _refuse_existing(out)
    cfg, model, config = _model_from(ckpt)
    tokenizer_dir = os.path.join(ckpt, checkpoint.TOKENIZER_DIR)
    tokenizer = load_tokenizer_from_dir(tokenizer_dir)
    names = local_to_global_names(model, config)
    weights = {names[n]: p.detach() for n, p in model.named_parameters()}
    hf_config = hf_config_from_model(cfg.model, cfg.model.vocab_size, tokenizer.eos_id, tokenizer.bos_id)
    hf_weights = global_to_hf(hf_config, weights)
    write_hf_dir(out, hf_config, hf_weights, tokenizer_files(tokenizer_dir) + generation_config_files(ckpt))
    print(f"wrote {out}: {hf_config['architectures'][0]}, {len(hf_weights)} tensors")


def merge(ckpt: str, out: str) -> None:
    """A LoRA checkpoint (adapters + the name of its base) -> a plain model checkpoint with the adapters folded in."""
    _refuse_existing(out)
    reason = checkpoint.problem(Path(ckpt))
    if reason is not None:
        raise checkpoint.CheckpointError(f"cannot merge {ckpt}: {reason}")
    cfg = OmegaConf.create(checkpoint.read_metadata(ckpt)["config"])
    m = cfg.model
    if m.peft.peft_scheme != "lora":
        raise ValueError(f"{ckpt}: not a LoRA checkpoint (model.peft.peft_scheme={m.peft.peft_scheme!r})")
    m.tensor_model_parallel_size = m.pipeline_model_parallel_size = m.context_parallel_size = 1  # one process
    m.virtual_pipeline_model_parallel_size, m.sequence_parallel = None, False
    init_distributed(1, 1, m.seed)
    config = transformer_config(m)
    model = build_gpt(m, m.vocab_size, config)
    if m.restore_from_path is None:
        init_weights(model, config, m.seed)
    else:
        initial_policy.load_weights([model], config, m)
    add_lora(model, config, m.peft.lora_tuning, m.seed)
    checkpoint.load(Path(ckpt), [model])
    merge_lora(model)
    model.requires_grad_(True)  # a plain model: the checkpoint holds every parameter
    m.peft.peft_scheme, m.restore_from_path, m.tokenizer.model = "none", None, None
    tokenizer_dir = Path(ckpt) / checkpoint.TOKENIZER_DIR
    files = {f"{checkpoint.TOKENIZER_DIR}/{f.name}": str(f) for f in sorted(tokenizer_dir.iterdir())}
    files.update({os.path.basename(f): f for f in generation_config_files(ckpt)})
    _save_model(model, cfg, out, files)
    print(f"wrote {out}: {ckpt} with its adapters merged into the base")


def _save_model(model, cfg, out: str, files: dict) -> None:
    metadata = {"config": OmegaConf.to_container(cfg, resolve=True)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked); the checkpoint is renamed into its place
    checkpoint.save(Path(out), checkpoint.sharded_state([model]), metadata, extra_files=files,
                    update_latest=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nemo_dpo.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, help="the conversion")
    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> nemo-dpo checkpoint")
    to_mcore.add_argument("--hf-dir", required=True,
                          help="a Hugging Face model folder (config.json, safetensors or pytorch_model.bin, tokenizer)")
    to_mcore.add_argument("--out", required=True,
                          help="the checkpoint folder to write (must not exist, or be empty)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size to check the model against")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size to check the model against")
    to_hf = sub.add_parser("mcore-to-hf", help="nemo-dpo checkpoint -> Hugging Face folder")
    to_hf.add_argument("--ckpt", required=True, help="a checkpoint folder, e.g. <log dir>/checkpoints/step_100")
    to_hf.add_argument("--out", required=True, help="the Hugging Face folder to write (must not exist, or be empty)")
    to_merged = sub.add_parser("merge", help="LoRA checkpoint -> checkpoint with the adapters folded into the base")
    to_merged.add_argument("--ckpt", required=True, help="a LoRA run's checkpoint folder")
    to_merged.add_argument("--out", required=True, help="the checkpoint folder to write (must not exist, or be empty)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            hf_to_mcore(args.hf_dir, args.out, args.tp, args.pp)
        elif args.command == "merge":
            merge(args.ckpt, args.out)
        else:
            mcore_to_hf(args.ckpt, args.out)
    except (ConfigError, OSError, ValueError, KeyError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0
