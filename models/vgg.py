"""VGG-11/13/16/19 (torchvision configurations A/B/D/E) with a replaceable 3×3 layer.

Every 3×3 convolution is ``layer.conv2d(in, out)`` followed by BatchNorm + ReLU (torchvision's
``vgg*_bn`` layout); "M" is a 2×2 max-pool. With ``layer=conv`` the feature extractor has exactly
torchvision's parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = ["VGG", "VGG_CONFIGS", "vgg_features"]

# torchvision.models.vgg.cfgs: A = VGG11, B = VGG13, D = VGG16, E = VGG19.
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ],
}  # fmt: skip
HEADS: tuple[str, ...] = ("cifar", "imagenet")


def vgg_features(
    layer: LayerFactory, config: list[int | str], in_channels: int, width_multiplier: float = 1.0
) -> tuple[nn.Sequential, int]:
    """[layer → BN → ReLU]* with max-pools at "M"; returns the stack and its output channels."""
    mods: list[nn.Module] = []
    c = in_channels
    for v in config:
        if v == "M":
            mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = max(1, round(int(v) * width_multiplier))
        mods += [layer.conv2d(c, out), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c = out
    return nn.Sequential(*mods), c


@register_backbone(variant_key="depth")
class VGG(nn.Module):
    """VGG with BatchNorm; the 3×3 convolutions are built by ``layer``.

    Args:
        layer: the layer factory (2-D role).
        in_channels, num_classes, image_size: data shape (image_size ≥ 32: five 2×2 max-pools).
        depth: 11, 13, 16 or 19.
        head: ``cifar`` (global average pool → linear) or ``imagenet`` (7×7 adaptive pool →
            4096 → 4096 → classes with ReLU + dropout, as torchvision).
        width_multiplier: scales every conv width (1.0 = the published network).
        dropout: classifier dropout of the ``imagenet`` head.
    """

    LAYER_ROLE = "2d"

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        depth: int = 11,
        head: str = "cifar",
        width_multiplier: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"depth={depth!r} is invalid; choose one of {sorted(VGG_CONFIGS)}")
        if head not in HEADS:
            raise ValueError(f"head={head!r} is invalid; choose one of {HEADS}")
        if image_size < 32:
            raise ValueError(
                f"image_size={image_size} is too small for VGG's five 2×2 max-pools; use ≥ 32"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is invalid; expected a number in [0, 1)")
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier={width_multiplier} is invalid; expected > 0")
        self.features, c = vgg_features(layer, VGG_CONFIGS[depth], in_channels, width_multiplier)
        if head == "cifar":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.classifier: nn.Module = nn.Linear(c, num_classes)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(c * 7 * 7, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits."""
        return self.classifier(self.avgpool(self.features(x)).flatten(1))
