"""Hugging Face <-> megatron conversion, checked against transformers itself.

Tiny Llama / Mistral / GPT-2 models with random weights are saved by
transformers; converted into megatron at TP=1 and TP=2 they must give
transformers' next-token log-probs (1e-4), and exported back they must load in
transformers with the same weights. Two process launches in all.
"""

import json
import os
import shutil
import struct

import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from distributed_harness import run_world
from hf_fixtures import randomized
from hf_scenarios import load_and_score
from nemo_dpo.config import load_config
from nemo_dpo.data.tokenizer import HFTokenizer, load_tokenizer_from_dir, tokenizer_files
from nemo_dpo.models.hf import (
    global_to_hf,
    hf_aux_loss_coeff,
    hf_config_from_model,
    hf_to_global,
    model_overrides_from_hf,
    read_hf_config,
    read_hf_weights,
    write_hf_dir,
)
from nemo_dpo.models.hf.safetensors_io import read_safetensors, write_safetensors

VOCAB = 300
PADDED_VOCAB = 384  # conf/gpt_dpo.yaml pads to a multiple of 128
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
CASES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=False)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**{**LLAMA, "rope_theta": 1e6}, sliding_window=None)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(**GPT2)),
    "gpt2_untied_gelu": lambda: GPT2LMHeadModel(
        GPT2Config(**GPT2, tie_word_embeddings=False, activation_function="gelu", n_inner=96)
    ),
}
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _bpe_tokenizer(folder):
    """A byte-level BPE tokenizer that adds <s> by default (which encode must not do)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["which of these is a fruit: tiger, apple, red?"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": {"__type": "AddedToken", "content": "<s>"}}, f)  # as older files


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{case: (transformers model, its save_pretrained directory)}; the Llama one has a tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    saved = {}
    for name, make in CASES.items():
        model = randomized(make())
        model.save_pretrained(root / name, safe_serialization=True)
        saved[name] = (model, str(root / name))
    _bpe_tokenizer(saved["llama"][1])
    saved["llama"][0].save_pretrained(root / "llama_sharded", safe_serialization=True, max_shard_size="100KB")
    return saved


def _reference_log_probs(model):
    with torch.no_grad():
        logits = model(TOKENS).logits.float()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, TOKENS[:, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def tp1(hf, tmp_path_factory):
    """TP=1 log-probs, plus every converted model exported back to HF."""
    work = tmp_path_factory.mktemp("tp1")
    dirs = {name: d for name, (_, d) in hf.items()}
    (result,) = run_world(1, str(work / "out"), load_and_score, 1, dirs, TOKENS, str(work / "export"))
    return result, work / "export"


def test_safetensors_writer_and_reader_agree_with_the_reference_library(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 3).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6).t(),
    }
    ours = tmp_path / "ours.safetensors"
    write_safetensors(str(ours), tensors, metadata={"format": "pt"})
    (header_len,) = struct.unpack("<Q", ours.read_bytes()[:8])
    assert header_len % 8 == 0
    with safetensors.safe_open(str(ours), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    for loaded in (safetensors.torch.load_file(str(ours)), read_safetensors(str(ours))):
        assert set(loaded) == set(tensors)
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs))
    assert all(torch.equal(read_safetensors(str(theirs))[k], v) for k, v in tensors.items())
    assert sorted(os.listdir(tmp_path)) == ["ours.safetensors", "theirs.safetensors"]  # no temp files left


def test_round_trip_is_exact_and_vocab_padding_is_zero(hf):
    for name, (_, hf_dir) in hf.items():
        config, weights = read_hf_config(hf_dir), read_hf_weights(hf_dir)
        reference = safetensors.torch.load_file(os.path.join(hf_dir, "model.safetensors"))
        assert set(weights) == set(reference) and all(torch.equal(weights[k], reference[k]) for k in reference)
        for dtype in (torch.float32, torch.bfloat16):
            cast = {k: v.to(dtype) for k, v in weights.items()}
            megatron = hf_to_global(config, cast, PADDED_VOCAB)
            embedding = megatron["embedding.word_embeddings.weight"]
            assert embedding.shape == (PADDED_VOCAB, 64) and not embedding[VOCAB:].any()
            assert ("output_layer.weight" in megatron) == (not config["tie_word_embeddings"]), name
            back = global_to_hf(config, megatron)
            assert set(back) == set(cast), name
            for key, tensor in cast.items():
                assert back[key].dtype == dtype and torch.equal(back[key], tensor), f"{name}: {key}"


def test_sharded_checkpoint_reads_like_the_single_file(hf):
    sharded = os.path.join(os.path.dirname(hf["llama"][1]), "llama_sharded")
    assert sum(f.endswith(".safetensors") for f in os.listdir(sharded)) > 1
    single, weights = read_hf_weights(hf["llama"][1]), read_hf_weights(sharded)
    assert set(weights) == set(single) and all(torch.equal(weights[k], single[k]) for k in single)


def test_pytorch_model_bin_is_read_when_there_is_no_safetensors(hf, tmp_path):
    weights = read_hf_weights(hf["gpt2"][1])
    torch.save(weights, tmp_path / "pytorch_model.bin")
    loaded = read_hf_weights(str(tmp_path))
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_log_probs_match_transformers_at_tp1_and_tp2(hf, tp1, tmp_path):
    ranks = run_world(2, str(tmp_path / "tp2"), load_and_score, 2, {n: d for n, (_, d) in hf.items()}, TOKENS, None)
    for name, (model, _) in hf.items():
        want = _reference_log_probs(model)
        assert want.std() > 0.5, f"{name}: the test model is too close to uniform to test anything"
        runs = {"TP=1": tp1[0][name], **{f"TP=2 rank {r}": result[name] for r, result in enumerate(ranks)}}
        for label, got in runs.items():
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{name} {label}: {m}")


@pytest.mark.slow
def test_export_loads_in_transformers_with_the_same_weights(hf, tp1):
    export_root = tp1[1]
    for name, (model, hf_dir) in hf.items():
        out = str(export_root / name)
        original = read_hf_config(hf_dir)
        assert model_overrides_from_hf(read_hf_config(out)) == model_overrides_from_hf(original), name
        exported = AutoModelForCausalLM.from_pretrained(out).eval()
        # Mistral without a sliding window is Llama, which is what the export writes.
        assert type(exported) is (LlamaForCausalLM if isinstance(model, MistralForCausalLM) else type(model))
        want, got = model.state_dict(), exported.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
        torch.testing.assert_close(_reference_log_probs(exported), _reference_log_probs(model), atol=1e-6, rtol=0)
    assert sorted(os.listdir(export_root / "llama")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(os.listdir(export_root)) == sorted(CASES)  # no temporary folders left


def test_model_section_that_fits_no_architecture_names_the_keys():
    cfg = load_config("gpt_dpo", ["model.normalization=LayerNorm"]).model
    with pytest.raises(ValueError) as err:
        hf_config_from_model(cfg, VOCAB, 2, 1)
    message = str(err.value)
    assert "LlamaForCausalLM would need model.normalization='RMSNorm' (got 'LayerNorm');" in message
    assert "Qwen2ForCausalLM would need model.normalization='RMSNorm' (got 'LayerNorm'), model.qkv_bias=True" in message
    assert "Qwen3ForCausalLM would need model.normalization='RMSNorm' (got 'LayerNorm'), model.qk_layernorm=True" in message
    assert "GPT2LMHeadModel would need model.activation='gelu_tanh' or 'gelu' (got 'swiglu')" in message
    assert "model.bias=True (got False)" in message and "normalization='LayerNorm'" not in message


@pytest.mark.parametrize(
    "overrides, architecture",
    [
        ([], "LlamaForCausalLM"),
        (["model.bias=true", "model.kv_channels=64"], "LlamaForCausalLM"),
        (["model.rope_scaling={rope_type: yarn, factor: 4.0, original_max_position_embeddings: 16}"], "LlamaForCausalLM"),
        (["model.qkv_bias=true"], "Qwen2ForCausalLM"),
        (["model.qk_layernorm=true", "model.kv_channels=64"], "Qwen3ForCausalLM"),
        (["model.num_moe_experts=4", "model.moe_aux_loss_coeff=0.01"], "MixtralForCausalLM"),
        (["model.num_moe_experts=4", "model.moe_router_topk=3", "model.qk_layernorm=true",
          "model.moe_ffn_hidden_size=64", "model.moe_router_pre_softmax=true"], "Qwen3MoeForCausalLM"),
    ],
)
def test_export_picks_the_family_from_the_model_section(overrides, architecture):
    cfg = load_config("gpt_dpo", overrides).model
    hf_config = hf_config_from_model(cfg, VOCAB, 2, 1)
    assert hf_config["architectures"] == [architecture]
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    assert hf_config.get("head_dim", cfg.hidden_size // cfg.num_attention_heads) == head_dim
    expected = {**cfg, "num_query_groups": cfg.num_attention_heads}  # null: one group per head
    for key, value in model_overrides_from_hf(hf_config).items():
        assert expected[key] == value, f"{architecture}: model.{key}"


@pytest.mark.parametrize(
    "patch, message",
    [
        (
            {"model_type": "bert"},
            "config.json: model_type 'bert' is not supported (supported: ['llama', 'mistral', 'qwen2', 'qwen3', 'mixtral', 'qwen3_moe', 'gpt2'])",
        ),
        (  # Gemma 2's logit soft-capping, sandwich norms and alternating windows: a family of its own
            {"model_type": "gemma2", "final_logit_softcapping": 30.0},
            "config.json: model_type 'gemma2' is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 10000.0}},
            "config.json: rope_parameters.rope_type='longrope' is not supported (supported: default, linear, llama3, yarn)",
        ),
        (
            {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "config.json: rope_scaling.rope_type='dynamic' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32, "beta_fast": 32.0}},
            "config.json: rope_scaling.beta_fast=32.0 is not supported (rope_type 'llama3' takes",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "config.json: rope_scaling of rope_type 'llama3' lacks ['high_freq_factor', 'low_freq_factor']",
        ),
        ({"partial_rotary_factor": 0.5}, "config.json: partial_rotary_factor=0.5 is not supported (RoPE must cover"),
        ({"attention_bias": True}, "config.json: attention_bias=True is not supported (megatron has biases on every"),
        ({"mlp_bias": True}, "config.json: mlp_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "config.json: hidden_act='gelu' is not supported"),
        ({"sliding_window": 16}, "config.json: sliding_window=16 is not supported (attention must see all 64 positions)"),
        (  # Qwen2: a window on the layers from max_window_layers on
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
            "config.json: sliding_window=16 is not supported (use_sliding_window is true and layers [1] slide",
        ),
        (
            {"model_type": "qwen3", "head_dim": 16, "attention_bias": True},
            "config.json: attention_bias=True is not supported (Qwen3 would have biases on attention but not the MLP",
        ),
        (  # Mixtral's router noise: transformers only while training, megatron in every pass
            {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.1},
            "config.json: router_jitter_noise=0.1 is not supported (megatron would jitter the router's input in every",
        ),
        (
            {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 6},
            "config.json: num_experts_per_tok=6 is not supported (a token can go to at most the 4 experts)",
        ),
        ({"model_type": "mixtral", "num_experts_per_tok": 2}, "config.json: missing 'num_local_experts'"),
        (
            {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 2},
            "config.json: decoder_sparse_step=2 is not supported (every layer must be a mixture of experts)",
        ),
        (
            {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "mlp_only_layers": [0]},
            "config.json: mlp_only_layers=[0] is not supported (every layer must be a mixture of experts)",
        ),
        (
            {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": -1.0},
            "config.json: router_aux_loss_coef=-1.0 is not supported (a loss weight is >= 0)",
        ),
        ({"num_hidden_layers": None}, "config.json: missing 'num_hidden_layers'"),
        ({"hidden_size": "64"}, "config.json: hidden_size must be int, got '64'"),
    ],
)
def test_unsupported_configs_are_rejected(hf, patch, message):
    config = {**read_hf_config(hf["llama"][1]), **patch}
    with pytest.raises(ValueError) as err:
        model_overrides_from_hf(config)
        hf_aux_loss_coeff(config)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "patch, coefficient",
    [
        ({"model_type": "llama"}, 0.0),  # dense
        ({"output_router_logits": False, "router_aux_loss_coef": 0.02}, 0.0),  # transformers adds no loss then
        ({"output_router_logits": True, "router_aux_loss_coef": 0.02}, 0.02),
        ({"output_router_logits": True}, 0.001),  # transformers' default weight
    ],
)
def test_the_load_balancing_loss_weight_comes_from_a_folder_that_trains_with_it(hf, patch, coefficient):
    config = {**read_hf_config(hf["llama"][1]), "model_type": "mixtral", "num_local_experts": 4,
              "num_experts_per_tok": 2, **patch}
    assert hf_aux_loss_coeff(config) == coefficient


@pytest.mark.parametrize(
    "patch",
    [
        {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 16},  # Qwen2.5's configs: window off
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64},  # no shorter than the context
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},  # no layer
        {"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention"] * 2},
        {"model_type": "mistral", "sliding_window": None},
    ],
)
def test_sliding_windows_that_limit_nothing_are_accepted(hf, patch):
    config = {**read_hf_config(hf["llama"][1]), **patch}
    assert model_overrides_from_hf(config)["max_position_embeddings"] == 64


def test_unreadable_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json not found"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: not valid JSON"):
        read_hf_config(str(tmp_path))


def test_truncated_or_malformed_safetensors_name_the_file_and_tensor(hf, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf["gpt2"][1], broken)
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"{path}: truncated safetensors file: tensor '[\w.]+' ends at byte"):
        read_hf_weights(str(broken))
    path.write_bytes(data[:20])
    with pytest.raises(
        ValueError, match=rf"{path}: truncated safetensors file: header length \d+ exceeds file size 20"
    ):
        read_hf_weights(str(broken))
    header = json.dumps({"x": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(ValueError, match=rf"{path}: tensor 'x': unknown dtype 'F7'"):
        read_hf_weights(str(broken))


def test_missing_shard_names_the_index_and_the_shard(hf, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(os.path.join(os.path.dirname(hf["llama"][1]), "llama_sharded"), sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(sharded / shard)
    with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json: shard {shard} .* is missing"):
        read_hf_weights(str(sharded))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no weights found"):
        read_hf_weights(str(tmp_path))


def test_wrong_missing_or_unexpected_tensors_are_named(hf):
    config, weights = read_hf_config(hf["llama"][1]), read_hf_weights(hf["llama"][1])
    wrong = {**weights, "model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(
        ValueError, match=r"tensor model.layers.1.self_attn.k_proj.weight: expected shape \(32, 64\) .* got \(64, 64\)"
    ):
        hf_to_global(config, wrong, PADDED_VOCAB)
    incomplete = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    incomplete["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(
        ValueError, match="missing model.norm.weight; unexpected model.layers.0.self_attn.q_norm.weight"
    ):
        hf_to_global(config, incomplete, PADDED_VOCAB)
    with pytest.raises(ValueError, match="padded vocabulary 256 is smaller than vocab_size 300"):
        hf_to_global(config, weights, 256)
    megatron = hf_to_global(config, weights, PADDED_VOCAB)
    megatron["decoder.layers.0.mlp.linear_fc1.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match=r"decoder.layers.0.mlp.linear_fc1.weight: expected shape \(256, 64\)"):
        global_to_hf(config, megatron)


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(hf, tmp_path):
    config, weights = read_hf_config(hf["gpt2"][1]), read_hf_weights(hf["gpt2"][1])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{taken} already exists and is not an empty directory"):
        write_hf_dir(str(taken), config, weights, [])
    assert os.listdir(taken) == ["keep.txt"]
    with pytest.raises(ValueError, match="cannot store"):  # fails after config.json was written
        write_hf_dir(str(tmp_path / "new"), config, {**weights, "bad": torch.zeros(2, dtype=torch.complex64)}, [])
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    (tmp_path / "empty").mkdir()
    write_hf_dir(str(tmp_path / "empty"), config, weights, [])
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "model.safetensors"]


def test_hf_tokenizer_ids_and_round_trip(hf, tmp_path):
    tok = HFTokenizer(hf["llama"][1])
    raw = Tokenizer.from_file(os.path.join(hf["llama"][1], "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.vocab_size == raw.get_vocab_size() <= VOCAB
    text = "which fruit: apple, tiger?"
    ids = tok.encode(text)
    assert raw.encode(text).ids == [1] + ids  # the post-processor's <s> is not added by encode
    assert tok.start_ids == [1]  # but the dataset puts it before each prompt
    assert tok.decode(ids) == text and tok.model_path.endswith("tokenizer.json")

    only_json = tmp_path / "only_json"
    only_json.mkdir()
    shutil.copy(tok.model_path, only_json)
    (only_json / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = load_tokenizer_from_dir(str(only_json))
    assert isinstance(loaded, HFTokenizer) and loaded.eos_id == 2 and loaded.bos_id == -1
    (only_json / "config.json").unlink()
    with pytest.raises(ValueError, match=f"{only_json}: the tokenizer defines no EOS token"):
        HFTokenizer(str(only_json))
    only_model = tmp_path / "only_model"  # only tokenizer.model: a SentencePiece model, as checkpoints store one
    only_model.mkdir()
    (only_model / "tokenizer.model").write_bytes(b"not sentencepiece")
    with pytest.raises(ValueError, match=f"{only_model}/tokenizer.model: not a valid SentencePiece model"):
        load_tokenizer_from_dir(str(only_model))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer found"):
        load_tokenizer_from_dir(str(tmp_path))
    assert [os.path.basename(f) for f in tokenizer_files(hf["llama"][1])] == ["tokenizer.json", "tokenizer_config.json"]
