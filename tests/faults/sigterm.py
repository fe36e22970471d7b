"""A test callback that sends this process SIGTERM at a fixed optimizer step: a real signal at
a reproducible point (``+callbacks.sigterm._target_=tests.faults.sigterm.SigtermAt``). Where and
how comes from the environment (``SIGTERM_AT=step[,times[,hang_s]]``), so the resumed run has
the same config (the resume rule refuses a changed callback) and, without the variable, never
signals."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["SigtermAt"]


class SigtermAt(Callback):
    """After optimizer step ``step``: send SIGTERM ``times`` times, then block ``hang_s``
    seconds inside the batch (a step that never reaches the next batch boundary)."""

    def __init__(self) -> None:
        spec = [*os.environ.get("SIGTERM_AT", "").split(","), "", "", ""]
        self.step = int(spec[0]) if spec[0] else -1
        self.times = int(spec[1]) if spec[1] else 1
        self.hang_s = float(spec[2]) if spec[2] else 0.0
        self.sent = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """Signal once, at the chosen step."""
        if self.sent or trainer.global_step != self.step:
            return
        self.sent = True
        for _ in range(self.times):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.hang_s:
            time.sleep(self.hang_s)
