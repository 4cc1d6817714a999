"""Build megatron-core GPTModels for this rank's pipeline stage (its model chunks) from the ``model`` config
(dense, or with mixture-of-experts layers: models/moe.py)."""

import math
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dpo.distributed import layout
from nemo_dpo.models.activations import ActivationRecomputingMLP, SwiGLU
from nemo_dpo.models.attention import SDPAttention, release_after_projection
from nemo_dpo.models.moe import build_moe_spec, split_tokens_over_tp
from nemo_dpo.models import fusion
from nemo_dpo.models.norm import FusedTorchNorm, TorchNorm, recompute_norms, use_torch_norm
from nemo_dpo.models.rope_scaling import attention_factor, check_rope_scaling, inverse_frequencies
from nemo_dpo.ranges import Either, Flag, Integer, ListOf, Mapping, OneOf, Real

try:  # transformer-engine is an optional GPU accelerator.
    import transformer_engine  # noqa: F401

    HAVE_TE = torch.cuda.is_available()
except ImportError:
    HAVE_TE = False

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
# gelu_tanh is GPT-2's "gelu_new" (the tanh approximation).
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "swiglu": F.silu,
}
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
# What model.recompute_modules may name: the dense SwiGLU's output (swiglu, models/activations.py), the norms'
# outputs (layernorm, models/norm.py: megatron's name, our implementation, which runs without transformer-engine),
# and megatron's selective recomputation of core attention or the whole dense MLP.
RECOMPUTE_MODULES = ("swiglu", "layernorm", "core_attn", "mlp")
OURS_TO_RECOMPUTE = ("swiglu", "layernorm")  # applied by the layer spec, not passed to megatron
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

