"""Rank-0 metrics: one JSON object per step in ``metrics.jsonl`` and a console line."""

import json
import os
import sys


class MetricsLog:
    """``metrics.jsonl`` of a run; a resumed run keeps the rows up to its checkpoint's step."""

    def __init__(self, log_dir: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        kept = []
        if resume_step > 0 and os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

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
