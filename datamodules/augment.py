"""timm-style augmentation from ``torchvision.transforms.v2``: RandAugment / TrivialAugment and
random erasing per image, MixUp / CutMix per training batch (soft targets, hard labels kept)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["AUTO_AUGMENTS", "BatchMixer", "auto_augment_steps", "random_erasing_steps"]

AUTO_AUGMENTS: tuple[str, ...] = ("randaugment", "trivialaugment")


def auto_augment_steps(name: str | None) -> list[Any]:
    """``[RandAugment()]``, ``[TrivialAugmentWide()]`` or ``[]`` (before the tensor steps)."""
    if name is None:
        return []
    if name == "randaugment":
        return [v2.RandAugment()]
    if name == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    raise ValueError(
        f"dataset.auto_augment={name!r} is not supported; choose one of {[None, *AUTO_AUGMENTS]}"
    )


def random_erasing_steps(p: float) -> list[Any]:
    """``[RandomErasing(p)]`` (on the normalised tensor) or ``[]`` for ``p == 0``."""
    return [v2.RandomErasing(p=p, value=0)] if p > 0 else []


class BatchMixer:
    """MixUp and/or CutMix on a training batch (one of them, 50/50, when both are on).

    ``(x, y) → (x_mixed, y, soft)``: ``soft`` (B, num_classes) are the mixed targets for the
    loss; ``y`` stays the original hard labels (what accuracy is measured against).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        ops: list[Any] = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
        self.op: Any = None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @property
    def enabled(self) -> bool:
        """Whether any mixing is configured."""
        return self.op is not None

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mix a batch; the draws come from the global torch RNG (restored on resume)."""
        if self.op is None:
            raise RuntimeError("BatchMixer has neither MixUp nor CutMix enabled")
        mixed, soft = self.op(x, y)
        return mixed, y, soft.to(torch.float32)
