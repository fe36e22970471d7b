"""Failures that must stop a run loudly: checkpoint writes that fail, non-finite losses; plus the
bookkeeping an exact resume needs (accumulated train time, the config inside checkpoints) and
strict JSON."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from datamodules.errors import UserError

__all__ = [
    "CheckpointWriteError",
    "NonFiniteLossError",
    "RunConfig",
    "SafeCheckpointIO",
    "StopOnNonFiniteLoss",
    "TrainClock",
    "dumps_strict",
    "finite_or_none",
    "run_callbacks",
    "total_train_time",
    "trainer_kwargs",
]

log = logging.getLogger(__name__)
LAST_FINITE = "last-finite.ckpt"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the run stops (exit 1, no traceback)."""


class NonFiniteLossError(UserError):
    """The training loss became NaN/inf; the run stops (exit 1, no traceback)."""


# ------------------------------------------------------------------------------- checkpoints
class SafeCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints as temp file + fsync + ``os.replace`` and raises on any write error
    (disk full, permission denied, a path in the way) instead of carrying on: a run that cannot
    save checkpoints must not keep training. A failed write never leaves a partial file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Serialise in memory, then write atomically; :class:`CheckpointWriteError` on failure."""
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options")
        target = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            reason = err.strerror or str(err)
            raise CheckpointWriteError(
                f"Could not write checkpoint {target} ({reason}); the run stops now rather than "
                "train on without anything to resume from. Free disk space or fix the folder "
                f"({target.parent}), then resume the run with the same hydra.run.dir and "
                "ckpt_path=last (earlier checkpoints are intact)."
            ) from None


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
                trainer.current_epoch,
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
            f"Training stopped at epoch {trainer.current_epoch}: {'; '.join(problems)} "
            f"({self.bad_epochs} non-finite epoch(s) in a row; "
            f"callbacks.stop_on_nonfinite.patience={self.patience}). Likely causes: a learning "
            f"rate too high (optimizer.lr={lr}; lower it), no gradient clipping (set "
            "trainer.gradient_clip_val=1.0), fp16 overflow (trainer.precision), or NaN/inf in "
            f"the inputs. {kept} Start a new run directory with the fix, e.g. with "
            "init_from=<that checkpoint> to keep its weights."
        )


# ---------------------------------------------------------------------- resume bookkeeping
class TrainClock(Callback):
    """Keeps the training time of earlier attempts in the checkpoint, so ``train_time_s`` of a
    resumed run counts the whole run, not only the resumed part."""

    def __init__(self) -> None:
        self.before = 0.0
        self._start: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start this attempt's clock."""
        self._start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """Training time up to this checkpoint, all attempts together."""
        now = 0.0 if self._start is None else time.perf_counter() - self._start
        return {"train_time_s": self.before + now}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Time spent by the attempts before this one."""
        self.before = float(state_dict.get("train_time_s", 0.0))


class RunConfig(Callback):
    """Stores the resolved run config in every checkpoint, so a resume can be checked against
    the config that produced it."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        """The config (plain containers: loadable with ``weights_only=True``)."""
        return {"config": self.config}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the config was compared before training started."""


def run_callbacks(cfg: DictConfig) -> list[Callback]:
    """Callbacks every run needs for faults and resumes (added after the configured ones)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    resolved.pop("paths", None)
    return [TrainClock(), RunConfig(resolved)]


def total_train_time(trainer: pl.Trainer, this_attempt: float) -> float:
    """``this_attempt`` plus the training time of earlier attempts (from the checkpoint)."""
    before = sum(cb.before for cb in trainer.callbacks if isinstance(cb, TrainClock))
    return before + this_attempt


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments every run gets: the failing-loudly checkpoint writer, and SyncBatchNorm
    only where it works (CUDA), since DDP on CPU (gloo) cannot synchronise BatchNorm."""
    out: dict[str, Any] = {"plugins": [SafeCheckpointIO()]}
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


# ------------------------------------------------------------------------------- strict JSON
def finite_or_none(value: Any) -> Any:
    """Non-finite floats become ``None`` (JSON ``null``), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps_strict(data: Any) -> str:
    """Standard JSON only: NaN/inf are written as ``null`` (``json.dumps`` would write ``NaN``)."""
    return json.dumps(finite_or_none(data), indent=2, sort_keys=True, allow_nan=False) + "\n"
