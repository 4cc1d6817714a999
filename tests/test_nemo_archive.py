"""A NeMo-Aligner .nemo file as the initial policy: its architecture, tokenizer and weights, read without NeMo and
without running its code; the layouts nemo-dpo does not read are refused, each naming why.

The .nemo files are built here as NeMo 1.x lays them out (tests/nemo_fixtures.py), from a nemo-dpo model whose
weights are then compared with what was loaded.
"""

import io
import json
import tarfile

import pytest
import torch
from checkpoint_scenarios import Payload
from distributed_harness import run_world
from nemo_fixtures import (
    TOKENIZER_ARTIFACT,
    distributed_nemo_loads_exactly,
    loads_exactly,
    save_config_only,
    save_nemo,
    sentencepiece_model,
)

from nemo_dpo.config import ConfigError, load_config, prepare
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.models.gpt import build_gpt, transformer_config
from nemo_dpo.training import initial_policy
from nemo_dpo.training.safe_load import CheckpointError


@pytest.fixture
def world(monkeypatch):
    """A process group of this one process (weights are loaded into a model built for a layout)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)  # a world of one listens where the kernel says
    init_distributed(1, 1, seed=0)
    yield
    destroy_distributed()


def adopted(path, cache, *overrides):
    """The config a run would have, starting from the .nemo at ``path`` (NeMo-Aligner's key), and what changed."""
    cfg = load_config("gpt_dpo", [f"pretrained_checkpoint.restore_from_path={path}",
                                  f"model.tokenizer.cache_dir={cache}", *overrides])
    return cfg, prepare(cfg, 1, training=False)


def test_a_state_dict_nemo_brings_its_architecture_tokenizer_and_exact_weights(world, tmp_path):
    path, cache = str(tmp_path / "megatron_gpt_sft.nemo"), str(tmp_path / "cache")
    expected = save_nemo(path, cache, weights="state_dict")
    cfg, changes = adopted(path, cache)
    m = cfg.model
    assert m.restore_from_path == path
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (2, 64, 128, 4, 2)
    assert (m.normalization, m.activation, m.bias, m.share_embeddings_and_output_weights) == ("RMSNorm", "swiglu", False, False)
    assert m.position_embedding_type == "rope" and m.make_vocab_size_divisible_by == 128  # NeMo's 64 x its TP of 2
    assert m.tokenizer.model.startswith(f"{cache}/nemo/") and m.tokenizer.model.endswith(TOKENIZER_ARTIFACT)
    assert m.vocab_size == 375  # the tokenizer's pieces
    assert "model.num_layers: 4 -> 2" in changes
    assert loads_exactly(path, cache, expected)  # bf16 weights, transformer-engine norm names, _extra_state left out


def test_the_sequence_length_stays_the_runs_and_the_difference_is_said(tmp_path):
    path = save_config_only(str(tmp_path / "m.nemo"), str(tmp_path / "cache"), {"encoder_seq_length": 4096})
    cfg, changes = adopted(path, tmp_path / "cache")
    assert cfg.model.encoder_seq_length == 64
    assert changes[-1] == ("model.encoder_seq_length stays 64 (the .nemo has 4096, which NeMo-Aligner used: set "
                           "model.encoder_seq_length=4096 to do the same)")


def test_a_tokenizer_the_archive_lacks_is_asked_for_and_the_given_one_is_used(tmp_path):
    cache = str(tmp_path / "cache")
    hub = {"tokenizer": {"library": "huggingface", "type": "meta-llama/Llama-2-7b-hf", "model": None}}
    path = save_config_only(str(tmp_path / "m.nemo"), cache, hub)
    with pytest.raises(ConfigError, match=r"does not hold its tokenizer \(model_config.yaml names library "
                                          r"'huggingface', type 'meta-llama/Llama-2-7b-hf', model None\); set "
                                          r"model.tokenizer.model to it"):
        adopted(path, cache)
    cfg, _ = adopted(path, cache, f"model.tokenizer.model={sentencepiece_model(cache)}")
    assert cfg.model.tokenizer.model == sentencepiece_model(cache) and cfg.model.vocab_size == 375


def _not_a_tar(path):
    with open(path, "wb") as f:
        f.write(b"not a tar at all" * 64)
    return path


def _tar_with(path, name, data=b"x"):
    with tarfile.open(path, "w:") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p, c: save_config_only(p, c, {"mcore_gpt": False}),
     "not a megatron-core GPT (mcore_gpt is not true); convert it first with NeMo's "
     "scripts/checkpoint_converters/convert_gpt_nemo_to_mcore.py"),
    (lambda p, c: save_config_only(p, c, {"rotary_percentage": 0.5}),
     "rotary_percentage is 0.5; nemo-dpo implements only rotary_percentage=1.0"),
    (lambda p, c: save_config_only(p, c, {"normalization": "layernorm1p"}),
     "normalization 'layernorm1p' with activation 'fast-swiglu'; nemo-dpo implements the normalizations"),
    (lambda p, c: save_config_only(p, c, weights_file=False, members={"mp_rank_00/model_weights.ckpt": b""}),
     "holds weights saved per model-parallel rank (mp_rank_00/...), which nemo-dpo does not read"),
    (lambda p, c: save_config_only(p, c, weights_file=False, members={"tp_rank_01_pp_rank_000/model_weights.ckpt": b""}),
     "holds weights saved per model-parallel rank (tp_rank_01_pp_rank_000/...)"),
    (lambda p, c: save_config_only(p, c, weights_file=False, members={
        "model_weights/metadata.json": json.dumps({"sharded_backend": "zarr"}).encode()}),
     "model_weights/ is a zarr distributed checkpoint; nemo-dpo reads torch_dist ones"),
    (lambda p, c: save_config_only(p, c, weights_file=False), "holds neither model_weights.ckpt nor model_weights/"),
    (lambda p, c: _tar_with(p, "./tokenizer.model"), "holds no model_config.yaml, so it is not a .nemo model"),
    (lambda p, c: _not_a_tar(p), "is not a readable .nemo archive (a tar)"),
    (lambda p, c: _tar_with(p, "../outside.txt"), "refusing to unpack it: '../outside.txt' would be extracted to"),
])
def test_what_is_not_read_is_refused_before_anything_starts(tmp_path, make, message):
    path = make(str(tmp_path / "m.nemo"), str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as err:
        adopted(path, tmp_path / "cache")
    assert message in str(err.value) and str(err.value).startswith(f"model.restore_from_path: {path}"), str(err.value)
    assert not list(tmp_path.rglob("outside.txt"))


def test_a_pickled_object_in_model_weights_is_refused_and_never_runs(world, tmp_path):
    marker, cache = tmp_path / "PAYLOAD_RAN", str(tmp_path / "cache")
    weights = io.BytesIO()
    torch.save({"model.embedding.word_embeddings.weight": Payload(str(marker))}, weights)
    path = save_config_only(str(tmp_path / "m.nemo"), cache, weights_file=False,
                            members={"model_weights.ckpt": weights.getvalue()})
    cfg, _ = adopted(path, cache)
    config = transformer_config(cfg.model)
    model = build_gpt(cfg.model, cfg.model.vocab_size, config)
    with pytest.raises(CheckpointError, match=r"model_weights.ckpt: holds more than tensors and plain data \(it refers "
                                              r"to posix.system\); refusing to load it"):
        initial_policy.load_weights([model], config, cfg.model)
    assert not marker.exists()


def test_a_tokenizer_that_is_not_the_models_is_named_at_load(world, tmp_path):
    path, cache = str(tmp_path / "m.nemo"), str(tmp_path / "cache")
    save_nemo(path, cache, weights="state_dict")
    cfg, _ = adopted(path, cache)
    cfg.model.vocab_size = 600  # as if the tokenizer had 600 pieces
    config = transformer_config(cfg.model)
    with pytest.raises(CheckpointError, match=r"the word embedding has 384 rows, but the tokenizer's 600 tokens padded "
                                              r"to a multiple of 128 make 640"):
        initial_policy.load_weights([build_gpt(cfg.model, 600, config)], config, cfg.model)


@pytest.mark.slow
def test_a_distributed_checkpoint_nemo_loads_exactly_and_its_pickled_extra_state_never_runs(tmp_path):
    """model_weights/ as NeMo saves megatron-core GPTs; every layer's _extra_state a payload that would create a file."""
    marker = tmp_path / "PAYLOAD_RAN"
    (exact,) = run_world(1, str(tmp_path / "out"), distributed_nemo_loads_exactly, str(tmp_path / "m.nemo"),
                         str(tmp_path / "cache"), str(marker))
    assert exact and not marker.exists()
