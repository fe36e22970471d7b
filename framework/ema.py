"""``ema=on``: an exponential moving average of the weights, validated and tested with (added to
every run's callbacks by :func:`framework.callbacks.build_callbacks`)."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor

__all__ = ["EMA", "horizon_warning"]

log = logging.getLogger(__name__)

HORIZON_SHARE = 0.2  # the average's horizon may span at most this share of the planned updates


def horizon_warning(
    decay: float, planned_steps: int, every: int = 1, start: int | None = None
) -> str | None:
    """The start-up warning for an average that cannot forget the initial weights within the
    run: its horizon, 1/(1−decay) updates, above 20 % of the updates the run plans (None if not)."""
    updates = max(0, planned_steps - (start or 0)) // max(1, every)
    horizon = math.inf if decay >= 1 else 1 / (1 - decay)
    budget = HORIZON_SHARE * updates
    if horizon <= budget:
        return None
    fits = math.floor((1 - 1 / budget) * 1000) / 1000 if budget > 1 else 0.0
    advice = f"ema.decay={fits:g} or lower" if fits > 0 else "ema=none"
    span = "forever" if math.isinf(horizon) else f"over about {horizon:.0f} updates"
    return (
        f"ema.decay={decay:g} averages {span} (1/(1-decay)), more than 20 % of the {updates} "
        f"updates this run plans ({planned_steps} optimizer steps): the averaged weights, used "
        "for validation, the best checkpoint and the test, would still hold much of the initial "
        f"weights at the end, and their accuracy can stay near chance. Use {advice} for this run "
        "length, or train longer."
    )



class EMA(EMAWeightAveraging):
    """Lightning's EMA callback; outside ``fit`` (testing a checkpoint) the checkpoint's
    ``state_dict`` — the EMA weights — is used as is, instead of the current weights. Warns at
    the start of a fit whose length the average does not fit (:func:`horizon_warning`)."""

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self.decay = float(decay)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn (never refuse) when the run is too short for this decay."""
        steps = trainer.estimated_stepping_batches
        if trainer.fast_dev_run or not math.isfinite(steps) or not trainer.is_global_zero:
            return
        message = horizon_warning(
            self.decay, int(steps), self.update_every_n_steps, self.update_starting_at_step
        )
        if message:
            log.warning(message)

    def averaged_state_dict(self) -> dict[str, Tensor] | None:
        """The EMA weights under the module's own names (what a weights-only checkpoint holds);
        None before fit."""
        if self._average_model is None:
            return None
        state = self._average_model.state_dict()
        return {name[7:]: value for name, value in state.items() if name.startswith("module.")}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the average (and the current weights) only when resuming a fit."""
        if trainer.state.fn != "fit":
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
