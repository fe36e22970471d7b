"""``ema=on``: an exponential moving average of the weights, validated and tested with."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import DictConfig

__all__ = ["EMA", "build_ema"]


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


def build_ema(cfg: DictConfig) -> list[pl.Callback]:
    """``[EMA(...)]`` when ``cfg.ema.enabled``, else ``[]``."""
    e = cfg.get("ema")
    if not e or not e.get("enabled", False):
        return []
    return [
        EMA(
            decay=float(e.decay),
            update_every_n_steps=int(e.update_every_n_steps),
            update_starting_at_step=e.update_starting_at_step,
            use_buffers=bool(e.use_buffers),
        )
    ]
