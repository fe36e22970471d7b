"""Experiment loggers that survive a resume."""

from __future__ import annotations

import csv
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from framework.errors import refused_options

__all__ = ["KeepLoggedSteps", "ResumableCSVLogger", "build_loggers", "run_name", "write_run_ids"]

log = logging.getLogger(__name__)
WANDB_ID_FILE = "wandb_run_id.txt"


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


def run_name(cfg: DictConfig) -> str:
    """A readable run name from the command-line overrides (W&B and logs)."""
    try:
        overrides = HydraConfig.get().job.override_dirname
    except ValueError:
        overrides = ""
    return f"{cfg.name}:{overrides}" if overrides else str(cfg.name)


def build_loggers(cfg: DictConfig, run_dir: Path, ids: dict[str, str]) -> list[Logger]:
    """Loggers from ``cfg.logger`` (constructed only: nothing is written before the run writes
    ``ids`` with :func:`write_run_ids`); a W&B run keeps its id across resumes."""
    loggers: list[Logger] = []
    for key, lcfg in (cfg.logger or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        kwargs: dict[str, Any] = {}
        if "Wandb" in str(lcfg._target_):
            id_file = run_dir / WANDB_ID_FILE
            run_id = lcfg.get("id") or ids.get("wandb")
            if run_id is None and id_file.is_file() and cfg.ckpt_path is not None:
                run_id = id_file.read_text().strip()
            ids["wandb"] = run_id or uuid.uuid4().hex[:12]
            kwargs = {"id": ids["wandb"], "name": lcfg.get("name") or run_name(cfg)}
        try:
            loggers.append(instantiate(lcfg, **kwargs))
        except InstantiationException as err:
            raise refused_options(f"logger.{key}", lcfg, err) from None
        log.debug("logger %s: %s", key, type(loggers[-1]).__name__)
    return loggers


def write_run_ids(run_dir: Path, ids: dict[str, str]) -> None:
    """``wandb_run_id.txt``: the W&B run a resume continues."""
    if "wandb" in ids:
        (run_dir / WANDB_ID_FILE).write_text(ids["wandb"] + "\n")
