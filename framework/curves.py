"""``curves.png``: a picture of a run's ``metrics.csv`` (loss, top-1 and learning rate against
epoch, the best validation epoch marked, where each resumed attempt began), redrawn after every
epoch so an interrupted run has one; also sent to TensorBoard / W&B at the end of training."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["TrainingCurves", "plot_curves", "read_metrics"]

log = logging.getLogger(__name__)


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats (missing cells are NaN)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in (rows[0] if rows else {}) if k]
    return {k: [_float(r.get(k)) for r in rows] for k in keys}


def _best_epoch(cols: dict[str, list[float]]) -> float | None:
    """The epoch of the highest ``val/acc1`` (the first one on ties, as the checkpoint does)."""
    values = cols.get("val/acc1", [])
    best: tuple[float, float] | None = None
    for epoch, v in zip(cols.get("epoch", []), values):
        if not math.isnan(v) and (best is None or v > best[1]):
            best = (epoch, v)
    return None if best is None else best[0]


def plot_curves(
    metrics_csv: Path, out: Path, resumed_at: Sequence[int] = (), title: str = ""
) -> Path | None:
    """Draw ``out`` from ``metrics_csv``: train/val loss, train/val top-1 and the learning rate
    against epoch; the best validation epoch as a green line, resumes as grey dashed lines
    (``resumed_at``: how many epochs were done when each resumed attempt began); ``title`` names
    the run.
    Returns ``out``, or None when the file has no epoch yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = read_metrics(metrics_csv)
    epochs = cols.get("epoch", [])
    if not epochs:
        return None
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    marker = "o" if len(epochs) <= 20 else None
    panels = [
        (axes[0], "loss", [("train/loss", "train"), ("val/loss", "val")], 1.0),
        (axes[1], "top-1 %", [("train/acc1", "train"), ("val/acc1", "val")], 100.0),
        (axes[2], "learning rate", [(k, k) for k in cols if k == "lr" or k.startswith("lr")],
         1.0),
    ]
    for ax, name, series, scale in panels:
        for key, label in series:
            if key in cols and not all(math.isnan(v) for v in cols[key]):
                ax.plot(epochs, [v * scale for v in cols[key]], marker=marker, ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    best = _best_epoch(cols)
    for ax in axes:
        if best is not None:
            ax.axvline(best, color="tab:green", lw=1, alpha=0.8,
                       label=f"best val (epoch {best:g})")
        for i, done in enumerate(d for d in resumed_at if 0 < d <= len(epochs)):
            # between the last row of the earlier attempt and the first of the resumed one
            x = (epochs[done - 1] + epochs[done]) / 2 if done < len(epochs) else epochs[-1] + 0.5
            ax.axvline(x, color="grey", ls="--", lw=1, label="resumed" if i == 0 else None)
    summary = f"{len(epochs)} epochs"
    if best is not None:
        acc = dict(zip(epochs, cols["val/acc1"]))[best] * 100
        axes[1].annotate(f"{acc:.2f}", (best, acc), textcoords="offset points", xytext=(4, -12),
                         fontsize=8, color="tab:green")
        summary += f", best val top-1 {acc:.2f} % at epoch {best:g}"
    fig.suptitle(f"{title} ({summary})" if title else summary, fontsize=10)
    for ax in axes[:2]:
        if ax.lines:
            ax.legend(fontsize=8)
    lr = [v for k in cols if k.startswith("lr") for v in cols[k] if v > 0]
    if lr and max(lr) / min(lr) > 50:
        axes[2].set_yscale("log")
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=80)
    tmp.replace(out)
    return out


class TrainingCurves(Callback):
    """Redraws ``curves.png`` from ``metrics.csv`` after every training epoch (rank 0; add it
    after the callback that writes metrics.csv). Where each resumed attempt began is kept in
    the checkpoint, so a resumed run's picture marks every attempt."""

    def __init__(self, metrics_csv: Path, out: Path, title: str = "") -> None:
        self.metrics_csv = Path(metrics_csv)
        self.out = Path(out)
        self.title = title
        self.resumed_at: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        """How many epochs were done when each earlier attempt resumed."""
        return {"resumed_at": list(self.resumed_at)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the resume epochs of earlier attempts."""
        self.resumed_at = [int(e) for e in state_dict.get("resumed_at", [])]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that starts past epoch 0 is a resumed attempt."""
        epoch = trainer.current_epoch
        self.resumed_at = [e for e in self.resumed_at if e < epoch]
        if epoch > 0:
            self.resumed_at.append(epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Redraw the picture (metrics.csv has this epoch's row by now)."""
        if trainer.is_global_zero and not trainer.fast_dev_run and self.metrics_csv.is_file():
            plot_curves(self.metrics_csv, self.out, self.resumed_at, self.title)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Send the final picture to the image-capable loggers."""
        if not trainer.is_global_zero or not self.out.is_file():
            return
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="curves", images=[str(self.out)], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                import numpy as np
                from matplotlib.image import imread

                image = np.asarray(imread(self.out))[..., :3]
                logger.experiment.add_image("curves", image, trainer.global_step,
                                            dataformats="HWC")
