"""Console progress, TensorBoard and W&B logging, without launching a run (the default run checks them for real)."""

import importlib.util
import io
import os
import sys
import time
import types

import pytest
from omegaconf import OmegaConf

from logging_checks import assert_tensorboard_matches_metrics, read_tensorboard
from nemo_dpo.cli import train as train_cli
from nemo_dpo.config import ConfigError, load_config, validate
from nemo_dpo.console import duration
from nemo_dpo.training.metrics_log import MetricsLog
from nemo_dpo.training.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def train_row(step, loss=0.5, accuracy=0.75):
    return {"step": step, "split": "train", "loss": loss, "accuracy": accuracy, "grad_norm": 1.25, "lr": 1e-3,
            "tokens_per_sec": 1234.4, "skipped_steps": 0, "consumed_samples": 32 * step}


def val_row(step, loss=0.4):
    return {"step": step, "split": "val", "loss": loss, "accuracy": 0.9, "reward_margin": 0.3,
            "tokens_per_sec": 4321.0, "consumed_samples": 32 * step}


def test_duration():
    assert [duration(s) for s in (0, 59.4, 61, 3600, 3723, None)] == ["0:00", "0:59", "1:01", "1:00:00", "1:02:03", "?"]


def test_lines_without_a_terminal_carry_the_eta(monkeypatch):
    out, clock = io.StringIO(), FakeClock()
    monkeypatch.setattr(sys, "stdout", out)
    progress = Progress(total_steps=10, start_step=2, enabled=True, clock=clock)
    clock.now += 30  # 3 steps (3..5) in 30 s: 5 steps left take 50 s
    progress.update(train_row(5), console=True)
    progress.update(train_row(6), console=False)  # not a log_interval step: no line
    assert out.getvalue() == (
        "train step 5 | loss 0.5000 | accuracy 0.750 | grad_norm 1.250 | lr 1.00e-03 | tokens_per_sec 1234"
        " | progress 50% of 10 | elapsed 0:30 | eta 0:50\n"
    )
    assert "\r" not in out.getvalue()
    assert progress.bar is False


