"""A quiet, truthful console: each line once, from rank 0, with the current epoch's numbers."""

from __future__ import annotations

import logging
import sys
from typing import Any

from lightning.pytorch.callbacks import ModelSummary

from framework.rundir import is_rank_zero

__all__ = ["ModelSummaryNoFlops", "RankZeroConsole", "configure_console", "running_metrics"]

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class RankZeroConsole(logging.Filter):
    """On ranks ≥ 1 only warnings and errors reach the console (the rank's log file keeps all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep warnings and above."""
        return record.levelno >= logging.WARNING


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (sys.stdout, sys.stderr)


def configure_console() -> None:
    """Remove the console handler ``import lightning`` adds (Hydra's root handlers already print
    and file every record, so Lightning's lines appeared twice), and quiet ranks ≥ 1."""
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


class ModelSummaryNoFlops(ModelSummary):
    """Lightning's model summary without its FLOPs column and "Total Flops" line: they read 0
    for every model here (it counts only with an example input); ``model.txt`` and the log's
    "Model:" line hold the real FLOP count."""

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
