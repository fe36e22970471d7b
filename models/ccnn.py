"""CCNN's image network (Romero, Knigge et al.): a residual stack of S4-style blocks whose
spatial mixing is one layer of the chosen kind (CCNN: a separable FlexConv), at full resolution
unless ``downsampling`` places max-pools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = ["CCNN", "DROPOUT_TYPES", "CCNNBlock"]

DROPOUT_TYPES: tuple[str, ...] = ("Dropout", "Dropout2d")


def _pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    """CCNN's ``Linear2d`` (a 1×1 convolution), He-normal weights and zero bias."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.kaiming_normal_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class CCNNBlock(nn.Module):
    """CCNN's ``S4Block``: [norm →] layer → GELU → dropout → 1×1 → GELU, + shortcut [→ norm].

    With ``prenorm`` the BatchNorm comes first and the shortcut takes the un-normalised input.
    """

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int,
        out_channels: int,
        dropout: float,
        dropout_type: str,
        prenorm: bool,
    ) -> None:
        super().__init__()
        self.conv1 = layer.conv2d(in_channels, out_channels)
        self.nonlinears = nn.ModuleList((nn.GELU(), nn.GELU()))
        self.prenorm = prenorm
        self.norm1 = nn.BatchNorm2d(in_channels if prenorm else out_channels)
        self.linear1 = _pointwise(out_channels, out_channels)
        self.dp = getattr(nn, dropout_type)(dropout)
        shortcut = [_pointwise(in_channels, out_channels)] if in_channels != out_channels else []
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) → (B, out, H, W)."""
        shortcut = self.shortcut(x)
        if self.prenorm:
            x = self.norm1(x)
        out = self.nonlinears[1](self.linear1(self.dp(self.nonlinears[0](self.conv1(x)))))
        out = out + shortcut
        return out if self.prenorm else self.norm1(out)


@register_backbone
class CCNN(nn.Module):
    """CCNN's ``ResNet_image`` with S4 blocks (CCNN-``no_blocks``,``no_hidden``).

    input dropout → layer → BatchNorm → GELU → ``no_blocks`` blocks (max-pool after the blocks
    listed in ``downsampling``) → [BatchNorm] → global average pool → 1×1 head.

    Args:
        layer: the layer factory (2-D role).
        in_channels, num_classes, image_size: data shape.
        no_hidden: channels of every block (``net.no_hidden``).
        no_blocks: number of blocks (``net.no_blocks``).
        dropout: dropout inside each block (``net.dropout``).
        dropout_in: dropout on the input image (``net.dropout_in``).
        dropout_type: ``Dropout2d`` (whole channels, CCNN's image runs) or ``Dropout``.
        prenorm: BatchNorm before each block's layer, plus one before the pool
            (``net.block.prenorm``); else after each block's sum.
        downsampling: indices of the blocks followed by a max-pool (``net.downsampling``).
        downsampling_size: kernel and stride of those max-pools (``net.downsampling_size``).
    """

    LAYER_ROLE: ClassVar[str] = "2d"

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        no_hidden: int = 140,
        no_blocks: int = 4,
        dropout: float = 0.0,
        dropout_in: float = 0.0,
        dropout_type: str = "Dropout2d",
        prenorm: bool = True,
        downsampling: Sequence[int] = (),
        downsampling_size: int = 2,
    ) -> None:
        super().__init__()
        for key, value in (("no_hidden", no_hidden), ("no_blocks", no_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} is invalid; expected an integer >= 1")
        for key, value in (("dropout", dropout), ("dropout_in", dropout_in)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key}={value} is invalid; expected a probability in [0, 1)")
        if dropout_type not in DROPOUT_TYPES:
            raise ValueError(
                f"dropout_type={dropout_type!r} is invalid; choose one of {DROPOUT_TYPES}"
            )
        pools = sorted({int(i) for i in downsampling})
        if len(pools) != len(downsampling) or any(not 0 <= i < no_blocks for i in pools):
            raise ValueError(
                f"downsampling={list(downsampling)} is invalid; expected distinct block indices "
                f"in [0, {no_blocks})"
            )
        if pools and (downsampling_size < 2 or image_size < downsampling_size ** len(pools)):
            raise ValueError(
                f"downsampling_size={downsampling_size} is invalid: it must be >= 2 and "
                f"{len(pools)} max-pools of it must fit image_size={image_size}"
            )
        self.dropout_in = nn.Dropout(dropout_in)
        self.conv1 = layer.conv2d(in_channels, no_hidden)
        self.norm1 = nn.BatchNorm2d(no_hidden)
        self.nonlinear = nn.GELU()
        blocks: list[nn.Module] = []
        for i in range(no_blocks):
            blocks.append(CCNNBlock(layer, no_hidden, no_hidden, dropout, dropout_type, prenorm))
            if i in pools:
                blocks.append(nn.MaxPool2d(downsampling_size))
        self.blocks = nn.Sequential(*blocks)
        self.out_norm = nn.BatchNorm2d(no_hidden) if prenorm else nn.Identity()
        self.out_layer = _pointwise(no_hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits."""
        out = self.nonlinear(self.norm1(self.conv1(self.dropout_in(x))))
        out = self.out_norm(self.blocks(out))
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1)
        return self.out_layer(out).flatten(1)
