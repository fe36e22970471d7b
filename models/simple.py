"""The original "Simple"/AllConvNet backbone: full-resolution [layer → BN → ReLU] blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = ["SimpleNet"]


@register_backbone
class SimpleNet(nn.Module):
    """``num_layers`` blocks of [layer → BatchNorm → ReLU] at full resolution, global average
    pool, dropout and a linear head.

    Args:
        layer: factory of the 2-D layers (``layer.conv2d(in, out)``).
        in_channels: image channels.
        num_classes: outputs of the linear head.
        image_size: input height/width (unused: every block keeps the resolution).
        num_layers: number of blocks; widths are ``channels[:num_layers]``.
        channels: block widths.
        dropout: dropout probability before the head.
    """

    LAYER_ROLE: ClassVar[str] = "2d"

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int,
        num_classes: int,
        image_size: int | None = None,
        num_layers: int = 4,
        channels: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [int(c) for c in channels]
        if not 1 <= num_layers <= len(widths):
            raise ValueError(
                f"net.num_layers={num_layers} must be between 1 and len(net.channels)={len(widths)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"net.dropout={dropout} must be in [0, 1)")
        blocks: list[nn.Module] = []
        c_in = in_channels
        for width in widths[:num_layers]:
            blocks += [layer.conv2d(c_in, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images → (B, num_classes) logits."""
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))