SIZE = Integer(ge=1)
DROPOUT = Real(ge=0, lt=1)
RANGES = {
    "trainer.precision": OneOf(choices=tuple(PRECISIONS)),
    "model.encoder_seq_length": SIZE,
    "model.max_position_embeddings": SIZE,
    "model.num_layers": SIZE,
    "model.hidden_size": SIZE,
    "model.ffn_hidden_size": SIZE,
    "model.num_attention_heads": SIZE,
    "model.num_query_groups": Integer(ge=1, nullable=True),
    "model.position_embedding_type": OneOf(choices=POSITION_EMBEDDINGS),
    "model.rotary_base": Real(gt=0),
    "model.normalization": OneOf(choices=NORMALIZATIONS),
    "model.layernorm_epsilon": Real(gt=0),
    "model.activation": OneOf(choices=tuple(ACTIVATIONS)),
    "model.bias": Flag(),
    "model.share_embeddings_and_output_weights": Flag(),
    "model.hidden_dropout": DROPOUT,
    "model.attention_dropout": DROPOUT,
    "model.init_method_std": Real(gt=0),
    "model.activations_checkpoint_granularity": OneOf(choices=("selective", "full"), nullable=True),
    "model.activations_checkpoint_method": OneOf(choices=("uniform", "block")),
    "model.activations_checkpoint_num_layers": SIZE,
    "model.recompute_modules": Either(
        first=OneOf(choices=("auto",)), first_is="the cheap elementwise recomputations that apply to the model",
        second=ListOf(each=OneOf(choices=RECOMPUTE_MODULES), distinct=True), second_is="these", nullable=True),
    "model.vocab_size": Integer(ge=1, nullable=True),
    "model.make_vocab_size_divisible_by": SIZE,
    "model.sequence_parallel": Flag(),
    "model.kv_channels": Integer(ge=1, nullable=True),
    "model.qkv_bias": Flag(),
    "model.qk_layernorm": Flag(),
    "model.rope_scaling": Mapping(what="Hugging Face rope_parameters (models/rope_scaling.py)", nullable=True),
    "model.num_moe_experts": Integer(ge=1, nullable=True),
    "model.moe_router_topk": SIZE,
    "model.moe_ffn_hidden_size": Integer(ge=1, nullable=True),
    "model.moe_router_pre_softmax": Flag(),
    "model.moe_aux_loss_coeff": Real(ge=0, nullable=True),
}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up so every TP rank holds an equal slice.

    The result does not depend on TP (only checked against it), so the same
    model has the same shapes at every layout; padded ids get no probability
    (see losses/logprobs.py).
    """
    if divisible_by % tp != 0:
        raise ValueError(
            f"model.make_vocab_size_divisible_by ({divisible_by}) must be divisible by "
            f"model.tensor_model_parallel_size ({tp})"
        )
    return -(-vocab_size // divisible_by) * divisible_by


def check_model_config(model_cfg) -> None:
    """Reject shapes megatron would fail on later, naming the keys involved (each key is in its range already)."""
    tp = model_cfg.tensor_model_parallel_size
    pp = model_cfg.pipeline_model_parallel_size
    heads = model_cfg.num_attention_heads
    groups = model_cfg.num_query_groups or heads
    if model_cfg.kv_channels is None and model_cfg.hidden_size % heads != 0:
        raise ValueError(
            f"model.hidden_size ({model_cfg.hidden_size}) is not divisible by "
            f"model.num_attention_heads ({heads}); set model.kv_channels to give the head size"
        )
    if model_cfg.position_embedding_type == "rope" and head_dim(model_cfg) % 2:
        raise ValueError(
            f"RoPE rotates pairs of channels: the head size must be even, got {head_dim(model_cfg)} "
            f"(model.kv_channels={model_cfg.kv_channels}, model.hidden_size={model_cfg.hidden_size}, "
            f"model.num_attention_heads={heads})"
        )
    if heads % tp != 0:
        raise ValueError(
            f"model.num_attention_heads ({heads}) is not divisible by "
            f"model.tensor_model_parallel_size ({tp})"
        )
    if heads % groups != 0 or groups % tp != 0:
        raise ValueError(
            f"model.num_query_groups ({groups}) must divide model.num_attention_heads ({heads}) "
            f"and be divisible by model.tensor_model_parallel_size ({tp})"
        )
    if model_cfg.ffn_hidden_size % tp != 0:
        raise ValueError(
            f"model.ffn_hidden_size ({model_cfg.ffn_hidden_size}) is not divisible by "
            f"model.tensor_model_parallel_size ({tp})"
        )
    if model_cfg.num_layers % pp != 0:
        raise ValueError(
            f"model.num_layers ({model_cfg.num_layers}) is not divisible by "
            f"model.pipeline_model_parallel_size ({pp})"
        )
    check_long_context(model_cfg)
    padded_vocab_size(1, model_cfg.make_vocab_size_divisible_by, tp)  # checks divisibility by TP
    check_experts(model_cfg)
    if model_cfg.encoder_seq_length > model_cfg.max_position_embeddings:
        raise ValueError(
            f"model.encoder_seq_length ({model_cfg.encoder_seq_length}) exceeds "
            f"model.max_position_embeddings ({model_cfg.max_position_embeddings})"
        )
    check_rope_scaling(model_cfg)
    check_recompute(model_cfg)


def recompute_modules(model_cfg) -> list:
    """``model.recompute_modules`` as a list. ``auto`` (the default): the elementwise outputs that are cheap to
    recompute and that the layer spec can release: the norms' (``layernorm``), and the SwiGLU's where the MLP is
    a dense SwiGLU (``swiglu``). They cost one norm or activation forward per layer in backward (under 1% of the
    bench's step) for a [tokens, hidden] tensor per norm and a [tokens, ffn] tensor per layer."""
    setting = model_cfg.recompute_modules
    if setting == "auto":
        dense_swiglu = model_cfg.activation == "swiglu" and model_cfg.num_moe_experts is None
        return ["swiglu", "layernorm"] if dense_swiglu else ["layernorm"]
    return list(setting or [])


def check_recompute(model_cfg) -> None:
    """``swiglu`` and ``mlp`` in ``model.recompute_modules`` need the dense MLP they recompute."""
    modules = recompute_modules(model_cfg)
    if "swiglu" in modules and model_cfg.activation != "swiglu":
        raise ValueError(f"model.recompute_modules names swiglu, but model.activation is {model_cfg.activation!r}")
    dense_only = [m for m in modules if m in ("swiglu", "mlp")]
    if dense_only and model_cfg.num_moe_experts is not None:
        raise ValueError(f"model.recompute_modules: {dense_only} recompute the dense MLP, and "
                         f"model.num_moe_experts={model_cfg.num_moe_experts} has experts in its place")


def check_experts(model_cfg) -> None:
    """Mixture-of-experts keys against each other and the layout (each key is in its range already)."""
    experts, ep = model_cfg.num_moe_experts, model_cfg.expert_model_parallel_size
    if experts is None:
        if ep > 1:
            raise ValueError(
                f"model.expert_model_parallel_size={ep} needs a mixture-of-experts model (model.num_moe_experts)"
            )
        return
    if model_cfg.moe_router_topk > experts:
        raise ValueError(
            f"model.moe_router_topk ({model_cfg.moe_router_topk}) exceeds model.num_moe_experts ({experts})"
        )
    if experts % ep != 0:
        raise ValueError(
            f"model.num_moe_experts ({experts}) is not divisible by model.expert_model_parallel_size ({ep})"
        )
    expert_ffn = model_cfg.moe_ffn_hidden_size or model_cfg.ffn_hidden_size
    if expert_ffn % model_cfg.tensor_model_parallel_size != 0:
        raise ValueError(
            f"the experts' hidden size {expert_ffn} (model.moe_ffn_hidden_size, or model.ffn_hidden_size when null) "
            f"is not divisible by model.tensor_model_parallel_size ({model_cfg.tensor_model_parallel_size})"
        )
    if model_cfg.bias:
        raise ValueError("model.bias=true with model.num_moe_experts: megatron's experts and router take no biases here")


def moe_settings(model_cfg) -> dict:
    """TransformerConfig's mixture-of-experts fields; none for a dense model."""
    if model_cfg.num_moe_experts is None:
        return {}
    return {
        "num_moe_experts": model_cfg.num_moe_experts,
        "moe_router_topk": model_cfg.moe_router_topk,
        "moe_ffn_hidden_size": model_cfg.moe_ffn_hidden_size or model_cfg.ffn_hidden_size,
        "moe_router_pre_softmax": model_cfg.moe_router_pre_softmax,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": model_cfg.moe_aux_loss_coeff or 0.0,
        "moe_router_dtype": "fp32",  # routing decisions in fp32 whatever the weights' precision
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": HAVE_TE,
        "expert_model_parallel_size": model_cfg.expert_model_parallel_size,
    }


def head_dim(model_cfg) -> int:
    """Channels per attention head: ``model.kv_channels``, or hidden_size / num_attention_heads when null."""
    return model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads


def check_long_context(model_cfg) -> None:
    """Context and sequence parallelism and the interleaved pipeline: what each needs (ValueError naming the keys)."""
    tp, pp = model_cfg.tensor_model_parallel_size, model_cfg.pipeline_model_parallel_size
    cp, vpp = model_cfg.context_parallel_size, model_cfg.virtual_pipeline_model_parallel_size
    if model_cfg.encoder_seq_length % (2 * cp) != 0:
        raise ValueError(
            f"model.encoder_seq_length ({model_cfg.encoder_seq_length}) is not divisible by 2 x "
            f"model.context_parallel_size ({cp}) = {2 * cp}: context parallelism cuts every sequence into 2 x CP chunks"
        )
    if cp > 1 and not HAVE_TE and torch.cuda.is_available():
        raise ValueError(
            f"model.context_parallel_size={cp} on GPU needs transformer-engine's attention (pip install "
            "transformer-engine); the local attention's ring attention runs on CPU only"
        )
    if cp > 1 and not HAVE_TE and model_cfg.attention_dropout > 0:
        raise ValueError(
            f"model.context_parallel_size={cp} without transformer-engine is ring attention, which has no attention "
            f"dropout: model.attention_dropout must be 0, got {model_cfg.attention_dropout}"
        )
    if model_cfg.sequence_parallel and tp == 1:
        raise ValueError("model.sequence_parallel=true needs model.tensor_model_parallel_size > 1 (it splits the "
                         "activations outside the tensor-parallel layers over the TP ranks)")
    if vpp is not None and pp == 1:
        raise ValueError(f"model.virtual_pipeline_model_parallel_size={vpp} needs model.pipeline_model_parallel_size > 1")
    if vpp is not None and model_cfg.num_layers % (pp * vpp) != 0:
        raise ValueError(
            f"model.num_layers ({model_cfg.num_layers}) is not divisible by model.pipeline_model_parallel_size ({pp}) "
            f"x model.virtual_pipeline_model_parallel_size ({vpp}) = {pp * vpp} (layers per model chunk)"
        )


def transformer_config(model_cfg, precision: str = "fp32", finalize_model_grads_func=None) -> TransformerConfig:
    """Translate the NeMo-style ``model`` keys into megatron's TransformerConfig.

    ``precision`` bf16: bf16 weights, activations and matmuls (fp32 master weights
    live in the optimizer). Fusions that need apex/TE or CUDA kernels are off
    unless TE is present.
    """
    swiglu = model_cfg.activation == "swiglu"
    interleaved = model_cfg.virtual_pipeline_model_parallel_size is not None
    dtype = PRECISIONS[precision]
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        kv_channels=head_dim(model_cfg),
        add_qkv_bias=model_cfg.qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        # YaRN multiplies RoPE's cos and sin by m, so q.k by m^2 (models/rope_scaling.py); 1 otherwise.
        softmax_scale=attention_factor(model_cfg.rope_scaling) ** 2 / math.sqrt(head_dim(model_cfg)),
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=ACTIVATIONS[model_cfg.activation],
        add_bias_linear=model_cfg.bias,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=model_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=model_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=model_cfg.virtual_pipeline_model_parallel_size,
        # Interleaved, a rank sends activations and gradients to the same neighbour at once: megatron-LM's
        # overlapped, unbatched p2p orders those so that each arrives where the other side expects it.
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        context_parallel_size=model_cfg.context_parallel_size,
        sequence_parallel=model_cfg.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=precision == "bf16",
        # megatron's own init also tags TP-split weights (partition dim, stride), which
        # sharding, DDP and the grad norm rely on; models/init_weights.py then overwrites
        # the values with the layout-independent draw.
        perform_initialization=True,
        use_cpu_initialization=False,
        bias_activation_fusion=HAVE_TE and model_cfg.bias and model_cfg.activation != "gelu_tanh",
        # The local spec's MLP takes its SwiGLU as a module (models/activations.py) through this hook.
        use_te_activation_func=not HAVE_TE and swiglu,
        bias_dropout_fusion=HAVE_TE,
        masked_softmax_fusion=HAVE_TE,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        finalize_model_grads_func=finalize_model_grads_func,
        **recompute_settings(model_cfg),
        **moe_settings(model_cfg),
    )


