"""Checkpoint files: writing them so that a failed write stops the run and never leaves a partial
file (:class:`SafeCheckpointIO`, the project's Lightning ``CheckpointIO``)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from datamodules.errors import UserError

__all__ = ["CheckpointWriteError", "SafeCheckpointIO"]


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
