"""Failures that must stop a run loudly: non-finite losses or weights; plus the Trainer arguments
every run gets (the failing-loudly checkpoint writer of :mod:`framework.checkpoints`)."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig

from datamodules.errors import UserError
from framework.checkpoints import LoadedCheckpoint, SafeCheckpointIO

__all__ = [
    "LAST_FINITE",
    "NonFiniteLossError",
    "StopOnNonFiniteLoss",
    "trainer_kwargs",
]

log = logging.getLogger(__name__)
LAST_FINITE = "last-finite.ckpt"


class NonFiniteLossError(UserError):
    """The training loss became NaN/inf; the run stops (exit 1, no traceback)."""


# ------------------------------------------------------------------------------------ NaN stop
class StopOnNonFiniteLoss(Callback):
    """Stops training when an epoch ends with a non-finite mean of a ``monitor`` metric (by
    default the training and validation loss) or non-finite weights/buffers, for ``patience``
    epochs in a row. Runs before the checkpoint callbacks, so the failing epoch is never saved; with
    ``patience > 1`` the last finite ``last.ckpt`` is copied to ``last-finite.ckpt`` first."""

    def __init__(
        self, patience: int = 1, monitor: Sequence[str] = ("train/loss", "val/loss")
    ) -> None:
        if int(patience) < 1:
            raise ValueError(f"callbacks.stop_on_nonfinite.patience={patience} must be ≥ 1")
        self.patience = int(patience)
        self.monitor = [monitor] if isinstance(monitor, str) else list(monitor)
        self.bad_epochs = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count from zero in every fit."""
        self.bad_epochs = 0

    def _last_checkpoint(self, trainer: pl.Trainer) -> Path | None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath and cb.monitor is None:
                path = Path(cb.dirpath) / f"{cb.filename or 'last'}{cb.FILE_EXTENSION}"
                if path.is_file():
                    return path
        return None

    def _problems(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        found = []
        for name in self.monitor:
            value = trainer.callback_metrics.get(name)
            if value is not None and not math.isfinite(float(value)):
                found.append(f"{name}={float(value)}")
        bad = [
            n
            for n, t in pl_module.state_dict().items()
            if t.is_floating_point() and not torch.isfinite(t).all()
        ]  # weights and buffers (e.g. BatchNorm running_var overflowing to inf)
        if bad:
            found.append(f"{len(bad)} saved tensors hold NaN/inf (first: {bad[0]})")
        return found

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the epoch; raise :class:`NonFiniteLossError` when patience runs out."""
        problems = self._problems(trainer, pl_module)
        last = self._last_checkpoint(trainer)
        spare = last.parent / LAST_FINITE if last is not None else None
        if not problems:
            self.bad_epochs = 0
            if spare is not None and spare.exists() and trainer.is_global_zero:
                spare.unlink()
            return
        self.bad_epochs += 1
        if self.bad_epochs < self.patience:
            if last is not None and spare is not None and self.bad_epochs == 1:
                if trainer.is_global_zero:
                    shutil.copy2(last, spare)
            log.warning(
                "epoch %d: %s (%d of %d non-finite epochs allowed)",
                trainer.current_epoch + 1,
                "; ".join(problems),
                self.bad_epochs,
                self.patience,
            )
            return
        keep = spare if spare is not None and spare.exists() else last
        group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        lr = group.get("initial_lr", group.get("lr"))
        kept = f"The last finite checkpoint is {keep}." if keep else "No checkpoint was saved."
        raise NonFiniteLossError(
            f"Training stopped at epoch {trainer.current_epoch + 1}: {'; '.join(problems)} "
            f"({self.bad_epochs} non-finite epoch(s) in a row; "
            f"callbacks.stop_on_nonfinite.patience={self.patience}). Likely causes: a learning "
            f"rate too high (optimizer.lr={lr}; lower it), no gradient clipping (set "
            "trainer.gradient_clip_val=1.0), fp16 overflow (trainer.precision), or NaN/inf in "
            f"the inputs. {kept} Start a new run directory with the fix, e.g. with "
            "init_from=<that checkpoint> to keep its weights."
        )


def trainer_kwargs(
    cfg: DictConfig, preloaded: LoadedCheckpoint | None = None
) -> dict[str, Any]:
    """Trainer arguments every run gets: the project's checkpoint IO (fails loudly on writes,
    reads safely, hands over the ``preloaded`` start-up checkpoint), and SyncBatchNorm only where
    it works (CUDA), since DDP on CPU (gloo) cannot synchronise BatchNorm."""
    io = SafeCheckpointIO(trust=bool(cfg.get("trust_checkpoint", False)), preloaded=preloaded)
    out: dict[str, Any] = {"plugins": [io]}
    t = cfg.trainer
    if t.get("sync_batchnorm"):
        accelerator = str(t.get("accelerator", "auto"))
        on_gpu = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        )
        if not on_gpu:
            log.info("trainer.sync_batchnorm: off on %s (BatchNorm statistics per process)",
                     accelerator)
            out["sync_batchnorm"] = False
    return out
