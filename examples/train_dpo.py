"""Train a GPT with DPO (or IPO / RPO) on megatron-core: ``torchrun ... examples/train_dpo.py [overrides]``.

The program is nemo_dpo/cli/train.py (``--help`` shows its usage); this file is
the launch script the README, the Slurm template and the Dockerfile name.
"""

import sys

from nemo_dpo.cli.train import build_parser, main  # noqa: F401  (build_parser: the README's commands are checked with it)

if __name__ == "__main__":
    sys.exit(main())
