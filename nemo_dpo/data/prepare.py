"""``python -m nemo_dpo.data.prepare``: the entry point named in the README; the program is nemo_dpo/cli/prepare.py."""

import sys

from nemo_dpo.cli.prepare import build_parser, main  # noqa: F401  (build_parser: the README's commands are checked with it)

if __name__ == "__main__":
    sys.exit(main())
