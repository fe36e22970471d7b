"""ConvNeXt-mini: the CNN lecture's network, with a replaceable 7×7 layer.

4×4/4 stem → layer norm → 5 blocks at 32 ch → layer norm → 2×2/2 downsample → 5 blocks at 64 ch
→ 1×1 conv to classes → global average. A block is

    x → conv1 (7×7 depthwise, C → 4C, groups=C) → layer norm → 1×1 (4C → C) → GELU
      → 1×1 (C → C) → + x

``conv1`` is the replaceable layer ``layer.conv2d(C, 4C, kernel_size=7, groups=C)``: with
``layer=conv`` it is the lecture's exact module (the backbone's 7×7 depthwise shape wins over
``layer.kernel_size``); other kinds ignore the shape and map C → 4C themselves.

Layer norm: the lecture calls ``F.layer_norm(x, x.shape)``, which normalises over the *whole batch
tensor* (batch dimension included, no affine). That is reproduced by default
(``layer_norm="lecture"``); note that it makes a sample's output depend on the other samples of
its batch (so eval results vary slightly with batch composition and size). ``layer_norm=
"per_sample"`` normalises each sample over (C, H, W) instead — the batch-independent variant.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = ["LAYER_NORMS", "ConvNextBlock", "ConvNextMini", "lecture_layer_norm"]

LAYER_NORMS: tuple[str, ...] = ("lecture", "per_sample")


def lecture_layer_norm(x: Tensor, mode: str) -> Tensor:
    """``lecture``: over the whole tensor (as the notebook); ``per_sample``: per sample."""
    return F.layer_norm(x, x.shape if mode == "lecture" else x.shape[1:])


class ConvNextBlock(nn.Module):
    """The lecture's ConvNeXt block; ``conv1`` comes from ``layer`` (see module doc)."""

    def __init__(self, layer: LayerFactory, channels: int, layer_norm: str = "lecture") -> None:
        super().__init__()
        self.layer_norm = layer_norm
        self.conv1 = layer.conv2d(channels, 4 * channels, kernel_size=7, groups=channels)
        self.conv2 = nn.Conv2d(4 * channels, channels, kernel_size=1)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, inputs: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        x = lecture_layer_norm(self.conv1(inputs), self.layer_norm)
        x = self.conv3(F.gelu(self.conv2(x)))
        return x + inputs

    def extra_repr(self) -> str:
        return f"layer_norm={self.layer_norm!r}"


@register_backbone
class ConvNextMini(nn.Module):
    """The lecture classifier (defaults reproduce it exactly, 32×32 CIFAR-10 input).

    Args:
        layer: the layer factory (2-D role) for each block's 7×7 depthwise position.
        in_channels, num_classes, image_size: data shape (image_size divisible by 8).
        channels: widths of the two stages (lecture: 32, 64).
        depths: blocks per stage (lecture: 5, 5).
        layer_norm: ``lecture`` (whole-tensor, as the notebook) or ``per_sample``.
    """

    LAYER_ROLE = "2d"

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        channels: tuple[int, int] | list[int] = (32, 64),
        depths: tuple[int, int] | list[int] = (5, 5),
        layer_norm: str = "lecture",
    ) -> None:
        super().__init__()
        if layer_norm not in LAYER_NORMS:
            raise ValueError(f"layer_norm={layer_norm!r} is invalid; choose one of {LAYER_NORMS}")
        if image_size % 8:
            raise ValueError(
                f"image_size={image_size} is invalid; ConvNeXt-mini downsamples by 4 then 2, so "
                "it must be divisible by 8"
            )
        if len(channels) != 2 or len(depths) != 2:
            raise ValueError(
                f"channels={list(channels)} and depths={list(depths)} must each have 2 entries"
            )
        c1, c2 = (int(c) for c in channels)
        self.layer_norm = layer_norm
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_channels, c1, kernel_size=4, stride=4)
        self.conv_block_1 = nn.Sequential(
            *(ConvNextBlock(layer, c1, layer_norm) for _ in range(int(depths[0])))
        )
        self.downsample = nn.Conv2d(c1, c2, kernel_size=2, stride=2)
        self.conv_block_2 = nn.Sequential(
            *(ConvNextBlock(layer, c2, layer_norm) for _ in range(int(depths[1])))
        )
        self.bottleneck = nn.Conv2d(c2, num_classes, kernel_size=1, stride=1)

    def forward(self, inputs: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits."""
        x = lecture_layer_norm(self.stem(inputs), self.layer_norm)
        x = self.conv_block_1(x)
        x = self.downsample(lecture_layer_norm(x, self.layer_norm))
        x = self.bottleneck(self.conv_block_2(x))
        return F.avg_pool2d(x, kernel_size=x.shape[-2:]).reshape(-1, self.num_classes)
