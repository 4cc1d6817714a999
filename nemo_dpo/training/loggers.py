"""Experiment loggers fed with the rows of ``metrics.jsonl``: TensorBoard (default) and Weights & Biases.

Both are written by rank 0 only. Every numeric value of a row becomes the scalar
``<split>/<key>`` (``train/loss``, ``val/accuracy``) at the row's training step,
so what TensorBoard or W&B shows is exactly what ``metrics.jsonl`` holds.
config.py checks that the packages of enabled loggers are installed.
"""

import glob
import os

TENSORBOARD_DIR = "tensorboard"  # under the log dir


def scalars(row: dict) -> dict:
    """``{"train/loss": 0.69, ...}``: every numeric value of a metrics row but its step."""
    return {
        f"{row['split']}/{key}": value
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoardLogger:
    """Event files in ``<log dir>/tensorboard``; the resolved config as the text ``config``.

    A fresh run (step 0) removes the event files of an earlier run of the same log
    dir, as ``metrics.jsonl`` is restarted too. A resumed run writes a purge marker
    at ``resume_step + 1``: TensorBoard then hides what the earlier run logged after
    the checkpoint, and the replayed steps appear once.
    """

    def __init__(self, log_dir: str, resume_step: int, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.folder = os.path.join(log_dir, TENSORBOARD_DIR)
        if resume_step == 0:
            for old in glob.glob(os.path.join(self.folder, "events.out.tfevents.*")):
                os.remove(old)
        self.writer = SummaryWriter(self.folder, purge_step=resume_step + 1 if resume_step > 0 else None)
        self.writer.add_text("config", f"```yaml\n{config_yaml}```", global_step=resume_step)
        self.writer.flush()

    def log(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])
        if row["split"] == "val":  # at least every validation, so a killed run leaves most of its points
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One W&B run per launch (a resumed run starts a new one at its resume step), config attached."""

    def __init__(self, project: str, name: str, log_dir: str, config: dict):
        import wandb  # config.py has checked that it is installed

        self.run = wandb.init(project=project, name=name, dir=log_dir, config=config)

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()
