"""A run's log dir, where everything it writes goes (metrics, config, checkpoints, caches), and whether it can.

The log dir is ``exp_manager.explicit_log_dir``, or ``./runs/<name>``. One that
cannot be created or written (a read-only filesystem, no permission, a file in
the way) would otherwise fail only after data, tokenizer and model are built;
:func:`check_log_dir` finds out before, without creating anything.
"""

import os
import tempfile

from nemo_dpo.ranges import FilePath, Text

RANGES = {
    "name": Text(),
    "exp_manager.explicit_log_dir": FilePath(nullable=True),
}


def log_dir(cfg) -> str:
    return cfg.exp_manager.explicit_log_dir or os.path.join("runs", cfg.name)


def check_log_dir(cfg) -> None:
    """The log dir is a folder this process can write, or can be made one (ValueError naming the path and why)."""
    path = log_dir(cfg)
    where = path if cfg.exp_manager.explicit_log_dir else f"{path} (exp_manager.explicit_log_dir is null: runs/<name>)"
    folder = os.path.abspath(path)
    while not os.path.exists(folder):  # the folder the missing ones would be created in
        folder = os.path.dirname(folder)
    reason = None
    if not os.path.isdir(folder):
        reason = "a file, not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=folder):  # a nameless file where the filesystem allows: nothing is left
                pass
        except OSError as err:
            reason = err.strerror
    if reason is not None:
        raise ValueError(f"exp_manager.explicit_log_dir: the log dir {where} cannot be created and written: "
                         f"{folder}: {reason}")
