"""Checkpoint files: writing them so that a failed write stops the run and never leaves a partial
file (:class:`SafeCheckpointIO`, the project's Lightning ``CheckpointIO``); what the best and
last checkpoints hold and how they are named (:class:`RunCheckpoint`); their size."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import nn

from datamodules.errors import UserError

__all__ = ["CheckpointWriteError", "RunCheckpoint", "SafeCheckpointIO", "size_line"]

log = logging.getLogger(__name__)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the run stops (exit 1, no traceback)."""


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


class RunCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint callback with what a person reads and a run relies on:

    - file names count epochs from 1 (``best-epoch001-…`` is the first epoch);
    - a weights-only save (the best checkpoint by default) holds the EMA weights when EMA is on,
      like a full checkpoint's ``state_dict``;
    - one lineage across run directories: resuming into another directory keeps the old run's
      best checkpoint (path and score) as the one a new checkpoint must beat, and files outside
      this run's ``checkpoints/`` are never deleted.
    """

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, Any]:
        candidates = super()._monitor_candidates(trainer)
        candidates["epoch"] = torch.tensor(trainer.current_epoch + 1)
        return candidates

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """In the same directory: Lightning's restore. In another: the incumbent best only."""
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        path, score = state_dict.get("best_model_path"), state_dict.get("best_model_score")
        if self.monitor is None or not path or score is None or not Path(path).is_file():
            return
        self.best_model_path = self.kth_best_model_path = path
        self.best_model_score = self.kth_value = score
        self.best_k_models = {path: score}
        log.info("resume: the best checkpoint so far is %s (%s=%.4f); a new best must beat it",
                 path, self.monitor, float(score))

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self.dirpath is None or Path(filepath).resolve().parent != Path(self.dirpath).resolve():
            return  # another run's file (the incumbent of a resumed lineage): never deleted
        super()._remove_checkpoint(trainer, filepath)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not self.save_weights_only:
            super()._save_checkpoint(trainer, filepath)
            return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
        for callback in trainer.callbacks:
            averaged = getattr(callback, "averaged_state_dict", None)
            state = averaged() if callable(averaged) else None
            if state is not None:
                checkpoint["state_dict"] = state  # what validation just measured
        trainer.strategy.save_checkpoint(checkpoint, filepath)
        trainer.strategy.barrier("RunCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


# Optimizer state per parameter, in parameter-sized tensors (Adam/AdamW: two moments).
OPTIMIZER_STATE = {"Adam": 2, "AdamW": 2, "SGD": 1}


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def size_line(net: nn.Module, cfg: DictConfig, callbacks: list[pl.Callback]) -> str:
    """The start-up line ``checkpoints: ~X per save``: ``last.ckpt`` (weights, optimizer state,
    EMA weights) plus the best checkpoint (weights only unless configured otherwise)."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    name = str(cfg.optimizer.get("_target_", "")).rsplit(".", 1)[-1]
    moments = OPTIMIZER_STATE.get(name, 0)
    if name == "SGD" and not cfg.optimizer.get("momentum"):
        moments = 0
    ema = bool(cfg.get("ema") and cfg.ema.get("enabled", False))
    last = weights + moments * params + (weights if ema else 0)
    best_callbacks = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    full_best = any(not c.save_weights_only for c in best_callbacks)
    best = (last if full_best else weights) if best_callbacks else 0
    parts = ["weights"] + ([f"{name} state"] if moments else []) + (["EMA"] if ema else [])
    kind = "complete" if full_best else "weights only" + (" (EMA)" if ema else "")
    return (
        f"checkpoints: ~{_size(last + best)} per save (last.ckpt {_size(last)}: "
        f"{', '.join(parts)}; best {_size(best)}: {kind}, written when val/acc1 improves)"
    )
