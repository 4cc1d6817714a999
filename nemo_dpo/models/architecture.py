"""The ``model`` config keys that belong to the weights rather than to a run.

A key is an architecture key when it defines the weights' shapes or meaning:
built with another value, a model either cannot load the weights (layers,
widths, heads and their size, biases, query/key norms, vocabulary and its
padding, the learned position table, the experts and their size) or computes a
different function with them (normalisation, activation, RoPE theta and
scaling, epsilon, tied embeddings, the positions RoPE was trained for, how
many experts a token goes to and how their weights are normalised). So these
keys go wherever the weights go: a checkpoint that differs in one of them is
refused (training/checkpoint.py), starting from a checkpoint copies them into
the run's config (training/initial_policy.py), and a Hugging Face adapter may
set no other key (models/hf/). Everything else (batching, optimizer, parallel
layout, expert parallelism included, dropout) is the run's own choice; so is
the weight of the routers' load-balancing loss (``model.moe_aux_loss_coeff``),
which training/initial_policy.py takes from the source when it is null.

Checkpoints written before a key existed do not record it; they were made
with the value that reproduces the model as it was then (no experts, no
query/key norms, ...), which :data:`VALUE_WHEN_ABSENT` names, so old
checkpoints still start and resume runs.
"""

ARCHITECTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "position_embedding_type",
    "max_position_embeddings",
    "normalization",
    "activation",
    "bias",
    "qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "rotary_base",
    "rope_scaling",
    "layernorm_epsilon",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_router_pre_softmax",
)

# Keys added after the first checkpoints were written: the value a checkpoint without the key was made with.
VALUE_WHEN_ABSENT = {
    "kv_channels": None,
    "qkv_bias": False,
    "qk_layernorm": False,
    "rope_scaling": None,
    "num_moe_experts": None,
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": None,
    "moe_router_pre_softmax": False,
}


def saved_architecture(saved_model_cfg: dict) -> dict:
    """``{key: value}`` of every architecture key in a saved ``model`` config (absent keys as they were made);
    raises KeyError naming a key that is absent and has no such value."""
    settings = {}
    for key in ARCHITECTURE_KEYS:
        if key in saved_model_cfg:
            settings[key] = saved_model_cfg[key]
        elif key in VALUE_WHEN_ABSENT:
            settings[key] = VALUE_WHEN_ABSENT[key]
        else:
            raise KeyError(f"model.{key}")
    return settings
