"""Isotropic ViG (Han et al., "Vision GNN"): a convolutional stem, ``depth`` blocks of
[Grapher → FFN] at one resolution, global average pool and a 1×1-conv prediction head.

Layout and parameter names follow the original ``vig.py`` (``stem.convs``, ``pos_embed``,
``backbone.<i>.0`` Grapher, ``backbone.<i>.1`` FFN, ``prediction``): at ``stem_stride=16`` on
224×224 images the original ViG-Ti weights load unchanged. The number of neighbours grows
linearly from ``k`` to ``2k`` over the blocks; with ``use_dilation`` block i uses dilation
min(i // 4 + 1, tokens // 2k).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from convnn.graph import GRAPH_ACTIVATIONS, DropPath, Grapher, act_layer
from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = ["FFN", "ViG", "ViGStem"]


class FFN(nn.Module):
    """x + drop_path(BN(1×1 conv(act(BN(1×1 conv(x)))))) on (B, C, H, W)."""

    def __init__(self, dim: int, hidden: int, act: str = "relu", drop_path: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden))
        self.act = act_layer(act)
        self.fc2 = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        return self.drop_path(self.fc2(self.act(self.fc1(x)))) + x


class ViGStem(nn.Module):
    """log2(stride) stride-2 3×3 conv+BN+act (widths dim/2^(m-1) … dim), then a 3×3 conv + BN.

    At stride 16 this is the original's four-conv overlapping stem."""

    def __init__(self, in_channels: int, dim: int, stride: int, act: str) -> None:
        super().__init__()
        steps = int(math.log2(stride))
        mods: list[nn.Module] = []
        c = in_channels
        for i in range(steps):
            out = dim // 2 ** (steps - 1 - i)
            mods += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out)]
            mods.append(act_layer(act))
            c = out
        mods += [nn.Conv2d(c, dim, 3, stride=1, padding=1), nn.BatchNorm2d(dim)]
        self.convs = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, dim, H/stride, W/stride)."""
        return self.convs(x)


@register_backbone
class ViG(nn.Module):
    """Isotropic Vision GNN; ``net=vig_ti`` is ViG-Ti (dim 192, 12 blocks, k 9 → 18) sized for
    32×32 images (stem stride 4: an 8×8 token grid).

    Args:
        layer: unused (every block is a Grapher); accepted like every backbone.
        in_channels, num_classes, image_size: data shape (image_size divisible by stem_stride).
        dim: channels of every block.
        depth: number of [Grapher → FFN] blocks.
        k: neighbours of the first block (the last has 2k).
        conv, act, norm, bias, stochastic, epsilon: the Graphers' options.
        use_dilation: dilation min(i // 4 + 1, tokens // 2k) in block i (else 1).
        drop_path: stochastic depth rising linearly from 0 to this over the blocks.
        dropout: dropout in the prediction head.
        stem_stride: downsampling of the stem, a power of two (16 in the original at 224×224).
        head_dim: hidden width of the prediction head (1024 in the original).
    """

    LAYER_ROLE: ClassVar[str] = "none"

    def __init__(
        self,
        layer: LayerFactory | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        dim: int = 192,
        depth: int = 12,
        k: int = 9,
        conv: str = "mr",
        act: str = "gelu",
        norm: str = "batch",
        bias: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.2,
        use_dilation: bool = True,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        stem_stride: int = 4,
        head_dim: int = 1024,
    ) -> None:
        super().__init__()
        for key, value in (("dim", dim), ("depth", depth), ("k", k), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} is invalid; expected an integer ≥ 1")
        if act not in GRAPH_ACTIVATIONS:
            raise ValueError(f"act={act!r} is not supported; choose one of {GRAPH_ACTIVATIONS}")
        if stem_stride < 1 or stem_stride & (stem_stride - 1) or image_size % stem_stride:
            raise ValueError(
                f"stem_stride={stem_stride} must be a power of two dividing image_size={image_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is invalid; expected a number in [0, 1)")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path={drop_path} is invalid; expected a number in [0, 1)")
        grid = image_size // stem_stride
        tokens = grid * grid
        num_knn = [int(v.item()) for v in torch.linspace(k, 2 * k, depth)]
        if max(num_knn) > tokens:
            raise ValueError(
                f"k={k} grows to {max(num_knn)} neighbours but the {grid}×{grid} token grid "
                f"(image_size={image_size} / stem_stride={stem_stride}) has {tokens} tokens; "
                "lower k or stem_stride"
            )
        max_dilation = tokens // max(num_knn)
        dpr = [float(v.item()) for v in torch.linspace(0, drop_path, depth)]
        self.stem = ViGStem(in_channels, dim, stem_stride, act)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid, grid))
        blocks = []
        for i in range(depth):
            dilation = min(i // 4 + 1, max_dilation) if use_dilation else 1
            grapher = Grapher(
                dim, num_knn[i], dilation, conv, act, norm, bias, stochastic, epsilon, 1,
                n=tokens, drop_path=dpr[i],
            )  # fmt: skip
            blocks.append(nn.Sequential(grapher, FFN(dim, dim * 4, act, dpr[i])))
        self.backbone = nn.Sequential(*blocks)
        self.prediction = nn.Sequential(
            nn.Conv2d(dim, head_dim, 1),
            nn.BatchNorm2d(head_dim),
            act_layer(act),
            nn.Dropout(dropout),
            nn.Conv2d(head_dim, num_classes, 1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits."""
        x = self.backbone(self.stem(x) + self.pos_embed)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.prediction(x).flatten(1)
