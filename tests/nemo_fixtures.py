""".nemo files laid out as NeMo 1.x writes them for NeMo-Aligner, from a small nemo-dpo model (no NeMo needed).

NeMo's SaveRestoreConnector packs a folder into an uncompressed tar with
``arcname="."``: ``model_config.yaml`` (the model config, artifacts named
``nemo:<uuid>_<file>``), the tokenizer artifact, and the weights: ``torch.save``
of the state dict in ``model_weights.ckpt``, or (NLPSaveRestoreConnector, for
models with a sharded state dict) a megatron-core distributed checkpoint in
``model_weights/``. A megatron-core GPT's keys are its GPTModel's under
``model.`` (MegatronGPTModel.sharded_state_dict prefixes ``model.``), with
transformer-engine's names for the norms fused into the next linear layer, in
bf16 (megatron_amp_O2). The builder needs a process group (one process will do).
"""

import os
import shutil
import tarfile

import torch
import yaml
from checkpoint_scenarios import Payload
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

from nemo_dpo.config import load_config, prepare
from nemo_dpo.data.default_task import DEFAULT_DATA_DIR
from nemo_dpo.data.tokenizer import SentencePieceTokenizer, load_or_train_tokenizer
from nemo_dpo.distributed.init import destroy_distributed, init_distributed
from nemo_dpo.models.gpt import build_gpt, transformer_config
from nemo_dpo.models.init_weights import init_weights
from nemo_dpo.models.sharding import local_to_global_names
from nemo_dpo.training import initial_policy

TOKENIZER_ARTIFACT = "2b1f0c9e8d7a4b6c9e0f1a2b3c4d5e6f_tokenizer.model"
# model_config.yaml of a small megatron-core GPT as NeMo writes it (the keys that matter here, and some that do not).
NEMO_CONFIG = {
    "mcore_gpt": True,
    "micro_batch_size": 4,
    "global_batch_size": 64,
    "tensor_model_parallel_size": 2,
    "pipeline_model_parallel_size": 1,
    "encoder_seq_length": 64,
    "max_position_embeddings": 64,
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "init_method_std": 0.02,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "kv_channels": None,
    "apply_query_key_layer_scaling": True,
    "normalization": "rmsnorm",
    "layernorm_epsilon": 1.0e-5,
    "make_vocab_size_divisible_by": 64,
    "bias": False,
    "activation": "fast-swiglu",
    "position_embedding_type": "rope",
    "rotary_percentage": 1.0,
    "rotary_base": 10000,
    "share_embeddings_and_output_weights": False,
    "transformer_engine": True,
    "megatron_amp_O2": True,
    "precision": "bf16",
    "tokenizer": {"library": "sentencepiece", "type": None, "model": f"nemo:{TOKENIZER_ARTIFACT}",
                  "vocab_file": None, "merge_file": None, "delimiter": None, "sentencepiece_legacy": False},
    "data": {"data_prefix": None, "index_mapping_dir": None},
    "optim": {"name": "distributed_fused_adam", "lr": 2.0e-4},
    "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
    "nemo_version": "1.23.0",
}
# The nemo-dpo keys of that architecture (the vocabulary: the tokenizer's, padded to a multiple of 64 x TP 2).
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.normalization=RMSNorm", "model.activation=swiglu", "model.bias=false",
         "model.share_embeddings_and_output_weights=false", "model.make_vocab_size_divisible_by=128"]
TE_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def sentencepiece_model(cache_dir: str) -> str:
    """The SentencePiece tokenizer of the default task (vocab_size 512), trained once into ``cache_dir``."""
    train = os.path.join(DEFAULT_DATA_DIR, "train.jsonl")
    return load_or_train_tokenizer(None, [train], 512, cache_dir, log=lambda _: None).model_path


def _te_name(name: str) -> str:
    for local, te in TE_NORMS.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def pack(path: str, folder: str) -> None:
    """The tar NeMo makes of a model's folder (uncompressed, members under ``./``)."""
    with tarfile.open(path, "w:") as tar:
        tar.add(folder, arcname=".")


