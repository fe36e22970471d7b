"""``ema=on``: an exponential moving average of the weights, validated and tested with (added to
every run's callbacks by :func:`framework.callbacks.build_callbacks`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging

__all__ = ["EMA"]


class EMA(EMAWeightAveraging):
    """Lightning's EMA callback; outside ``fit`` (testing a checkpoint) the checkpoint's
    ``state_dict`` — the EMA weights — is used as is, instead of the current weights."""

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the average (and the current weights) only when resuming a fit."""
        if trainer.state.fn != "fit":
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
