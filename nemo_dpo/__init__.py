"""nemo-dpo: DPO, IPO and RPO training of tensor-, pipeline- and data-parallel GPTs on megatron-core."""

import warnings

# megatron-core warns when the optional GPU accelerators are absent (expected on CPU:
# the fallbacks it names are the ones we use) and about its own config defaults.
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    # torch's DCP, called by megatron's dist_checkpointing, about its own internals.
    "Please use DTensor instead",
    "`load_state_dict` is deprecated",
):
    warnings.filterwarnings("ignore", message=_message)

__version__ = "0.1.0"
