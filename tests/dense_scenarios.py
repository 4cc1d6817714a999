"""What each process does in tests/test_hf_dense_families.py (imported by the spawned processes).

The programs' own functions run here, several to a launch (the DPO program's
``main``, the converter's ``hf_to_mcore`` and ``mcore_to_hf``), so that seven
models in three layouts, their conversions and three DPO runs take four
launches.

``train`` also runs the data tests' jobs, five to a launch (tests/data_training_runs.py).
"""

import contextlib
import io
import os

import torch
from megatron.core import parallel_state

from distributed_harness import fresh_master_port
from nemo_dpo.cli.convert import hf_to_mcore, mcore_to_hf
from nemo_dpo.cli.train import main as train_main
from nemo_dpo.config import load_config, prepare
from nemo_dpo.data.batching import Microbatch
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.models.gpt import build_gpt, transformer_config
from nemo_dpo.training import initial_policy
from nemo_dpo.training.dpo_step import DPOStep


def _forward_batch(tokens: torch.Tensor) -> Microbatch:
    return Microbatch(  # forward only: no loss, so no mask and no rewards
        tokens=tokens,
        labels=torch.roll(tokens, -1, dims=1),
        loss_mask=torch.zeros(tokens.shape),
        position_ids=torch.arange(tokens.shape[1]).expand_as(tokens),
        gt_rewards=torch.zeros(tokens.shape[0]),
    )


def log_probs(layouts: list, sources: dict, tokens: torch.Tensor) -> dict:
    """``{layout: {name: log-probs of tokens[:, 1:]}}`` under the policy each source restores.

    A layout is ``(tp, pp)`` or ``(tp, pp, ep)`` (expert parallelism, for mixture-of-experts sources).

    Each layout rendezvouses on a fresh port (distributed_harness.fresh_master_port).

    A source is what ``model.restore_from_path`` takes (a Hugging Face folder or
    a checkpoint); the model is built, loaded and run as training does (the
    microbatch schedule, chunked log-probs). Results come from the last
    pipeline stage's first TP rank; other ranks return empty dicts.
    """
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for sizes in layouts:
        tp, pp, ep = (*sizes, 1)[:3]
        fresh_master_port()
        layout = init_distributed(tp, pp, seed=1234, ep=ep)
        results[sizes] = {}
        try:
            for name, source in sources.items():
                cfg = load_config("gpt_dpo", [
                    f"model.restore_from_path={source}",
                    f"model.tensor_model_parallel_size={tp}",
                    f"model.pipeline_model_parallel_size={pp}",
                    f"model.expert_model_parallel_size={ep}",
                    f"model.encoder_seq_length={tokens.shape[1]}",
                ])
                prepare(cfg, world)
                config = transformer_config(cfg.model)
                model = build_gpt(cfg.model, cfg.model.vocab_size, config).eval()
                initial_policy.load_weights([model], config, cfg.model)
                step = DPOStep([model], None, cfg.model.vocab_size, cfg.model.log_prob_chunk_size, layout)
                out = step.log_probs([_forward_batch(tokens)])
                if parallel_state.is_pipeline_last_stage() and layout.tp_rank == 0:
                    results[sizes][name] = out[0][:, :-1]
        finally:
            destroy_distributed()
    return results


def convert_and_score(hf_dirs: dict, mcore_root: str, export_root: str, tokens: torch.Tensor) -> dict:
    """Each folder through ``hf-to-mcore`` and back through ``mcore-to-hf``; then TP=1 log-probs of each."""
    for name, hf_dir in hf_dirs.items():
        try:
            hf_to_mcore(hf_dir, os.path.join(mcore_root, name), 1, 1)
        finally:
            destroy_distributed()
        try:
            mcore_to_hf(os.path.join(mcore_root, name), os.path.join(export_root, name))
        finally:
            destroy_distributed()
    return log_probs([(1, 1)], hf_dirs, tokens)[(1, 1)]


def train(runs: dict) -> dict:
    """``{name: (exit status, console output)}`` of the DPO program run with each ``arguments``.

    Each run rendezvouses on a fresh port, as a separate launch would.
    """
    results = {}
    for name, argv in runs.items():
        fresh_master_port()
        console = io.StringIO()
        with contextlib.redirect_stdout(console):
            status = train_main(argv)
        results[name] = (status, console.getvalue())
    return results


def export_and_score(checkpoints: dict, export_root: str, tokens: torch.Tensor) -> dict:
    """Each checkpoint through ``mcore-to-hf``; then TP=1 log-probs of each checkpoint."""
    for name, ckpt in checkpoints.items():
        try:
            mcore_to_hf(ckpt, os.path.join(export_root, name))
        finally:
            destroy_distributed()
    return log_probs([(1, 1)], checkpoints, tokens)[(1, 1)]
