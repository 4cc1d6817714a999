"""``python -m nemo_dpo.plot``: the entry point named in the README; the program is nemo_dpo/cli/plot.py."""

import sys

from nemo_dpo.cli.plot import build_parser, main  # noqa: F401  (build_parser: the README's commands are checked with it)

if __name__ == "__main__":
    sys.exit(main())