def recompute_settings(model_cfg) -> dict:
    """NeMo's activations_checkpoint_* keys and ``model.recompute_modules`` as megatron's recompute settings.

    ``selective`` is NeMo's: core attention recomputed; ``recompute_modules`` adds to it (or stands alone
    without a granularity). ``swiglu`` and ``layernorm`` are not megatron's: the layer spec applies them
    (ActivationRecomputingMLP, NormRecomputingTransformerLayer).
    Under ``full`` whole layers are recomputed and ``recompute_modules`` has nothing left to do.
    """
    granularity = model_cfg.activations_checkpoint_granularity
    if granularity == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": model_cfg.activations_checkpoint_method,
            "recompute_num_layers": model_cfg.activations_checkpoint_num_layers,
        }
    modules = [m for m in recompute_modules(model_cfg) if m not in OURS_TO_RECOMPUTE]
    if granularity == "selective" and "core_attn" not in modules:
        modules = ["core_attn", *modules]
    return {"recompute_granularity": "selective", "recompute_modules": modules} if modules else {}


def _layer_spec(model_cfg, config: TransformerConfig):
    """One transformer layer's spec: transformer-engine's on GPU; else the local spec with PyTorch's fused
    attention, SwiGLU as a module and norms that also run under sequence parallelism (models/attention.py,
    activations.py, norm.py), the norms, SwiGLU and RoPE compiled where ``model.fused_elementwise`` says
    (models/fusion.py). With ``num_moe_experts`` its MLP is megatron's MoE layer (models/moe.py)."""
    experts = model_cfg.num_moe_experts
    if HAVE_TE:
        layer_spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=experts is not None, qk_layernorm=model_cfg.qk_layernorm
        )
    else:
        layer_spec = get_gpt_layer_local_spec(
            num_experts=experts, normalization=model_cfg.normalization, qk_layernorm=model_cfg.qk_layernorm
        )
        layer_spec.submodules.self_attention.submodules.core_attention = SDPAttention
        if fusion.fuses_rope(model_cfg):
            layer_spec.submodules.self_attention.module = fusion.FusedRotarySelfAttention
        fused = fusion.wanted(model_cfg)
        norm = local_norm(model_cfg)
        use_torch_norm(layer_spec.submodules, norm)
        use_torch_norm(layer_spec.submodules.self_attention.submodules, norm)
        if recomputes(model_cfg, "layernorm"):
            recompute_norms(layer_spec)
    activation = (fusion.FusedSwiGLU if fused else SwiGLU) if config.use_te_activation_func else None
    if experts is not None:
        layer_spec.submodules.mlp = build_moe_spec(layer_spec.submodules.mlp, activation)
    elif activation is not None:
        layer_spec.submodules.mlp.submodules.activation_func = activation
        if recomputes(model_cfg, "swiglu"):
            layer_spec.submodules.mlp.module = ActivationRecomputingMLP
    return layer_spec


