"""Experiment loggers that survive a resume."""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["KeepLoggedSteps", "ResumableCSVLogger"]


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus deleting ``metrics.csv`` when the folder exists."""

    def _check_log_dir_exists(self) -> None:
        """Keep earlier rows and their columns (a new column rewrites the file with every old
        one); :meth:`keep_before` trims the rows once the resumed step is known."""
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                fields = csv.DictReader(f).fieldnames or []
            self.metrics_keys = sorted(set(self.metrics_keys) | set(fields))

    def keep_before(self, step: int) -> None:
        """Drop rows at ``step`` or later (logged after the checkpoint being resumed)."""
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step", "") != "" and int(float(r["step"])) < step]
        if not rows:
            os.remove(path)
            return
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = sorted(set(self.metrics_keys) | set(fields))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` keeps the epochs before a resume (Lightning's deletes
    the file when a run continues in the same folder)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The writer (created on first use)."""
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def keep_before(self, step: int) -> None:
        """Trim the file to the rows of steps before ``step``."""
        self.experiment.keep_before(step)


class KeepLoggedSteps(Callback):
    """At the start of training (after a checkpoint is restored) trims resumable loggers to the
    restored step: a fresh run starts an empty file, a resumed one keeps its earlier rows."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Tell every resumable logger where this fit starts."""
        for lg in trainer.loggers:
            if isinstance(lg, ResumableCSVLogger):
                lg.keep_before(trainer.global_step)
