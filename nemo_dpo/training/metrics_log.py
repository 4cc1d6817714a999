"""Rank-0 metrics: one JSON object per step in ``metrics.jsonl`` and a console line."""

import json
import os
import sys


class MetricsLog:
    def __init__(self, log_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            open(self.path, "w").close()

    def write(self, row: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if console:
            print(format_row(row), file=sys.stdout, flush=True)


def format_row(row: dict) -> str:
    parts = [f"{row['split']:>5} step {row['step']}"]
    for key, fmt in (
        ("loss", ".4f"),
        ("accuracy", ".3f"),
        ("reward_margin", ".4f"),
        ("rewards_chosen_mean", ".4f"),
        ("rewards_rejected_mean", ".4f"),
        ("grad_norm", ".3f"),
        ("lr", ".2e"),
        ("tokens_per_sec", ".0f"),
    ):
        if key in row:
            parts.append(f"{key} {row[key]:{fmt}}")
    return " | ".join(parts)
