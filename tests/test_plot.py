"""python -m nemo_dpo.plot: one valid PNG per promised plot, with the data drawn; clear errors for bad input."""

import json
import math
import sys

import pytest

from logging_checks import colour_share, png_size
from nemo_dpo.cli.plot import PLOTS, draw, main

LINE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c"]  # matplotlib's C0, C1, C2: one per metric on an axes


def write_metrics(log_dir, lines):
    log_dir.mkdir(exist_ok=True)
    (log_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def synthetic_rows():
    rows = []
    for step in range(1, 41):
        rows.append({"step": step, "split": "train", "loss": math.exp(-step / 10), "accuracy": 1 - 0.5 * math.exp(-step / 8),
                     "rewards_chosen_mean": 0.02 * step, "rewards_rejected_mean": -0.03 * step,
                     "reward_margin": 0.05 * step, "grad_norm": 1 / step if step != 7 else float("nan"),
                     "lr": 1e-3 * min(1, step / 5), "tokens_per_sec": 5000.0, "consumed_samples": 32 * step})
        if step % 10 == 0:
            rows.append({"step": step, "split": "val", "loss": math.exp(-step / 12), "accuracy": 0.9,
                         "rewards_chosen_mean": 0.02 * step, "rewards_rejected_mean": -0.02 * step,
                         "reward_margin": 0.04 * step, "tokens_per_sec": 9000.0, "consumed_samples": 32 * step})
    return rows


def test_every_plot_is_a_png_with_its_lines(tmp_path, capsys):
    write_metrics(tmp_path / "run", [json.dumps(r) for r in synthetic_rows()])  # json writes the NaN as NaN
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "png" / f"{name}.png") for name in PLOTS]
    assert set(PLOTS) == {"loss", "accuracy", "rewards", "grad_norm", "lr"}
    for name, (_, keys) in PLOTS.items():
        path = tmp_path / "png" / f"{name}.png"
        assert png_size(path) == (800, 450), name
        for colour in LINE_COLOURS[: len(keys)]:
            assert colour_share(path, colour) > 0.001, (name, colour)  # the metric's line and markers are drawn
        for colour in LINE_COLOURS[len(keys) :]:
            assert colour_share(path, colour) == 0, (name, colour)

    assert main([str(tmp_path / "run")]) == 0  # default --out: <log_dir>/plots
    assert capsys.readouterr().out.split()[0] == str(tmp_path / "run" / "plots" / "loss.png")


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "metrics.jsonl has no rows (the run logged no step yet)"),
        (['{"step": 1, "split": "train", "loss": 0.6}', "", '{"step": 2, "split": "tr'],
         "metrics.jsonl:3: not valid JSON"),
        (['{"step": 1, "split": "train", "loss": 0.6}', "[1, 2]"], "metrics.jsonl:2: not a metrics row"),
        (['{"step": "1", "split": "train", "loss": 0.6}'], "metrics.jsonl:1: not a metrics row"),
        (['{"step": 1, "split": "train", "loss": "low"}'], "metrics.jsonl:1: loss is 'low', not a number"),
        (['{"step": 1, "split": "train", "loss": 0.6, "accuracy": 1}'],
         "metrics.jsonl: no row has rewards_chosen_mean or rewards_rejected_mean or reward_margin, needed for rewards.png"),
    ],
)
def test_bad_metrics_files_are_named(tmp_path, capsys, lines, message):
    write_metrics(tmp_path / "run", lines)
    assert main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'run'}/{message}")
    assert not (tmp_path / "run" / "plots").exists()


def test_missing_log_dir_metrics_file_and_matplotlib(tmp_path, capsys, monkeypatch):
    assert main([str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err == f"error: log dir {tmp_path / 'nowhere'} does not exist\n"
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'metrics.jsonl'} does not exist (is the folder a nemo-dpo "
                                       "log dir, exp_manager.explicit_log_dir?)\n")

    write_metrics(tmp_path / "run", [json.dumps(r) for r in synthetic_rows()])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # imports of matplotlib fail, as when it is not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == ("error: plotting needs matplotlib, which is not installed: pip install matplotlib "
                                       "(or pip install 'nemo-dpo[plot]')\n")


def test_the_statistics_a_loss_defines_are_plotted_too(tmp_path, capsys):
    """An ORPO run logs nll_loss, log_odds_ratio and log_odds_chosen: each gets its own PNG after the common ones."""
    rows = synthetic_rows()
    for row in rows:
        row.update(nll_loss=3.0 - row["step"] / 20, log_odds_ratio=-0.7 + row["step"] / 100, log_odds_chosen=0.01,
                   preference_loss=row["loss"], sft_loss=0.0, time_step=0.5)
    write_metrics(tmp_path / "run", [json.dumps(r) for r in rows])
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "png")]) == 0
    extra = ["nll_loss", "log_odds_ratio", "log_odds_chosen"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "png" / f"{name}.png") for name in [*PLOTS, *extra]]
    for name in extra:
        assert png_size(tmp_path / "png" / f"{name}.png") == (800, 450)
        assert colour_share(tmp_path / "png" / f"{name}.png", LINE_COLOURS[0]) > 0.001, name
def test_short_runs_get_whole_step_ticks_and_the_legend_leaves_the_curves_alone():
    """A 5-step run: no tick at step 2.5, and no legend (rewards has six entries) over the axes where curves are."""
    rows = [row for row in synthetic_rows() if row["step"] <= 5]
    for name in PLOTS:
        fig = draw(rows, name)
        fig.canvas.draw()
        ax, renderer = fig.axes[0], fig.canvas.get_renderer()
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), (name, ticks)
        legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not legend.overlaps(axes), name
        assert legend.x1 <= fig.bbox.x1 and legend.y0 >= fig.bbox.y0, name  # and all of it is in the picture
