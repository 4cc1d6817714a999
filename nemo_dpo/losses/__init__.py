"""Preference losses behind one interface, chosen by ``model.dpo.preference_loss``.

A loss object is called once per microbatch with the policy's and the
reference's per-sequence response log-prob sums, the response token counts and
the data's rewards, and returns ``(loss, stats)``. It declares what it needs
(``needs_reference``) and what it logs (``statistics``, see statistics.py), so
the training step works with any of them. Adding a loss: its module here, its
names in :data:`LOSSES`, its options as ``model.dpo`` keys in conf/gpt_dpo.yaml.
"""

from nemo_dpo.losses.preference import PREFERENCE_LOSSES, PreferenceLoss

# model.dpo.preference_loss -> the loss class (built from the model.dpo section by its from_cfg)
LOSSES = {name: PreferenceLoss for name in PREFERENCE_LOSSES}


def build_loss(dpo_cfg):
    """The loss ``model.dpo`` asks for (ValueError naming the key for an unknown name or a bad option)."""
    name = dpo_cfg.preference_loss
    if name not in LOSSES:
        raise ValueError(f"model.dpo.preference_loss must be one of {list(LOSSES)}, got {name!r}")
    return LOSSES[name].from_cfg(dpo_cfg)
