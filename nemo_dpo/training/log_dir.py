"""A run's log dir, where everything it writes goes (metrics, config, checkpoints, caches).

The log dir is ``exp_manager.explicit_log_dir``, or ``./runs/<name>``.
"""

import os

from nemo_dpo.ranges import FilePath, Text

RANGES = {
    "name": Text(),
    "exp_manager.explicit_log_dir": FilePath(nullable=True),
}


def log_dir(cfg) -> str:
    return cfg.exp_manager.explicit_log_dir or os.path.join("runs", cfg.name)