def local_norm(model_cfg):
    """The local spec's norm: compiled where ``model.fused_elementwise`` says (models/norm.py, fusion.py)."""
    return FusedTorchNorm if fusion.wanted(model_cfg) else TorchNorm


def recomputes(model_cfg, module: str) -> bool:
    """Whether the layer spec recomputes ``module`` (one of :data:`OURS_TO_RECOMPUTE`) in backward: named in
    ``model.recompute_modules`` (check_recompute allows ``swiglu`` only with a SwiGLU MLP), and not under full
    recomputation, which recomputes the whole layer."""
    return module in recompute_modules(model_cfg) and model_cfg.activations_checkpoint_granularity != "full"


def build_gpt(model_cfg, vocab_size: int, config: TransformerConfig, vp_stage: int = None) -> GPTModel:
    """The GPTModel for this pipeline stage, or for its model chunk ``vp_stage`` under the interleaved schedule
    (embedding on the first, output layer on the last)."""
    experts = model_cfg.num_moe_experts
    spec = _layer_spec(model_cfg, config)
    if not HAVE_TE:
        layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        # The final norm feeds the output layer, which runs outside the layers: never released.
        spec = TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=local_norm(model_cfg))
    tp = model_cfg.tensor_model_parallel_size
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, model_cfg.make_vocab_size_divisible_by, tp),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=layout.current().chunk_is_first(vp_stage or 0),
        post_process=layout.current().chunk_is_last(vp_stage or 0),
        parallel_output=True,  # logits stay vocab-parallel: log-probs never gather them
        share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
        position_embedding_type=model_cfg.position_embedding_type,
        rotary_base=model_cfg.rotary_base,
        vp_stage=vp_stage,
    )
    if model_cfg.position_embedding_type == "rope":  # scaled as model.rope_scaling says (unscaled: megatron's own)
        rotary = model.rotary_pos_emb
        frequencies = inverse_frequencies(config.kv_channels, model_cfg.rotary_base, model_cfg.rope_scaling)
        rotary.inv_freq = frequencies.to(rotary.inv_freq.device)
        if config.context_parallel_size == 1:
            rope_at_position_ids(model)
    if experts is not None and not config.sequence_parallel:  # under SP the MoE layers get their share already
        split_tokens_over_tp(model)
    recomputes_attention = config.recompute_granularity == "full" or (
        config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules)
    if not HAVE_TE and not recomputes_attention:
        for layer in model.decoder.layers:
            release_after_projection(layer.self_attention)
    return model


