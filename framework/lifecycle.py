"""A run's lifecycle beyond one uninterrupted fit: resuming a run that already finished, and
SIGTERM (what SLURM sends at preemption or at the time limit).

On SIGTERM the run stops at the next batch boundary, saves a resumable checkpoint of that
position (``last.ckpt``), writes nothing that claims completion and exits with status 143. A
second SIGTERM, or :data:`GRACE_S` seconds without reaching a batch boundary, exits 143 at once
without saving (the last checkpoint stays valid).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

__all__ = ["GRACE_S", "SIGTERM_EXIT", "GracefulStop", "completed", "exit_on_sigterm"]

log = logging.getLogger(__name__)

SIGTERM_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM
GRACE_S = 30.0


def completed(checkpoint: dict[str, Any], cfg: DictConfig) -> str | None:
    """Why the run that wrote ``checkpoint`` is already complete under ``cfg`` (``None`` when
    training would continue): its finished epochs reach ``trainer.max_epochs``, or its steps
    ``trainer.max_steps``."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    epochs = progress.get("current", {}).get("processed")
    step = checkpoint.get("global_step")
    max_epochs, max_steps = cfg.trainer.max_epochs, cfg.trainer.max_steps
    if max_steps not in (None, -1) and isinstance(step, int) and step >= max_steps:
        return f"it made {step} optimizer steps and trainer.max_steps={max_steps}"
    if max_epochs not in (None, -1) and isinstance(epochs, int) and epochs >= max_epochs:
        return f"it trained {epochs} epochs and trainer.max_epochs={max_epochs}"
    return None


def _last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """Where the ``last`` checkpoint goes (the checkpoint callback without a monitor)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor is None and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.filename or 'last'}{cb.FILE_EXTENSION}"
    return None


def _exit_now(reason: str) -> None:
    """Exit 143 without cleanup (called from a signal handler or the grace timer)."""
    log.error(
        "%s: exiting now with status %d; the last checkpoint stays valid", reason, SIGTERM_EXIT
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(SIGTERM_EXIT)


class GracefulStop(Callback):
    """SIGTERM → stop at the next batch boundary with a resumable checkpoint of that position.

    :meth:`install` sets the handler before ``fit`` (Lightning chains it to its own, which
    stops the loops at batch boundaries). In the middle of a gradient-accumulation window, and
    at an epoch's last batch (before its validation and epoch-end hooks), the position cannot
    be saved exactly, so the previous checkpoint is kept.
    """

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = float(grace_s)
        self.received = 0
        self.fitting = False
        self.saved: Path | None = None
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        """Handle SIGTERM in this (main) thread from now on."""
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.received += 1
        if self.received > 1:
            _exit_now("second SIGTERM")
        if not self.fitting:
            log.warning("SIGTERM outside training: exiting with status %d", SIGTERM_EXIT)
            raise SystemExit(SIGTERM_EXIT)
        log.warning(
            "SIGTERM: stopping at the next batch boundary (at most %.0f s) with a resumable "
            "checkpoint",
            self.grace_s,
        )
        self._timer = threading.Timer(
            self.grace_s, _exit_now, args=(f"no batch boundary within {self.grace_s:.0f} s",)
        )
        self._timer.daemon = True
        self._timer.start()

    def _boundary(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training from here on: a SIGTERM waits for a batch boundary."""
        self.fitting = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training is over (the test follows)."""
        self.fitting = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """At a batch boundary after SIGTERM: save this position (Lightning then stops)."""
        if not self.received:
            return
        self._boundary()
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.current.processed >= trainer.num_training_batches:
            log.warning(
                "SIGTERM at an epoch's last batch, before its validation and epoch end: "
                "keeping the previous checkpoint (the epoch is redone on resume)"
            )
            return
        if loop._should_accumulate():
            log.warning(
                "SIGTERM inside a gradient-accumulation window: keeping the previous checkpoint"
            )
            return
        path = _last_checkpoint(trainer)
        if path is None:
            log.warning("SIGTERM: no last checkpoint is configured; nothing saved")
            return
        trainer.save_checkpoint(path)
        self.saved = path
        log.warning(
            "SIGTERM: saved %s at epoch %d, batch %d (global step %d); resume with the same "
            "hydra.run.dir and ckpt_path=last",
            path,
            trainer.current_epoch,
            loop.batch_progress.current.processed,
            trainer.global_step,
        )

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """A batch boundary: Lightning stops here; the epoch's checkpoint stays the last one."""
        if self.received:
            self._boundary()

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """A batch boundary during the test: no results are written."""
        if self.received:
            self._boundary()


@contextmanager
def exit_on_sigterm(stop: GracefulStop) -> Iterator[None]:
    """Install ``stop``'s handler for the block; Lightning's SIGTERM stop (a ``SystemExit``
    without a code, i.e. status 0) becomes exit status 143."""
    previous = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        yield
    except SIGTERMException:
        raise SystemExit(SIGTERM_EXIT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
