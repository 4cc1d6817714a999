"""config.json's RoPE fields <-> ``model.rotary_base`` and ``model.rope_scaling``, for every RoPE family.

transformers spells them two ways: v4's top-level ``rope_theta`` with a
``rope_scaling`` dict, and v5's ``rope_parameters`` holding both (``rope_scaling``
wins when a config has both, as in transformers). Reading fills in what
transformers fills in (``original_max_position_embeddings`` defaults to
``max_position_embeddings``, a YaRN factor to their ratio), so the stored
``model.rope_scaling`` says exactly what models/rope_scaling.py computes;
writing uses v4's spelling, which both versions read. Scalings that depend on
the sequence length at run time (dynamic, longrope) and partial rotary are
refused.
"""

from nemo_dpo.models.hf.family import config_value, not_supported
from nemo_dpo.models.rope_scaling import KEYS

DEFAULT_THETA = 10000.0


def _rope_fields(hf_config: dict) -> tuple[str, dict]:
    for key in ("rope_scaling", "rope_parameters"):
        if hf_config.get(key):
            if not isinstance(hf_config[key], dict):
                raise not_supported(key, hf_config[key], "expected an object")
            return key, dict(hf_config[key])
    return "rope_parameters", {}


def rope_settings(hf_config: dict) -> dict:
    """``rotary_base`` and ``rope_scaling`` for the ``model`` section; refuses RoPE that would compute otherwise."""
    key, params = _rope_fields(hf_config)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise not_supported("partial_rotary_factor", partial, "RoPE must cover the whole head")
    theta = params.pop("rope_theta", hf_config.get("rope_theta", DEFAULT_THETA))
    if theta != int(theta):
        raise not_supported("rope_theta", theta, "model.rotary_base is an integer")
    if rope_type == "default":
        return {"rotary_base": int(theta), "rope_scaling": None}
    if rope_type not in KEYS:
        raise not_supported(f"{key}.rope_type", rope_type, f"supported: default, {', '.join(KEYS)}")
    required, optional = KEYS[rope_type]
    if "original_max_position_embeddings" in required:
        original = hf_config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = original or config_value(hf_config, "max_position_embeddings", int)
    if rope_type == "yarn" and params.get("factor") is None:
        max_positions = config_value(hf_config, "max_position_embeddings", int)
        params["factor"] = max_positions / params["original_max_position_embeddings"]
    unknown = sorted(set(params) - required - optional)
    if unknown:
        why = f"rope_type {rope_type!r} takes {sorted(required | optional)}"
        raise not_supported(f"{key}.{unknown[0]}", params[unknown[0]], why)
    missing = sorted(required - {k for k, v in params.items() if v is not None})
    if missing:
        raise ValueError(f"config.json: {key} of rope_type {rope_type!r} lacks {missing}")
    return {"rotary_base": int(theta), "rope_scaling": {"rope_type": rope_type, **params}}


def rope_config(model_cfg) -> dict:
    """config.json's RoPE fields for ``model_cfg``."""
    scaling = model_cfg["rope_scaling"]
    return {
        "rope_theta": float(model_cfg["rotary_base"]),
        "rope_scaling": None if scaling is None else dict(scaling),
    }
