"""`net.variant=original`: the ResNet of the original ConvNN code (parameter counts, structure,
and outputs equal to a reference transcribed here from the original's `models/resnet.py`)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from models.layer_factory import LayerFactory
from models.resnet import ResNet
from tests.framework.helpers import compose_cfg

# Counted on the original code at 32×32 (K 9, padding 1, branch ratio 0.5): its
# `--model resnet18/34` with `--layer Conv2d / ConvNN / Branching`.
ORIGINAL_COUNTS = {
    ("resnet18", "conv"): 11_172_170,
    ("resnet18", "convnn"): 11_176_010,
    ("resnet18", "branching"): 12_572_490,
    ("resnet34", "conv"): 21_280_330,
    ("resnet34", "convnn"): 21_287_882,
    ("resnet34", "branching"): 23_810_378,
}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("net", "layer"), sorted(ORIGINAL_COUNTS))
def test_original_variant_parameter_count_from_the_configs(net: str, layer: str) -> None:
    """Catches a shortcut BatchNorm left in, or a block/stage/head that differs in size."""
    cfg = compose_cfg([f"net={net}", "net.variant=original", f"layer={layer}"])
    model = instantiate(cfg.net)(
        layer=instantiate(cfg.layer), in_channels=3, num_classes=10, image_size=32
    )
    assert _count(model) == ORIGINAL_COUNTS[(net, layer)]


def test_standard_variant_is_the_default_and_keeps_its_count() -> None:
    """Catches the variant leaking into the default network (+1,792: the shortcut BatchNorms)."""
    cfg = compose_cfg(["net=resnet18", "layer=conv"])
    assert cfg.net.variant == "standard"
    model = ResNet(LayerFactory("conv"), depth=18)
    assert _count(model) == ORIGINAL_COUNTS[("resnet18", "conv")] + 1_792
    assert model.dropout is None


# ----------------------------------------------------- reference transcribed from the original
class _OriginalBlock(nn.Module):
    """The original `ResBlock` with `--layer Conv2d`: conv_layer + (1×1 conv | identity), ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_layer = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.identity = nn.Conv2d(cin, cout, 1, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv_layer(x) + self.identity(x))


class _OriginalResNet(nn.Module):
    """The original `ResNet(args, dropout=0.5)` for `--model resnet18`, widths scaled by w/64."""

    def __init__(self, blocks: tuple[int, ...], w: int, classes: int) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        layers, c = [], w
        for i, n in enumerate(blocks):
            out = w * 2**i
            layers.append(
                nn.Sequential(*(_OriginalBlock(c if j == 0 else out, out) for j in range(n)))
            )
            c = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), nn.Dropout(0.5), nn.Linear(c, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(x)
        return self.classifier(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


def _ours_from_original(ref: _OriginalResNet) -> dict[str, torch.Tensor]:
    """The original's state dict under our names (the two nets share the tensor shapes)."""
    names = {"first_conv.": "stem.", "classifier.3.": "fc."}
    block = {
        "conv_layer.0.": "conv1.",
        "conv_layer.1.": "bn1.",
        "conv_layer.3.": "conv2.",
        "conv_layer.4.": "bn2.",
        "identity.": "downsample.0.",
    }
    out = {}
    for key, value in ref.state_dict().items():
        for old, new in {**names, **block}.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def test_original_variant_equals_the_original_network() -> None:
    """Catches any structural gap: a downsampling stage, a normalised shortcut, another order."""
    torch.manual_seed(0)
    ref = _OriginalResNet((2, 2, 2, 2), w=4, classes=10)
    ours = ResNet(LayerFactory("conv"), depth=18, base_width=4, variant="original")
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(_ours_from_original(ref))
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(ours(x), ref(x))
    sizes = []
    for stage in (ours.layer1, ours.layer2, ours.layer3, ours.layer4):
        stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    ours(x)
    assert sizes == [(12, 12)] * 4  # every stage at the input size


def test_original_variant_head_has_dropout_half() -> None:
    """Catches a missing (or eval-active) Dropout(0.5) before the classifier."""
    model = ResNet(LayerFactory("conv"), depth=18, base_width=4, variant="original")
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    x = torch.randn(4, 3, 8, 8)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_original_variant_fits_small_images_and_rejects_unknown_variants() -> None:
    """No stride-2 stage, so no minimum image size; an unknown variant names the choices."""
    model = ResNet(
        LayerFactory("convnn", K=4), depth=18, base_width=2, image_size=4, variant="original"
    )
    assert model(torch.randn(1, 3, 4, 4)).shape == (1, 10)
    with pytest.raises(
        ValueError,
        match=r"variant='torch' is invalid; choose one of "
        r"\('standard', 'original'\)",
    ):
        ResNet(LayerFactory("conv"), variant="torch")