def test_disabled_progress_prints_the_plain_line_even_on_a_terminal(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    progress = Progress(total_steps=10, start_step=0, enabled=False)
    progress.update(train_row(1), console=True)
    progress.close()
    assert term.getvalue() == (
        "train step 1 | loss 0.5000 | accuracy 0.750 | grad_norm 1.250 | lr 1.00e-03 | tokens_per_sec 1234\n"
    )


def test_terminal_bar_is_one_redrawn_line_and_other_output_goes_above_it(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setenv("COLUMNS", "200")
    clock = FakeClock()
    progress = Progress(total_steps=4, start_step=0, enabled=True, clock=clock)
    assert progress.bar
    clock.now += 10
    progress.update(train_row(1), console=False)  # the bar is drawn whatever log_interval says
    assert sys.stdout is not term  # other output now goes through the bar's stream
    clock.now += 10
    progress.update(train_row(2, loss=0.25), console=True)
    print("  val step 2 | loss 0.4000")  # as MetricsLog and checkpoint messages print
    progress.close()
    assert sys.stdout is term
    bar1 = "step 1/4  25% [#####...............] | 0:10<0:30 | loss 0.5000 | acc 0.750 | tok/s 1234"
    bar2 = "step 2/4  50% [##########..........] | 0:20<0:20 | loss 0.2500 | acc 0.750 | tok/s 1234"
    assert term.getvalue() == (
        f"\r{bar1}\x1b[K"
        f"\r{bar2}\x1b[K"
        "\r\x1b[K  val step 2 | loss 0.4000\n"  # the bar erased, the line printed,
        f"\r{bar2}\x1b[K"  # the bar redrawn below it
        "\n"  # close leaves the last bar on screen
    )


def test_bar_fits_the_terminal_width(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setenv("COLUMNS", "40")
    progress = Progress(total_steps=4, start_step=0, enabled=True)
    progress.update(train_row(1), console=True)
    progress.close()
    drawn = term.getvalue().split("\r")[1].split("\x1b[K")[0]
    assert len(drawn) == 39 and drawn.startswith("step 1/4")


def config(tmp_path, *overrides):
    return load_config("gpt_dpo", [f"exp_manager.explicit_log_dir={tmp_path}", *overrides])


def test_a_missing_logger_package_is_a_config_error_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"exp_manager.create_wandb_logger=true needs the wandb package, which is "
                                          r"not installed: pip install wandb \(or set exp_manager.create_wandb_logger=false\)"):
        validate(load_config("gpt_dpo", ["exp_manager.create_tensorboard_logger=false",
                                         "exp_manager.create_wandb_logger=true"]), 1)
    with pytest.raises(ConfigError, match=r"exp_manager.create_tensorboard_logger=true needs the tensorboard package, "
                                          r"which is not installed: pip install tensorboard"):
        validate(load_config("gpt_dpo", []), 1)
    validate(load_config("gpt_dpo", ["exp_manager.create_tensorboard_logger=false"]), 1)  # both off: fine

    # Through the launcher: exit status 2 before the process group or any model exists.
    spec = importlib.util.spec_from_file_location("train_dpo", os.path.join(ROOT, "examples", "train_dpo.py"))
    train_dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_dpo)
    monkeypatch.setattr(train_cli, "init_distributed", lambda *a: pytest.fail("training started"))
    assert train_dpo.main.__wrapped__(["exp_manager.create_tensorboard_logger=false", "exp_manager.create_wandb_logger=true"]) == 2
    assert "config error: exp_manager.create_wandb_logger=true needs the wandb package" in capsys.readouterr().err


def test_log_interval_and_wandb_names_are_checked():
    with pytest.raises(ConfigError, match=r"trainer.dpo.log_interval must be >= 1, got 0"):
        validate(load_config("gpt_dpo", ["trainer.dpo.log_interval=0"]), 1)
    with pytest.raises(ConfigError, match=r"exp_manager.wandb_logger_kwargs.name must be a string or null, got 7"):
        validate(load_config("gpt_dpo", ["exp_manager.wandb_logger_kwargs.name=7"]), 1)
    with pytest.raises(ConfigError, match=r"exp_manager.wandb_logger_kwargs.project: expected str, got 5"):
        load_config("gpt_dpo", ["exp_manager.wandb_logger_kwargs.project=5"])


def write_run(cfg, log_dir, resume_step, rows):
    """What the trainer does with its rows: MetricsLog, config.yaml, a row at a time, close."""
    metrics = MetricsLog(cfg, str(log_dir), enabled=True, resume_step=resume_step, total_steps=6)
    OmegaConf.save(cfg, os.path.join(log_dir, "config.yaml"), resolve=True)
    for row in rows:
        metrics.write(row, console=False)
    metrics.close()


def next_second():
    """Event file names start with the creation second: a restart's file must sort after the earlier run's."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def test_tensorboard_resume_hides_the_points_after_the_checkpoint(tmp_path):
    cfg = config(tmp_path, "trainer.enable_progress_bar=false")
    first = [train_row(s, loss=1.0 + s) for s in range(1, 6)] + [val_row(4, loss=9.0)]
    write_run(cfg, tmp_path, 0, first)
    assert_tensorboard_matches_metrics(tmp_path)

    # Resumed from a checkpoint at step 3: steps 4 and 5 are replayed with other values.
    next_second()
    write_run(cfg, tmp_path, 3, [train_row(s, loss=-s) for s in (4, 5, 6)] + [val_row(6)])
    assert_tensorboard_matches_metrics(tmp_path)  # each step once, the replayed values
    series, texts = read_tensorboard(tmp_path / "tensorboard")
    assert series["train/loss"] == [(1, 2.0), (2, 3.0), (3, 4.0), (4, -4.0), (5, -5.0), (6, -6.0)]
    assert "val/loss" in series and series["val/loss"] == [(6, pytest.approx(0.4))]
    assert [step for step, _ in texts] == [0, 3]  # the config of each launch

    # A fresh run of the same log dir starts over, as metrics.jsonl does.
    next_second()
    write_run(cfg, tmp_path, 0, [train_row(1, loss=7.0)])
    assert_tensorboard_matches_metrics(tmp_path)
    assert len(os.listdir(tmp_path / "tensorboard")) == 1


def test_wandb_gets_every_scalar_at_its_step(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = config(tmp_path, "exp_manager.create_wandb_logger=true", "exp_manager.create_tensorboard_logger=false",
                 "exp_manager.wandb_logger_kwargs.project=dpo-tests", "trainer.enable_progress_bar=false")
    write_run(cfg, tmp_path, 0, [train_row(1), val_row(1)])
    init = calls[0][1]
    assert calls[0][0] == "init" and init["project"] == "dpo-tests" and init["name"] == "megatron_gpt_dpo"
    assert init["dir"] == str(tmp_path) and init["config"]["model"]["seed"] == 1234
    assert calls[1] == ("log", {"train/loss": 0.5, "train/accuracy": 0.75, "train/grad_norm": 1.25, "train/lr": 1e-3,
                                "train/tokens_per_sec": 1234.4, "train/skipped_steps": 0,
                                "train/consumed_samples": 32}, 1)
    assert calls[2] == ("log", {"val/loss": 0.4, "val/accuracy": 0.9, "val/reward_margin": 0.3,
                                "val/tokens_per_sec": 4321.0, "val/consumed_samples": 32}, 1)
    assert calls[3:] == [("finish",)]
    assert not (tmp_path / "tensorboard").exists()


def test_the_load_balancing_loss_follows_the_loss_on_the_console_when_there_is_one(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    progress = Progress(total_steps=10, start_step=0, enabled=False)
    progress.update({**train_row(1), "moe_aux_loss": 0.04125}, console=True)
    assert out.getvalue().startswith("train step 1 | loss 0.5000 | moe_aux_loss 0.0413 | accuracy 0.750")
