"""RoPE for long context: Hugging Face's scaled inverse frequencies (linear, llama3, yarn), given to megatron.

Llama 3.1+, Qwen2.5 and others stretch RoPE past the length they were
pretrained on by changing its inverse frequencies; YaRN also multiplies cos and
sin by an attention factor. ``model.rope_scaling`` holds the checkpoint's own
``rope_parameters`` (``rope_type`` and that type's keys, by Hugging Face's
names), and this module computes what transformers computes from them.
megatron-core 0.16 cannot take those parameters as they are: its Llama 3
scaling fixes low_freq_factor 1, high_freq_factor 4 and an original length of
8192, its linear scaling divides positions where transformers divides
frequencies, and its YaRN embedding reads settings that TransformerConfig does
not have. So models/gpt.py builds megatron's plain RotaryEmbedding and replaces
its frequencies with :func:`inverse_frequencies`. YaRN's factor m on cos and
sin scales both the rotated query and key, so q.k by m^2: models/gpt.py folds
it into the attention's softmax scale (:func:`attention_factor`).
"""

import math

import torch

# rope_type -> (required keys, optional keys) of model.rope_scaling, as in Hugging Face's rope_parameters.
KEYS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    ),
}


def _number(scaling, key: str, positive: bool = True) -> float:
    value = scaling.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise ValueError(f"model.rope_scaling.{key} must be a {'positive ' if positive else ''}number, got {value!r}")
    return value


def check_rope_scaling(model_cfg) -> None:
    """``model.rope_scaling`` is null or a known ``rope_type`` with exactly its keys (ValueError naming the key)."""
    scaling = model_cfg.rope_scaling
    if scaling is None:
        return
    if not hasattr(scaling, "keys") or scaling.get("rope_type") not in KEYS:
        got = scaling.get("rope_type") if hasattr(scaling, "keys") else scaling
        raise ValueError(
            f"model.rope_scaling: rope_type must be one of {list(KEYS)} (or rope_scaling null), got {got!r}"
        )
    rope_type = scaling["rope_type"]
    if model_cfg.position_embedding_type != "rope":
        raise ValueError(
            f"model.rope_scaling.rope_type={rope_type!r} needs model.position_embedding_type='rope', "
            f"got {model_cfg.position_embedding_type!r}"
        )
    required, optional = KEYS[rope_type]
    keys = set(scaling.keys()) - {"rope_type"}
    if not required <= keys <= required | optional:
        raise ValueError(
            f"model.rope_scaling: rope_type {rope_type!r} takes {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else "")
            + f"; got {sorted(keys)}"
        )
    if _number(scaling, "factor") < 1:
        raise ValueError(f"model.rope_scaling.factor must be >= 1, got {scaling['factor']!r}")
    for key in keys - {"factor", "truncate"}:
        if scaling[key] is not None:
            _number(scaling, key, positive=key not in ("mscale", "mscale_all_dim"))
    if rope_type == "llama3" and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise ValueError(
            f"model.rope_scaling: low_freq_factor ({scaling['low_freq_factor']}) must be below "
            f"high_freq_factor ({scaling['high_freq_factor']})"
        )
    if not isinstance(scaling.get("truncate", True), bool):
        raise ValueError(f"model.rope_scaling.truncate must be true or false, got {scaling['truncate']!r}")


def _plain(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Wavelengths beyond original/low_freq_factor are stretched by factor, those below original/high_freq_factor
    kept, and those in between interpolated smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * stretched / factor + smooth * stretched
    medium = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(medium, smoothed, stretched)


def _yarn(head_dim: int, base: float, scaling) -> torch.Tensor:
    """Dimensions that turn more than beta_fast times over the original length keep their frequency, those
    turning fewer than beta_slow times are divided by factor, with a linear ramp between."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension(rotations):  # the dimension whose wavelength fits ``rotations`` times into the original length
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    periods = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return (1.0 / (factor * periods)) * (1 - keep) + (1.0 / periods) * keep


def inverse_frequencies(head_dim: int, base: float, scaling) -> torch.Tensor:
    """RoPE's [head_dim / 2] inverse frequencies for theta ``base`` under ``model.rope_scaling``."""
    base = float(base)
    if scaling is None:
        return _plain(head_dim, base)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return _plain(head_dim, base) / scaling["factor"]
    if rope_type == "llama3":
        return _llama3(_plain(head_dim, base), scaling)
    return _yarn(head_dim, base, scaling)


def _yarn_magnitude(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor (given, or from factor and mscale), else 1."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_magnitude(factor, mscale) / _yarn_magnitude(factor, mscale_all_dim)
    return _yarn_magnitude(factor)
