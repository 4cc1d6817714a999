"""Plots of a run: ``python -m nemo_dpo.plot <log_dir> [--out DIR]``.

Reads ``<log_dir>/metrics.jsonl`` and writes loss.png, accuracy.png, rewards.png
(chosen, rejected, margin), grad_norm.png and lr.png to DIR (default
``<log_dir>/plots``), then one ``<metric>.png`` for each statistic the run's loss
defines and logged (BCO's ``bco_reward_shift``, ORPO's ``log_odds_ratio``, each part
of a mixture, ...): training steps as a line and validation as markers on the same
axes, whole steps on the x axis and the legend beside the axes; prints the paths
written. Needs matplotlib (``pip install matplotlib``, or the ``plot``
extra); rendered with Agg, so no display is needed.
"""

import argparse
import json
import os
import sys

# file name -> (title, the metrics drawn on its axes)
PLOTS = {
    "loss": ("loss", ["loss"]),
    "accuracy": ("accuracy (chosen reward > rejected reward)", ["accuracy"]),
    "rewards": ("implicit rewards (beta log-ratio; reference-free losses: beta log-likelihood)",
                ["rewards_chosen_mean", "rewards_rejected_mean", "reward_margin"]),
    "grad_norm": ("gradient norm", ["grad_norm"]),
    "lr": ("learning rate", ["lr"]),
}


# What every run logs besides PLOTS' metrics, drawn by none: the parts of the loss, bookkeeping and timings.
COMMON = {"preference_loss", "sft_loss", "consumed_samples", "skipped_steps", "tokens_per_sec"}


def loss_statistics(rows: list) -> list:
    """The numeric metrics a run logged that are its loss's own (neither PLOTS', common, nor ``time_*``), in order."""
    drawn = {key for _, keys in PLOTS.values() for key in keys} | COMMON | {"step", "split"}
    found = []
    for row in rows:
        for key, value in row.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and key not in drawn and not key.startswith("time_") and key not in found:
                found.append(key)
    return found


class PlotError(Exception):
    """A log dir or metrics file that cannot be plotted; the message says where and why."""


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl; a line that is not a metrics row is an error naming ``file:line``."""
    if not os.path.isfile(path):
        raise PlotError(f"{path} does not exist (is the folder a nemo-dpo log dir, exp_manager.explicit_log_dir?)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise PlotError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not isinstance(row.get("split"), str):
                raise PlotError(f"{path}:{number}: not a metrics row (a JSON object with an integer 'step' and a 'split')")
            for key in {k for _, keys in PLOTS.values() for k in keys} & row.keys():
                if not isinstance(row[key], (int, float)) or isinstance(row[key], bool):
                    raise PlotError(f"{path}:{number}: {key} is {row[key]!r}, not a number")
            rows.append(row)
    if not rows:
        raise PlotError(f"{path} has no rows (the run logged no step yet)")
    return rows


def series(rows: list, split: str, key: str) -> tuple:
    """(steps, values) of ``key`` in the rows of ``split``."""
    points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
    return [s for s, _ in points], [v for _, v in points]


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed: pip install matplotlib "
                        "(or pip install 'nemo-dpo[plot]')") from None
    return Figure, FigureCanvasAgg, MaxNLocator


def figures(rows: list) -> dict:
    """``PLOTS`` and one figure for each statistic of the run's loss: {file name: (title, metrics)}."""
    return {**PLOTS, **{key: (f"{key} (the loss's statistic)", [key]) for key in loss_statistics(rows)}}


def draw(rows: list, name: str):
    """The figure ``name`` of :func:`figures`: steps are whole numbers on the axis (a short run gets no 2.5), and
    the legend sits to the right of the axes, where it cannot cover a curve."""
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    title, keys = figures(rows)[name]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for index, key in enumerate(keys):
        color = f"C{index}"
        steps, values = series(rows, "train", key)
        if steps:
            ax.plot(steps, values, color=color, linewidth=1.2, label=f"train {key}")
        steps, values = series(rows, "val", key)
        if steps:
            ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=5, label=f"val {key}")
    if name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "reward")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    fig.tight_layout()
    return fig


def plot(log_dir: str, out_dir: str = None) -> list:
    """Write the PNGs of ``PLOTS`` and of the loss's own statistics for ``log_dir``; returns their paths."""
    if not os.path.isdir(log_dir):
        raise PlotError(f"log dir {log_dir} does not exist")
    path = os.path.join(log_dir, "metrics.jsonl")
    rows = read_metrics(path)
    for name, (_, keys) in PLOTS.items():
        if not any(key in row for row in rows for key in keys):
            raise PlotError(f"{path}: no row has {' or '.join(keys)}, needed for {name}.png")
    _matplotlib()
    out_dir = out_dir or os.path.join(log_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in figures(rows):
        target = os.path.join(out_dir, f"{name}.png")
        draw(rows, name).savefig(target)
        written.append(target)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nemo_dpo.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", help="a run's log dir (exp_manager.explicit_log_dir), holding metrics.jsonl")
    parser.add_argument("--out", help="folder for the PNGs (default: <log_dir>/plots)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = plot(args.log_dir, args.out)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0
