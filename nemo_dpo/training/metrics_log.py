"""Rank 0's record of a run: ``metrics.jsonl`` (one JSON object per step), the loggers, the console."""

import importlib.util
import json
import os

from omegaconf import OmegaConf

from nemo_dpo.ranges import Flag, Integer, Text
from nemo_dpo.training.loggers import TensorBoardLogger, WandbLogger
from nemo_dpo.training.progress import Progress, format_row

RANGES = {
    "trainer.dpo.log_interval": Integer(ge=1),
    "trainer.enable_progress_bar": Flag(),
    "exp_manager.create_tensorboard_logger": Flag(),
    "exp_manager.create_wandb_logger": Flag(),
    "exp_manager.wandb_logger_kwargs.project": Text(),
    "exp_manager.wandb_logger_kwargs.name": Text(empty=True, nullable=True),  # empty or null: the run name
}


def check_logging(cfg) -> None:
    """An enabled logger whose package is missing fails here, not at its first write."""
    exp_manager = cfg.exp_manager
    for key, package in (("create_tensorboard_logger", "tensorboard"), ("create_wandb_logger", "wandb")):
        if exp_manager[key] and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"exp_manager.{key}=true needs the {package} package, which is not installed: "
                f"pip install {package} (or set exp_manager.{key}=false)"
            )


class MetricsLog:
    """``metrics.jsonl`` of a run; a resumed run keeps the rows up to its checkpoint's step.

    Each row also goes to the loggers of ``exp_manager`` (TensorBoard, W&B) and to
    the console (``trainer.enable_progress_bar``). Disabled (other ranks): does nothing.
    """

    def __init__(self, cfg, log_dir: str, enabled: bool, resume_step: int = 0, total_steps: int = 0):
        self.enabled = enabled
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.loggers = []
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.progress = Progress(total_steps, resume_step, cfg.trainer.enable_progress_bar)
        kept = self._rows_to_keep(resume_step) if resume_step > 0 and os.path.isfile(self.path) else []
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

        exp = cfg.exp_manager
        if exp.create_tensorboard_logger:
            tb = TensorBoardLogger(log_dir, resume_step, OmegaConf.to_yaml(cfg, resolve=True))
            self.loggers.append(tb)
            self.progress.print(f"tensorboard: {tb.folder} (tensorboard --logdir {tb.folder})")
        if exp.create_wandb_logger:
            kwargs = exp.wandb_logger_kwargs
            name = kwargs.name or cfg.name
            config = OmegaConf.to_container(cfg, resolve=True)
            self.loggers.append(WandbLogger(kwargs.project, name, log_dir, config))
            self.progress.print(f"wandb: project {kwargs.project}, run {name}")

    def _rows_to_keep(self, resume_step: int) -> list:
        """The lines of rows up to the checkpoint's step; a line that is not a whole row (a run killed, or out of
        space, in the middle of an append) is dropped with a note rather than stopping the restart."""
        kept, torn = [], []
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    row = json.loads(raw.decode("utf-8"))
                    step = row["step"]
                except (ValueError, KeyError, TypeError):
                    if raw.strip():
                        torn.append(number)
                    continue
                if step <= resume_step:
                    kept.append(raw.decode("utf-8").rstrip("\n") + "\n")
        if torn:
            self.progress.print(f"{self.path}: dropped {len(torn)} line(s) that are not whole rows (line "
                                f"{', '.join(map(str, torn[:5]))}; a run stopped in the middle of writing them)")
        return kept

    def write(self, row: dict, console: bool = True) -> None:
        """Append ``row``; ``console``: whether a train row gets a console line (the bar shows every row)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            logger.log(row)
        if row["split"] == "train":
            self.progress.update(row, console)
        elif console:
            self.progress.print(format_row(row))

    def close(self) -> None:
        """Flush and close the loggers, leave the console as it was (idempotent)."""
        if not self.enabled:
            return
        self.progress.close()
        for logger in self.loggers:
            logger.close()
        self.loggers = []
