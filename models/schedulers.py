"""Learning-rate schedules that need the run length (built in ``configure_optimizers``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine"]


class _WarmupCosineFactor:
    """lr multiplier: linear warm-up to 1, then cosine down to ``min_lr_ratio`` (picklable)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


class WarmupCosine(LambdaLR):
    """Per-step linear warm-up for ``warmup_epochs`` then cosine decay to ``min_lr_ratio``·lr.

    ``total_steps`` and ``steps_per_epoch`` are filled in from the trainer.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        warmup = min(round(warmup_epochs * steps_per_epoch), max(0, total_steps - 1))
        self.factor = _WarmupCosineFactor(warmup, total_steps, float(min_lr_ratio))
        super().__init__(optimizer, self.factor)
