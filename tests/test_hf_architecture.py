"""Every architecture key survives Hugging Face -> nemo-dpo -> training -> Hugging Face.

A tiny Llama (GQA, untied, RoPE theta, RMSNorm epsilon, 128 positions) and a
tiny GPT-2 (exact GELU, n_inner, untied, LayerNorm epsilon, 128 learned
positions), each with every architecture key away from conf/gpt_dpo.yaml's
default, go through ``python -m nemo_dpo.convert hf-to-mcore``, a 2-step DPO run
and ``mcore-to-hf``. One training launch per family, covering both ways in:
GPT-2 trains from its converted checkpoint (it used to stop with megatron's
"Global shape mismatch" on the position table), Llama straight from its Hugging
Face folder, with a non-default vocabulary padding (its export used to say 64
positions). The checkpoints' configs, the exported config.json and the export
message's tensor count are checked against the source. The keys Llama 3 and
the Qwens brought (head size, q/k/v biases, query/key norms, RoPE scaling) go
through the same journey in tests/test_hf_dense_families.py's DPO runs.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import safetensors
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dense_fixtures import DPO_RUNS
from moe_fixtures import SETTINGS as MOE_SETTINGS
from hf_fixtures import ROOT, convert, save_tokenizer
from nemo_dpo.config import load_config
from nemo_dpo.models.architecture import ARCHITECTURE_KEYS, VALUE_WHEN_ABSENT
from nemo_dpo.training import checkpoint

VOCAB = 300
FAMILIES = {
    "llama": {
        "model": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=160, rope_theta=500000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
        # The model section the folder defines.
        "settings": dict(
            num_layers=3, hidden_size=96, ffn_hidden_size=160, num_attention_heads=6, num_query_groups=2,
            position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", bias=False,
            share_embeddings_and_output_weights=False, vocab_size=VOCAB, rotary_base=500000,
            layernorm_epsilon=1e-6, max_position_embeddings=128),
        "train_from": "hf",
        "train_settings": dict(make_vocab_size_divisible_by=32),  # a run's own choice, kept by its checkpoints
        "config_fields": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                          "rope_parameters", "tie_word_embeddings", "vocab_size"],
    },
    "gpt2": {
        "model": lambda: GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB, n_embd=96, n_layer=3, n_head=6, n_inner=160, n_positions=128,
            activation_function="gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
        "settings": dict(
            num_layers=3, hidden_size=96, ffn_hidden_size=160, num_attention_heads=6, num_query_groups=6,
            position_embedding_type="learned_absolute", normalization="LayerNorm", activation="gelu", bias=True,
            share_embeddings_and_output_weights=False, vocab_size=VOCAB, layernorm_epsilon=1e-6,
            max_position_embeddings=128),
        "train_from": "mcore",
        "train_settings": {},
        "config_fields": ["n_embd", "n_inner", "n_layer", "n_head", "n_positions", "activation_function",
                          "layer_norm_epsilon", "tie_word_embeddings", "vocab_size"],
    },
}
RUN = ["model.global_batch_size=4", "model.micro_batch_size=2", "trainer.dpo.max_steps=2",
       "trainer.dpo.limit_val_batches=1", "exp_manager.create_tensorboard_logger=false"]


def _saved_model_config(ckpt) -> dict:
    return checkpoint.read_metadata(ckpt)["config"]["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per family: the source folder, the converted and trained checkpoints, the export and its message."""
    root = tmp_path_factory.mktemp("hf_architecture")
    out = {}
    for name, family in FAMILIES.items():
        hf, mcore, log_dir, exported = (root / f"{name}_{part}" for part in ("hf", "mcore", "run", "exported"))
        torch.manual_seed(0)
        family["model"]().save_pretrained(hf, safe_serialization=True)
        save_tokenizer(hf)
        convert("hf-to-mcore", "--hf-dir", hf, "--out", mcore)
        source = hf if family["train_from"] == "hf" else mcore
        overrides = [f"model.{k}={v}" for k, v in family["train_settings"].items()]
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             os.path.join(ROOT, "examples", "train_dpo.py"), f"model.restore_from_path={source}", *RUN, *overrides,
             f"exp_manager.explicit_log_dir={log_dir}"],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        trained = log_dir / "checkpoints" / "step_2"
        message = convert("mcore-to-hf", "--ckpt", trained, "--out", exported).stdout
        out[name] = dict(hf=hf, mcore=mcore, trained=trained, exported=exported, message=message)
    return out


