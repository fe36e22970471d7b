"""ResNet-18/34 (BasicBlock) with a replaceable 3×3 layer.

Stem: ``cifar`` (3×3 conv, stride 1, no max-pool; a plain bias-free convolution on the raw
image) or ``imagenet`` (7×7/2 conv + 3×3/2 max-pool, as torchvision). Stages 2–4 start with a
stride-2 block.

The layer replaces both 3×3 convolutions of every BasicBlock. Layers are stride-1 by contract,
so a stride-2 position becomes **layer (stride 1) → 2×2 average pool** (``ceil_mode``, so the
size equals the strided shortcut's for odd maps too): the layer sees the full-
resolution map (a ConvNN search over all tokens, not over a subsampled grid) and the pool
downsamples without discarding three quarters of its output, unlike a strided subsample. With
``layer=conv`` the network is torchvision's exactly — true strided, bias-free 3×3 convolutions —
so parameter counts match ``torchvision.models.resnet18/34``.

``variant="original"`` builds the ResNet of the original ConvNN code instead: no downsampling
(every stage runs at the stem's output size, so a ConvNN layer searches all H·W tokens in every
stage), a bare 1×1 convolution (no BatchNorm) as the shortcut where the width changes, and
Dropout(0.5) before the classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = [
    "ORIGINAL_HEAD_DROPOUT",
    "RESNET_DEPTHS",
    "RESNET_VARIANTS",
    "BasicBlock",
    "ResNet",
    "conv3x3",
]

RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STEMS: tuple[str, ...] = ("cifar", "imagenet")
#: ``standard``: the CIFAR/torchvision ResNet; ``original``: the original ConvNN code's ResNet.
RESNET_VARIANTS: tuple[str, ...] = ("standard", "original")
#: Dropout before the classifier of the ``original`` variant (the original ``ResNet``'s default).
ORIGINAL_HEAD_DROPOUT: float = 0.5


def conv3x3(layer: LayerFactory, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The replaceable 3×3 position of a BasicBlock, at ``stride`` 1 or 2 (see module doc)."""
    return layer.conv2d(in_channels, out_channels, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """[3×3 → BN → ReLU → 3×3 → BN] + shortcut (1×1/stride conv + BN when the shape changes;
    without the BN when ``shortcut_norm`` is false, as the original ConvNN ResNet)."""

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        shortcut_norm: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(layer, in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(layer, out_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            shortcut: list[nn.Module] = [
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            ]
            if shortcut_norm:
                shortcut.append(nn.BatchNorm2d(out_channels))
            self.downsample = nn.Sequential(*shortcut)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) → (B, out, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


@register_backbone(variant_key="depth")
class ResNet(nn.Module):
    """BasicBlock ResNet whose 3×3 convolutions are built by ``layer``.

    Args:
        layer: the layer factory (2-D role).
        in_channels, num_classes, image_size: data shape.
        depth: 18 or 34.
        stem: ``cifar`` or ``imagenet``.
        base_width: channels of the first stage (64 = published; stages use ×1, ×2, ×4, ×8).
        variant: ``standard`` (stride-2 stage transitions, shortcut with BatchNorm) or
            ``original`` (the original ConvNN code's network: no downsampling, bare 1×1
            shortcut, Dropout(0.5) head).
    """

    LAYER_ROLE = "2d"

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        depth: int = 18,
        stem: str = "cifar",
        base_width: int = 64,
        variant: str = "standard",
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth={depth!r} is invalid; choose one of {sorted(RESNET_DEPTHS)}")
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r} is invalid; choose one of {STEMS}")
        if base_width < 1:
            raise ValueError(f"base_width={base_width} is invalid; expected an integer ≥ 1")
        if variant not in RESNET_VARIANTS:
            raise ValueError(f"variant={variant!r} is invalid; choose one of {RESNET_VARIANTS}")
        original = variant == "original"
        self.variant = variant
        min_size = 8 if stem == "cifar" else 32
        if not original and image_size < min_size:
            raise ValueError(
                f"image_size={image_size} is too small for stem={stem} (three stride-2 stages"
                f"{'' if stem == 'cifar' else ' after a /4 stem'}); use ≥ {min_size}"
            )
        w = base_width
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w, 3, 1, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w, 7, 2, padding=3, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        stages: list[nn.Module] = []
        c = w
        for i, blocks in enumerate(RESNET_DEPTHS[depth]):
            out = w * 2**i
            stride = 1 if i == 0 or original else 2
            stage = [BasicBlock(layer, c, out, stride, shortcut_norm=not original)]
            stage += [BasicBlock(layer, out, out, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            c = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(ORIGINAL_HEAD_DROPOUT) if original else None
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x if self.dropout is None else self.dropout(x))
