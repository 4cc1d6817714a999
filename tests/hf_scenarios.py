"""What each process does in the Hugging Face conversion tests (imported by the spawned processes)."""

import os

import torch

from nemo_dpo.config import load_config
from nemo_dpo.data.tokenizer import tokenizer_files
from nemo_dpo.distributed import layout
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.losses.logprobs import vocab_parallel_log_probs
from nemo_dpo.models.gpt import build_gpt, padded_vocab_size, transformer_config
from nemo_dpo.models.hf import (
    global_to_hf,
    hf_config_from_model,
    hf_to_global,
    model_overrides_from_hf,
    read_hf_config,
    read_hf_weights,
    write_hf_dir,
)
from nemo_dpo.models.sharding import load_global_state_dict, local_to_global_names


def _yaml(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def model_config(hf_config: dict, tp: int):
    """The ``model`` section that rebuilds the HF architecture, at tensor parallelism ``tp``."""
    overrides = [f"model.{key}={_yaml(value)}" for key, value in model_overrides_from_hf(hf_config).items()]
    overrides += [f"model.tensor_model_parallel_size={tp}", "model.encoder_seq_length=32"]
    return load_config("gpt_dpo", overrides).model


def load_and_score(tp: int, hf_dirs: dict, tokens: torch.Tensor, export_root: str | None) -> dict:
    """Per HF directory: log-probs of each next token under the converted megatron model.

    With ``export_root``, each model's own parameters are also exported back to
    ``<export_root>/<name>`` (only meaningful at TP=1, where local names are global).
    """
    init_distributed(tp, 1, seed=1234)
    results = {}
    try:
        for name, hf_dir in hf_dirs.items():
            hf_config = read_hf_config(hf_dir)
            cfg = model_config(hf_config, tp)
            vocab = hf_config["vocab_size"]
            config = transformer_config(cfg)
            model = build_gpt(cfg, vocab, config)
            model.eval()
            padded = padded_vocab_size(vocab, cfg.make_vocab_size_divisible_by, tp)
            load_global_state_dict(model, config, hf_to_global(hf_config, read_hf_weights(hf_dir), padded))
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            with torch.no_grad():
                logits = model(tokens, positions, None)
                results[name] = vocab_parallel_log_probs(logits[:, :-1], tokens[:, 1:], vocab, layout.current().tp_group)
            if export_root is not None:
                names = local_to_global_names(model, config)
                global_weights = {names[n]: p.detach().clone() for n, p in model.named_parameters()}
                out_config = hf_config_from_model(cfg, vocab, hf_config["eos_token_id"], hf_config["bos_token_id"])
                write_hf_dir(
                    os.path.join(export_root, name),
                    out_config,
                    global_to_hf(out_config, global_weights),
                    tokenizer_files(hf_dir),
                )
    finally:
        destroy_distributed()
    return results
