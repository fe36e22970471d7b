"""Every callback a run gets, assembled in one place (:func:`build_callbacks`): the configured
ones (``cfg/callbacks``, ``callbacks.<name>=null`` drops one), then the always-on ones — per-epoch
metrics.csv, exact RNG resume, run ids, the resume bookkeeping, CSV-log trimming — and the EMA
(``ema=on``). The always-on callback classes not defined elsewhere live here too."""

from __future__ import annotations

import csv
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar, RichProgressBar
from omegaconf import DictConfig

from framework.console import running_metrics
from framework.curves import TrainingCurves
from framework.ema import EMA
from framework.errors import refused_options
from framework.lifecycle import GracefulStop
from framework.loggers import KeepLoggedSteps
from framework.resume import RunConfig, TrainClock, run_config

__all__ = [
    "EpochMetricsCSV",
    "PlainProgressBar",
    "RNGStateCallback",
    "RichEpochBar",
    "RunIds",
    "StepTimer",
    "auto_progress_bar",
    "build_callbacks",
    "step_time",
]

log = logging.getLogger(__name__)


def _number(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


class EpochMetricsCSV(Callback):
    """Writes ``metrics.csv``: one row per finished epoch with every epoch-level metric. Epochs
    count from 1 there and in the log, as everywhere a person reads them (Lightning's
    ``current_epoch`` counts from 0).

    On resume, rows of epochs that the checkpoint has not seen are dropped, so the file matches
    the restored state.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._loaded = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forget rows of an earlier ``fit`` in this process."""
        self.rows = []
        self._loaded = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per fit: keep the file's rows of epochs before the (restored) current one."""
        if self._loaded:
            return
        self._loaded = True
        if trainer.fast_dev_run or not self.path.is_file():
            return
        with self.path.open(newline="") as f:
            self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= trainer.current_epoch]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Append this epoch's row and rewrite the file atomically (rank 0)."""
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for i, opt in enumerate(trainer.optimizers):
            row["lr" if i == 0 else f"lr{i}"] = opt.param_groups[0]["lr"]
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith(("train/", "val/")):
                row[key] = _number(value)
        self.rows.append(row)
        log.info(
            "epoch %d | %s",
            row["epoch"],
            "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith(("train/", "val/"))),
        )
        if trainer.is_global_zero:
            self._write()

    def _write(self) -> None:
        fields: list[str] = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


class RNGStateCallback(Callback):
    """Saves the global RNG states (torch, CUDA, numpy, random) in every checkpoint and restores
    them at the start of the first epoch after a resume, so resuming is exact."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The RNG states at checkpoint time (the end of an epoch), as tensors and tuples so
        the checkpoint stays loadable with ``weights_only=True``."""
        states = _collect_rng_states(include_cuda=True)
        kind, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the states until training resumes (sanity checks may draw numbers first)."""
        states = state_dict.get("rng")
        if states is not None:
            kind, keys, pos, has_gauss, cached = states["numpy"]
            keys = np.asarray(keys.numpy() if torch.is_tensor(keys) else keys, dtype=np.uint32)
            states = {**states, "numpy": (kind, keys, pos, has_gauss, cached)}
        self._pending = states

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the saved states once."""
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        """A resume in the middle of an epoch (after a SIGTERM) starts no epoch: restore the
        states before its first batch instead (data transforms draw from their own generator,
        so nothing was drawn since the checkpoint)."""
        self.on_train_epoch_start(trainer, pl_module)