def save_config_only(path: str, cache_dir: str, config_changes=None, members=None, weights_file=True) -> str:
    """A .nemo whose weights file holds nothing (or that has none): enough for what runs before weights are read.
    ``config_changes`` patch model_config.yaml; ``members`` ({archive name: bytes}) adds files."""
    folder = path + ".folder"
    os.makedirs(folder, exist_ok=True)
    shutil.copy(sentencepiece_model(cache_dir), os.path.join(folder, TOKENIZER_ARTIFACT))
    with open(os.path.join(folder, "model_config.yaml"), "w") as f:
        yaml.safe_dump({**NEMO_CONFIG, **(config_changes or {})}, f)
    if weights_file:
        torch.save({}, os.path.join(folder, "model_weights.ckpt"))
    _add_members(folder, members)
    pack(path, folder)
    shutil.rmtree(folder)
    return path


def _add_members(folder: str, members) -> None:
    for name, data in (members or {}).items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def save_nemo(path: str, cache_dir: str, weights: str = "distributed", seed: int = 7, config_changes=None,
              members=None, extra_state=None) -> dict:
    """Write a .nemo of a randomly initialised model; returns its weights ({whole-model name: bf16 tensor}).

    ``weights``: "distributed" (model_weights/) or "state_dict" (model_weights.ckpt). ``config_changes`` patch
    model_config.yaml; ``members`` ({archive name: bytes}) adds or replaces files; ``extra_state``: an object
    stored as every layer's ``_extra_state`` in the distributed checkpoint (transformer-engine keeps pickled
    objects there).
    """
    tokenizer = sentencepiece_model(cache_dir)
    vocab_size = SentencePieceTokenizer(tokenizer).vocab_size
    cfg = load_config("gpt_dpo", [*MODEL, f"model.vocab_size={vocab_size}", f"model.seed={seed}"]).model
    config = transformer_config(cfg)
    model = build_gpt(cfg, cfg.vocab_size, config)
    init_weights(model, config, seed)
    model.to(torch.bfloat16)
    names = local_to_global_names(model, config)
    expected = {names[n]: p.detach().clone() for n, p in model.named_parameters()}

    folder = path + ".folder"
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    shutil.copy(tokenizer, os.path.join(folder, TOKENIZER_ARTIFACT))
    with open(os.path.join(folder, "model_config.yaml"), "w") as f:
        yaml.safe_dump({**NEMO_CONFIG, **(config_changes or {})}, f)
    if weights == "state_dict":
        state = {f"model.{_te_name(k)}": v for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(folder, "model_weights.ckpt"))
    else:
        sharded = model.sharded_state_dict()
        for key in [k for k in sharded if k.endswith("._extra_state")]:
            if extra_state is None:
                del sharded[key]
            else:
                sharded[key].data = extra_state
        replace_prefix_for_sharding(sharded, "", "model.")
        os.makedirs(os.path.join(folder, "model_weights"))
        dist_checkpointing.save(sharded, os.path.join(folder, "model_weights"))
    _add_members(folder, members)
    pack(path, folder)
    shutil.rmtree(folder)
    return expected


def loads_exactly(path: str, cache_dir: str, expected: dict) -> bool:
    """Whether a model built from the .nemo in ``path`` (its config adopted as a run adopts it) holds ``expected``."""
    cfg = load_config("gpt_dpo", [f"pretrained_checkpoint.restore_from_path={path}",
                                  f"model.tokenizer.cache_dir={cache_dir}"])
    prepare(cfg, 1, training=False)
    config = transformer_config(cfg.model)
    model = build_gpt(cfg.model, cfg.model.vocab_size, config)
    initial_policy.load_weights(model, config, cfg.model)
    names = local_to_global_names(model, config)
    loaded = {names[n]: p.detach() for n, p in model.named_parameters()}
    return loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k].float()) for k in loaded)


def distributed_nemo_loads_exactly(path: str, cache_dir: str, marker: str) -> bool:
    """One process: a .nemo with model_weights/ whose layers' _extra_state is a payload creating ``marker`` when
    unpickled, loaded back."""
    init_distributed(1, 1, seed=0)
    try:
        expected = save_nemo(path, cache_dir, "distributed", extra_state=Payload(marker))
        return loads_exactly(path, cache_dir, expected)
    finally:
        destroy_distributed()


def build_in_a_world(path: str, cache_dir: str) -> None:
    """One process: write a distributed-checkpoint .nemo (megatron's save needs a process group)."""
    init_distributed(1, 1, seed=0)
    try:
        save_nemo(path, cache_dir, "distributed")
    finally:
        destroy_distributed()