def test_every_architecture_key_is_tested_away_from_its_default():
    default = load_config("gpt_dpo").model
    cases = [{**f["settings"], **f["train_settings"]} for f in FAMILIES.values()] + list(DPO_RUNS.values())
    cases += list(MOE_SETTINGS.values())
    for key in ARCHITECTURE_KEYS:
        values = [case.get(key, default[key]) for case in cases]
        assert any(value != default[key] for value in values), f"model.{key}: no case differs from the default"


def test_a_checkpoint_written_before_a_key_existed_is_read_as_it_was_made(tmp_path):
    """A checkpoint's config from before qk_layernorm, kv_channels, rope_scaling and the experts: still the
    same dense model (no refusal, no KeyError), and a key with no such value is named."""
    from omegaconf import OmegaConf

    model = load_config("gpt_dpo").model
    old = {key: value for key, value in OmegaConf.to_container(model).items() if key not in VALUE_WHEN_ABSENT}
    folder = tmp_path / "step_10"
    folder.mkdir()
    (folder / checkpoint.METADATA).write_text(json.dumps({"format": checkpoint.FORMAT, "config": {"model": old}}))
    for key, value in VALUE_WHEN_ABSENT.items():
        assert model[key] == value, f"model.{key}: its default is what older checkpoints were made with"
    checkpoint.check_compatible(folder, model)
    assert checkpoint.saved_architecture(folder) == {key: model[key] for key in ARCHITECTURE_KEYS}
    del old["rotary_base"]
    (folder / checkpoint.METADATA).write_text(json.dumps({"format": checkpoint.FORMAT, "config": {"model": old}}))
    with pytest.raises(checkpoint.CheckpointError, match=r"step_10/nemo_dpo.json: the model config has no "
                                                         r"model.rotary_base"):
        checkpoint.check_compatible(folder, model)


@pytest.mark.slow
@pytest.mark.system  # import, train and export at every key away from its default: several jobs
def test_checkpoints_keep_every_architecture_key(runs):
    for name, family in FAMILIES.items():
        converted, trained = _saved_model_config(runs[name]["mcore"]), _saved_model_config(runs[name]["trained"])
        for key, value in family["settings"].items():
            assert converted[key] == value, f"{name} converted: model.{key}"
        for key, value in {**family["settings"], **family["train_settings"]}.items():
            assert trained[key] == value, f"{name} trained: model.{key}"


@pytest.mark.slow
@pytest.mark.system
def test_export_after_training_has_the_source_architecture_and_loads_in_transformers(runs):
    for name, family in FAMILIES.items():
        source, exported = (AutoConfig.from_pretrained(runs[name][k]) for k in ("hf", "exported"))
        for field in family["config_fields"]:
            assert getattr(exported, field) == getattr(source, field), f"{name}: config.json {field}"
        model = AutoModelForCausalLM.from_pretrained(runs[name]["exported"]).eval()
        assert model.config.max_position_embeddings == 128
        tokens = torch.randint(3, 290, (1, 100), generator=torch.Generator().manual_seed(0))  # past 64 positions
        with torch.no_grad():
            assert model(tokens).logits.isfinite().all(), name


@pytest.mark.slow
@pytest.mark.system
def test_export_message_counts_the_tensors_written(runs):
    for name in FAMILIES:
        count = re.search(r"wrote .*: \w+, (\d+) tensors", runs[name]["message"])
        assert count, runs[name]["message"]
        with safetensors.safe_open(str(runs[name]["exported"] / "model.safetensors"), "pt") as f:
            assert int(count.group(1)) == len(f.keys()), name
