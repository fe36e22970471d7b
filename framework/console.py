"""A quiet, truthful console: each line once, from rank 0, with the current epoch's numbers."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.profilers import SimpleProfiler
from lightning.pytorch.utilities.model_summary.model_summary import (
    ModelSummary as LightningSummary,
)
from torch import nn
from torchmetrics import Metric

from framework.rundir import is_rank_zero

__all__ = [
    "DropAdverts",
    "FileProfiler",
    "ModelSummaryNoFlops",
    "RankZeroConsole",
    "configure_console",
    "running_metrics",
]

log = logging.getLogger(__name__)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# Our packages: their deprecation warnings are shown; other packages' are not the user's to fix.
OWN_MODULES = r"(convnn|framework|models|datamodules|main)(\.|$)"
# Lightning's console lines that say nothing about this run.
ADVERTS = ("💡 Tip:", "Trainer already configured with model summary callbacks")


class RankZeroConsole(logging.Filter):
    """On ranks ≥ 1 only warnings and errors reach the console (the rank's log file keeps all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep warnings and above."""
        return record.levelno >= logging.WARNING


class DropAdverts(logging.Filter):
    """Drops Lightning's product tips and notes about its own defaults."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every other record."""
        return not str(record.msg).startswith(ADVERTS)


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (sys.stdout, sys.stderr)


def configure_console() -> None:
    """Remove the console handler ``import lightning`` adds (Hydra's root handlers already print
    and file every record, so Lightning's lines appeared twice), drop Lightning's tips and other
    packages' deprecation warnings, and quiet ranks ≥ 1."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=OWN_MODULES)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(DropAdverts())
    root = logging.getLogger()
    if root.handlers:
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if _is_console(handler):
                    logger.removeHandler(handler)
            logger.propagate = True
    if not is_rank_zero():
        for handler in root.handlers:
            if _is_console(handler) and not any(
                isinstance(f, RankZeroConsole) for f in handler.filters
            ):
                handler.addFilter(RankZeroConsole())


class _WeightsOnlySummary(LightningSummary):
    """Lightning's summary table without the torchmetrics objects (they are modules for device
    placement only: no weights, nothing a reader looks for in an architecture)."""

    def _is_metric(self, name: str) -> bool:
        metrics = getattr(self, "_metric_names", None)
        if metrics is None:
            metrics = [n for n, m in self._model.named_modules() if isinstance(m, Metric)]
            self._metric_names = metrics
        return any(name == m or name.startswith(m + ".") for m in metrics)

    @property
    def named_modules(self) -> list[tuple[str, nn.Module]]:
        """The model's modules, metrics left out."""
        return [(n, m) for n, m in super().named_modules if not self._is_metric(n)]

    @property
    def total_training_modes(self) -> dict[str, int]:
        """Train/eval counts of the modules that are not metrics."""
        modes = [m.training for n, m in self._model.named_modules() if n and not self._is_metric(n)]
        return {"train": modes.count(True), "eval": modes.count(False)}


class ModelSummaryNoFlops(ModelSummary):
    """Lightning's model summary without its FLOPs column and "Total Flops" line (they read 0
    for every model here: it counts only with an example input; ``model.txt`` and the log's
    "Model:" line hold the real FLOP count) and without the metric objects."""

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The table's rows: the network's modules, not the metrics."""
        return _WeightsOnlySummary(pl_module, max_depth=self._max_depth)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        """Log the table without FLOPs."""
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, 0, *data
        )
        lines = [line for line in table.splitlines() if not line.rstrip().endswith("Total Flops")]
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info(
            "\n" + "\n".join(lines)
        )


class FileProfiler(SimpleProfiler):
    """Lightning's simple profiler, its report (hundreds of lines) written to
    ``<dirpath>/<stage>-<filename>.txt`` and pointed to by one log line."""

    def __init__(self, dirpath: str, filename: str = "profiler", extended: bool = True) -> None:
        super().__init__(dirpath=dirpath, filename=filename, extended=extended)

    def describe(self) -> None:
        """Write the report, then log where it is (rank 0)."""
        path = Path(str(self.dirpath)) / self._prepare_filename()
        stage = getattr(self._stage, "value", self._stage) or "run"
        super().describe()
        if self._local_rank in (None, 0) and path.is_file():
            log.info("%s profiler report: %s", stage, path)


def running_metrics(pl_module: Any, stage: str = "train") -> dict[str, float]:
    """This epoch's running ``<stage>/<name>`` values from the module's torchmetrics, computed on
    this process only (no collective call: the progress display runs on rank 0 alone)."""
    out: dict[str, float] = {}
    for name in ("loss", "acc1", "acc5"):
        metric = getattr(pl_module, f"{stage}_{name}", None)
        if metric is None or not getattr(metric, "update_count", 0):
            continue
        to_sync = metric._to_sync
        metric._to_sync = False
        try:
            out[f"{stage}/{name}"] = float(metric.compute())
        finally:
            metric._to_sync = to_sync
            metric._computed = None
    return out
