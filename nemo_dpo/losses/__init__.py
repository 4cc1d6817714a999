"""Preference losses behind one interface, chosen by ``model.dpo.preference_loss``.

A loss object is called once per microbatch with per-sequence values of the
policy and (unless it is reference-free) of the reference, the response token
counts and the data's rewards, and returns ``(loss, stats)`` (base.py). It
declares what it needs (``policy_values``, ``reference_values``,
``needs_reference``) and what it logs (``statistics``, see statistics.py), so
the training step works with any of them. Adding a loss: its function or class
(preference.py for the paired losses with a reference, reference_free.py for the
reference-free ones, kto.py for KTO's unpaired examples), its name in :data:`LOSSES`, its options as ``model.dpo`` keys in
conf/gpt_dpo.yaml with their checks in ``PreferenceLossConfig``.
"""

from nemo_dpo.losses.kto import LOSSES as KTO_LOSSES
from nemo_dpo.losses.preference import PREFERENCE_LOSSES, PreferenceLoss, PreferenceLossConfig
from nemo_dpo.losses.reference_free import LOSSES as REFERENCE_FREE_LOSSES

# model.dpo.preference_loss -> the loss class; a list of names is a mixture of paired losses (PreferenceLoss)
LOSSES = {**{name: PreferenceLoss for name in PREFERENCE_LOSSES}, **REFERENCE_FREE_LOSSES, **KTO_LOSSES}


def build_loss(dpo_cfg):
    """The loss ``model.dpo`` asks for (ValueError naming the key for an unknown name or a bad option)."""
    cfg = PreferenceLossConfig.from_cfg(dpo_cfg)
    return LOSSES[cfg.names[0]](cfg)
