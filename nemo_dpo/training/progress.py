"""Rank 0's console view of training: an updating bar on a terminal, plain lines with an ETA elsewhere.

Our own small class rather than tqdm: one less dependency, and the non-terminal
form (Slurm logs, CI, tests) must stay the grep-able ``train step N | ...`` line.
"""

import shutil
import sys
import time

import torch

from nemo_dpo.console import duration

# Console fields of a metrics row, in order, with their formats.
CONSOLE_FIELDS = (
    ("loss", ".4f"),
    ("moe_aux_loss", ".4f"),  # mixture-of-experts runs with a load-balancing loss only
    ("accuracy", ".3f"),
    ("reward_margin", ".4f"),
    ("rewards_chosen_mean", ".4f"),
    ("rewards_rejected_mean", ".4f"),
    ("grad_norm", ".3f"),
    ("lr", ".2e"),
    ("tokens_per_sec", ".0f"),
)


def clock() -> float:
    """Seconds, after the device has finished the work queued so far (for honest time splits)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def format_row(row: dict) -> str:
    """``train step 7 | loss 0.6931 | ...``: the console line of a metrics row."""
    parts = [f"{row['split']:>5} step {row['step']}"]
    parts += [f"{key} {row[key]:{fmt}}" for key, fmt in CONSOLE_FIELDS if key in row]
    return " | ".join(parts)


class Progress:
    """Prints train rows (``update``) and any other line (``print``) for a run of ``total_steps``.

    On a terminal (``sys.stdout.isatty()``) and when enabled, a single line redrawn
    every step (``\\r``) shows step/total, percent, elapsed, ETA, loss, accuracy and
    tokens/s; anything else printed to stdout/stderr meanwhile goes above it.
    Otherwise every row the trainer marks for the console is one line, followed
    (when enabled) by ``| progress P% of N | elapsed T | eta T``. The ETA is the
    time per step of this process so far (validation included) times the steps left.
    """

    def __init__(self, total_steps: int, start_step: int, enabled: bool, clock=time.monotonic):
        self.total, self.start_step, self.enabled = total_steps, start_step, enabled
        self.stream = sys.stdout  # the bar's; lines are printed to whatever sys.stdout is then
        self.bar = enabled and self.stream.isatty()
        self.clock, self.started = clock, clock()
        self.line, self.shown = "", False
        self._saved_streams = None

    def timing(self, step: int) -> tuple:
        """(elapsed, eta) in seconds after ``step`` steps; eta is None before this process's first step."""
        elapsed = self.clock() - self.started
        done = step - self.start_step
        return elapsed, (elapsed / done * (self.total - step) if done > 0 else None)

    def update(self, row: dict, console: bool) -> None:
        """A train row: redraws the bar (every row), or prints its line (rows marked ``console``)."""
        if self.bar:
            self.line = self.bar_line(row)
            self.draw()
        elif console:
            line = format_row(row)
            if self.enabled:
                elapsed, eta = self.timing(row["step"])
                line += (f" | progress {100 * row['step'] / self.total:.0f}% of {self.total}"
                         f" | elapsed {duration(elapsed)} | eta {duration(eta)}")
            self.print(line)

    def bar_line(self, row: dict) -> str:
        step = row["step"]
        elapsed, eta = self.timing(step)
        filled = int(20 * step / self.total)
        parts = [
            f"step {step}/{self.total} {100 * step / self.total:3.0f}% [{'#' * filled}{'.' * (20 - filled)}]",
            f"{duration(elapsed)}<{duration(eta)}",
        ]
        for key, label, fmt in (("loss", "loss", ".4f"), ("accuracy", "acc", ".3f"), ("tokens_per_sec", "tok/s", ".0f")):
            if key in row:
                parts.append(f"{label} {row[key]:{fmt}}")
        width = shutil.get_terminal_size((100, 24)).columns - 1
        return " | ".join(parts)[:width]  # a wrapped line could not be redrawn with \r

    def draw(self) -> None:
        if not self._saved_streams:  # from the first draw on, other output goes above the bar
            self._saved_streams = (sys.stdout, sys.stderr)
            sys.stdout = _AboveBar(self, sys.stdout)
            if sys.stderr.isatty():
                sys.stderr = _AboveBar(self, sys.stderr)
        self.stream.write("\r" + self.line + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def print(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        """Leave the last bar on screen and give stdout/stderr back."""
        if self._saved_streams:
            sys.stdout, sys.stderr = self._saved_streams
            self._saved_streams = None
            if self.shown:
                self.stream.write("\n")
                self.stream.flush()
                self.shown = False


class _AboveBar:
    """A stream whose writes first erase the bar, which is redrawn after each complete line."""

    def __init__(self, progress: Progress, stream):
        self.progress, self.stream = progress, stream

    def write(self, text: str) -> int:
        if not text:
            return 0
        self.progress.clear()
        written = self.stream.write(text)
        if text.endswith("\n"):
            self.stream.flush()
            self.progress.draw()
        return written

    def __getattr__(self, name):
        return getattr(self.stream, name)