class RunIds(Callback):
    """Carries logger run ids (e.g. the W&B run id) inside checkpoints."""

    KEY = "RunIds"  # where the checkpoint keeps it: ckpt["callbacks"][KEY]

    def __init__(self, ids: dict[str, str] | None = None) -> None:
        self.ids = dict(ids or {})

    @property
    def state_key(self) -> str:
        """The fixed key of this state in ``ckpt["callbacks"]``, read before loggers are built."""
        return self.KEY

    def state_dict(self) -> dict[str, Any]:
        """The ids to persist."""
        return {"ids": dict(self.ids)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: ids are read from the checkpoint before the loggers are built."""


class PlainProgressBar(ProgressBar):
    """Progress as plain log lines (for files and non-terminals): a line every ``every`` of an
    epoch; epoch summaries come from :class:`EpochMetricsCSV`."""

    def __init__(self, every: float = 0.25) -> None:
        super().__init__()
        self.every = every
        self._enabled = True

    def disable(self) -> None:
        """Silence the bar (non-zero ranks)."""
        self._enabled = False

    def enable(self) -> None:
        """Turn the bar on."""
        self._enabled = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log the running training metrics every ``every`` of an epoch."""
        total = self.total_train_batches
        if not self._enabled or not isinstance(total, int) or total <= 0 or math.isinf(total):
            return
        step = max(1, round(total * self.every))
        done = batch_idx + 1
        if done % step == 0 and done < total:
            metrics = running_metrics(pl_module)  # this epoch's, not the last epoch's means
            shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("epoch %d  %d/%d  %s", trainer.current_epoch + 1, done, total, shown)


class RichEpochBar(RichProgressBar):
    """Lightning's rich progress bar counting epochs from 1 ("Epoch 1/8" is the first of 8)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            text += f"/{self.trainer.max_epochs}"
        return f"{text:{len(self.validation_description)}}"


def auto_progress_bar(refresh_rate: int = 1) -> ProgressBar:
    """A rich progress bar on a terminal, plain log lines otherwise."""
    if sys.stdout.isatty() and not os.environ.get("CI"):
        return RichEpochBar(refresh_rate=refresh_rate)
    return PlainProgressBar()


# ------------------------------------------------------------------------------ assembling
def _ema_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """``[EMA(...)]`` when ``cfg.ema.enabled``, else ``[]``."""
    e = cfg.get("ema")
    if not e or not e.get("enabled", False):
        return []
    return [
        EMA(
            decay=float(e.decay),
            update_every_n_steps=int(e.update_every_n_steps),
            update_starting_at_step=e.update_starting_at_step,
            use_buffers=bool(e.use_buffers),
        )
    ]


class StepTimer(Callback):
    """Times training steps: the interval between consecutive batch ends within an epoch (data
    loading included, epoch boundaries and validation excluded); ``results.json`` reports the
    median of this attempt as ``step_time_s``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The first batch of an epoch has no predecessor to time from."""
        self._last = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record the time since the previous batch ended."""
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def median(self) -> float | None:
        """The median step time in seconds (None before two steps of one epoch)."""
        return statistics.median(self.times) if self.times else None


def step_time(trainer: pl.Trainer) -> float | None:
    """The median training step time of this attempt (seconds, rounded to 0.1 ms)."""
    for cb in trainer.callbacks:
        if isinstance(cb, StepTimer) and cb.median() is not None:
            return round(cb.median(), 4)
    return None


def build_callbacks(
    cfg: DictConfig, run_dir: Path, ids: dict[str, str], has_logger: bool, title: str = ""
) -> list[pl.Callback]:
    """All callbacks of a run, in hook order: the configured ones, then metrics.csv and its
    picture (``title`` names the run there), step times, RNG, run ids, train clock, run config,
    CSV-log trimming, the EMA, and last the SIGTERM stop.

    Without a logger the lr monitor is dropped (metrics.csv still records the lr)."""
    callbacks: list[pl.Callback] = []
    for name, c in (cfg.callbacks or {}).items():
        if not c or "_target_" not in c:
            continue
        try:
            callback = instantiate(c)
        except InstantiationException as err:
            raise refused_options(f"callbacks.{name}", c, err) from None
        if isinstance(callback, LearningRateMonitor) and not has_logger:
            continue
        callbacks.append(callback)
    callbacks += [
        EpochMetricsCSV(run_dir / "metrics.csv"),
        TrainingCurves(run_dir / "metrics.csv", run_dir / "curves.png", title),  # after the CSV
        StepTimer(),
        RNGStateCallback(),
        RunIds(ids),
    ]
    callbacks += [TrainClock(), RunConfig(run_config(cfg)), KeepLoggedSteps()]
    # last: a SIGTERM checkpoint holds the batch's EMA update
    return callbacks + _ema_callbacks(cfg) + [GracefulStop()]