def rope_at_position_ids(model: GPTModel) -> None:
    """RoPE in a packed row at each token's position id, rather than restarting at every ``cu_seqlens`` bound.

    megatron rotates a packed (``thd``) row sequence by sequence from position 0,
    unless the rotary table it is given has a row per token of the packed row: then
    it rotates each token by its own row (megatron's "exact mapping" of
    ``_apply_rotary_pos_emb_thd``). This gives it that table, the model's
    ``position_ids`` looked up in megatron's own, in one gather. A row with shared
    prompts needs it (its rejected responses continue from their prompt, which
    precedes the chosen response in the row, data/batching.py); a packed row
    without sharing gets the same rotation as megatron's, from one lookup instead of
    one per sequence. Rows that are not packed, and context parallelism (whose
    ranks hold parts of sequences), keep megatron's table.
    """
    rotary, state = model.rotary_pos_emb, {}
    table = rotary.forward  # megatron's: the first n positions (cached)

    def note_positions(module, args, kwargs):
        packed = kwargs.get("packed_seq_params")
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        state["positions"] = positions.reshape(-1) if packed is not None and positions is not None else None

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        positions = state.get("positions")
        if not packed_seq or positions is None:
            return table(max_seq_len, offset, packed_seq, cp_group)
        return table(int(positions.max()) + 1).index_select(0, positions)

    model.register_forward_pre_hook(note_positions, with_kwargs=True)
    rotary.forward = forward


