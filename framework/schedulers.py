"""Learning-rate schedules that need the run length (built in ``configure_optimizers``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosine"]


class WarmupCosine(LRScheduler):
    """Per-step linear warm-up for ``warmup_epochs``, then cosine decay to ``min_lr_ratio``·lr.

    ``total_steps`` and ``steps_per_epoch`` are filled in from the trainer. The state holds only
    numbers, so checkpoints stay loadable with ``weights_only=True``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        self.total_steps = int(total_steps)
        self.warmup_steps = min(round(warmup_epochs * steps_per_epoch), max(0, total_steps - 1))
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        """The lr multiplier at ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        """Base learning rates scaled by :meth:`factor`."""
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
