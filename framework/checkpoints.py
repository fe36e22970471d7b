"""Checkpoint files, read and written in one place.

Reading: :func:`read_checkpoint` reads a file once, with ``weights_only=True`` — a file holding
Python objects that would run code on loading is refused unless ``trust_checkpoint=true`` — and
unreadable, truncated and foreign files share one error. :func:`read_weights_source` also reads
exported networks (``model.safetensors`` or its folder). Writing: :class:`SafeCheckpointIO`, the
project's Lightning ``CheckpointIO``, writes atomically and stops the run when a write fails; it
hands Lightning the checkpoint read at start-up instead of reading the file a second time. What
the best and last checkpoints hold and how they are named: :class:`RunCheckpoint`; their size:
:func:`size_line`."""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
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
from framework.errors import ConfigError
from models.pretrained import WEIGHTS_FILE, read_weights

__all__ = [
    "TRUST_KEY",
    "CheckpointWriteError",
    "LoadedCheckpoint",
    "RunCheckpoint",
    "SafeCheckpointIO",
    "read_checkpoint",
    "read_weights_source",
    "size_line",
    "unreadable",
]

log = logging.getLogger(__name__)
TRUST_KEY = "trust_checkpoint"
NET_PREFIX = "net."  # the backbone's keys inside the LightningModule's state dict


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the run stops (exit 1, no traceback)."""


# ------------------------------------------------------------------------------------- reading
@dataclass
class LoadedCheckpoint:
    """A checkpoint read once: its path, the config key that named it, and its contents (a
    Lightning checkpoint dict; ``{"state_dict": ...}`` for an exported network)."""

    path: str
    key: str
    data: dict[str, Any]

    @property
    def state_dict(self) -> Any:
        """The LightningModule's tensors (backbone keys prefixed ``net.``)."""
        return self.data.get("state_dict", self.data)


def _label(key: str, path: str) -> str:
    return f"{key}={path}" if key else f"the checkpoint {path}"


def _others(path: str) -> str:
    """What else the folder offers: ``last*.ckpt`` resume a run; the best checkpoints hold
    weights only and start a new run with ``init_from``."""
    here = Path(path)
    others = sorted(p.name for p in here.parent.glob("*.ckpt") if p.name != here.name)
    full = [n for n in others if n.startswith("last")]
    weights = [n for n in others if n.startswith("best")]
    rest = [n for n in others if n not in full and n not in weights]
    hints = []
    if full:
        hints.append(f"Resume from {' or '.join(full)} there with ckpt_path=PATH.")
    if weights:
        hints.append(
            f"{', '.join(weights)} there hold(s) weights only: start a new run from it with "
            "init_from=PATH."
        )
    if rest:
        hints.append(f"Other checkpoints there: {', '.join(rest)}.")
    return " ".join(hints) or "No other checkpoint is there."


def unreadable(key: str, path: str, reason: str) -> ConfigError:
    """The one error for a file that is not a readable checkpoint (truncated, corrupt, foreign)."""
    return ConfigError(
        f"Invalid configuration: {_label(key, path)} cannot be read as a checkpoint ({reason}); "
        f"it is truncated or corrupt (an interrupted copy or write), or not a checkpoint. "
        f"{_others(path)} Give another checkpoint, or drop {key or 'it'}."
    )


def _refusal(err: Exception) -> tuple[bool, str]:
    """Whether torch's weights-only unpickler refused a Python object (an import of a function
    or class: code would run), and the line of its message that says what."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return True, line.rstrip(".")
    for line in lines:
        if "Unsupported" in line:
            return False, line.rstrip(".")
    return False, lines[0] if lines else type(err).__name__


def read_checkpoint(path: str | Path, key: str, *, trust: bool = False) -> LoadedCheckpoint:
    """Read checkpoint ``path`` (named by config key ``key``) with ``weights_only=True`` unless
    ``trust``; a file that needs arbitrary unpickling is refused before any of it runs.

    Every failure is a :class:`ConfigError` (exit 1, one paragraph, nothing written)."""
    path = str(path)
    if trust:
        log.warning(
            "%s=true: reading %s with full unpickling; a malicious file runs code now",
            TRUST_KEY,
            path,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols of foreign files
            data = torch.load(
                path, map_location="cpu", weights_only=not trust, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as err:
        unsafe, reason = _refusal(err)
        if trust or not unsafe:
            raise unreadable(key, path, f"UnpicklingError: {reason}") from None
        raise ConfigError(
            f"Invalid configuration: {_label(key, path)} contains Python objects that would run "
            f"code on loading ({reason}), so it was not loaded. Checkpoints written "
            f"by this framework never need that. If you trust the file and its author, set "
            f"{TRUST_KEY}=true to load it with full unpickling."
        ) from None
    except Exception as err:  # torch raises many types for damaged or foreign files
        text = str(err).splitlines()[0] if str(err) else "empty or cut short"
        raise unreadable(key, path, f"{type(err).__name__}: {text}") from None
    if not isinstance(data, dict):
        raise unreadable(key, path, f"it holds a {type(data).__name__}, not a dictionary")
    return LoadedCheckpoint(path, key, data)


def read_weights_source(path: str | Path, key: str, *, trust: bool = False) -> LoadedCheckpoint:
    """Weights for ``init_from``: a checkpoint file, an exported network's folder, or its
    ``model.safetensors`` (backbone keys, returned ``net.``-prefixed like a checkpoint's)."""
    source = Path(path)
    weights = source / WEIGHTS_FILE if source.is_dir() else source
    if source.is_dir() and not weights.is_file():
        raise ConfigError(
            f"Invalid configuration: {key}={path} is a directory without {WEIGHTS_FILE}; give "
            "an exported network's directory (python -m framework.export) or a checkpoint file."
        )
    if weights.suffix != ".safetensors":
        return read_checkpoint(weights, key, trust=trust)
    try:
        tensors = read_weights(weights)
    except ValueError as err:
        raise unreadable(key, str(weights), str(err).split(" (", 1)[-1].rstrip(")")) from None
    state = {f"{NET_PREFIX}{k}": v for k, v in tensors.items()}
    return LoadedCheckpoint(str(path), key, {"state_dict": state})


# ------------------------------------------------------------------------------------- writing
def _same_file(a: Any, b: Any) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints as temp file + fsync + ``os.replace`` and raises on any write error
    (disk full, permission denied, a path in the way) instead of carrying on: a run that cannot
    save checkpoints must not keep training. A failed write never leaves a partial file.

    Reads go through :func:`read_checkpoint` (``weights_only=True`` unless ``trust``); the
    checkpoint already read at start-up (``preloaded``) is handed over once instead of being
    read again."""

    def __init__(self, trust: bool = False, preloaded: LoadedCheckpoint | None = None) -> None:
        super().__init__()
        self.trust = trust
        self._preloaded = preloaded

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The start-up checkpoint when ``path`` is its file (once), else one safe read."""
        pre = self._preloaded
        if pre is not None and _same_file(pre.path, path):
            self._preloaded = None  # Lightning keeps it until the restore is done
            return pre.data
        trust = self.trust or weights_only is False
        return read_checkpoint(path, "", trust=trust).data

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
