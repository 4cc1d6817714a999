"""nemo-dpo: DPO, IPO and RPO training of tensor-, pipeline- and data-parallel GPTs on megatron-core."""

import warnings

# megatron-core warns at import time when the optional GPU accelerators are absent;
# on CPU that is expected, and the fallbacks it names are the ones we use.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