def build_model_chunks(model_cfg, vocab_size: int, config: TransformerConfig) -> list:
    """This rank's model chunks: its stage's GPTModel, or one per virtual stage under the interleaved schedule."""
    vpp = model_cfg.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_gpt(model_cfg, vocab_size, config)]
    return [build_gpt(model_cfg, vocab_size, config, vp_stage) for vp_stage in range(vpp)]


def _pass_hidden_states(input_, weight=None, runtime_gather_output=None):
    return input_, None


def _gather_hidden_states(input_, weight=None, runtime_gather_output=None):
    # The backward keeps this rank's slice of the gradient, which chunked_log_probs has summed over TP.
    return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False), None


def emit_hidden_states(model: GPTModel) -> None:
    """Make the last stage return its final hidden states in place of logits.

    For chunked log-probs (losses/logprobs.py), which apply the output layer
    themselves; the output layer keeps its parameters (and checkpoint entries).
    Under sequence parallelism the states are gathered to the whole sequence on
    every TP rank, as the output layer would gather them.
    """
    if model.post_process:
        sequence_parallel = model.config.sequence_parallel
        model.output_layer.forward = _gather_hidden_states if sequence_parallel else _pass_hidden_states


def output_weight(model: GPTModel) -> torch.Tensor:
    """The output layer's weight on the last stage (the word embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def unwrap(model) -> GPTModel:
    """The GPTModel inside megatron's wrappers (DDP, Float16Module)."""
    while not isinstance(model, GPTModel):
        model = model.module
    return model
