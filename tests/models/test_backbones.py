"""Backbones × layers: forward/backward, incompatible pairs, parameter counts, lecture fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from torch import nn

from models.convnext import ConvNextMini
from models.layer_factory import LAYER_NAMES, IncompatibleLayerError, LayerFactory
from models.resnet import ResNet
from models.vgg import VGG, VGG_CONFIGS
from models.vit import ViT
from tests.framework.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
NET_DIR = ROOT / "cfg" / "net"

# Width-reduced, shallow versions of every net config (image size, overrides) — still the real
# classes and the real yaml files, only made cheap.
TINY: dict[str, tuple[int, dict[str, Any]]] = {
    **{f"vgg{d}": (32, {"width_multiplier": 1 / 16}) for d in VGG_CONFIGS},
    "resnet18": (16, {"base_width": 4}),
    "resnet34": (16, {"base_width": 4}),
    "vit_tiny": (16, {"depth": 1}),
    "vit_small": (16, {"depth": 1}),
    "vit_base": (16, {"depth": 1}),
    "convnext_mini": (16, {"channels": [8, 16], "depths": [1, 1]}),
    "ccnn": (16, {"no_hidden": 8, "no_blocks": 2, "downsampling": [0]}),
    "vig_ti": (16, {"dim": 8, "depth": 2, "k": 2, "head_dim": 16}),
    "patch_knn": (16, {"k": 2, "n_clusters": 8, "n_patches": 64, "bottleneck": 4}),
}
# Networks that build their own mixing (the layer option is unused): one pair each.
NO_LAYER = {"vig_ti", "patch_knn"}
NETS = sorted(TINY)

# Small options so that ConvNN layers fit the smallest maps (2×2 = 4 tokens at the deepest stage).
LAYER_OPTIONS: dict[str, dict[str, Any]] = {
    "conv": {},
    "convnn": {"K": 3},
    "convnn_attn": {"K": 3},
    "branching": {"K": 3},
    "branching_attn": {"K": 3},
    "attention": {},
    "kvt": {"K": 4},
    "local_attention": {"window_size": 4},
    "sparse_attention": {"stride": 3},
    "ckconv": {"kernel_size": 5, "kernel_no_hidden": 8, "separable": True},
    "flexconv": {"kernel_size": 5, "kernel_no_hidden": 8, "mask_init_value": 0.5},
    "vig": {"kernel_size": 3},
}
FITS_2D = [
    "attention",
    "branching",
    "branching_attn",
    "ckconv",
    "conv",
    "convnn",
    "convnn_attn",
    "flexconv",
    "vig",
]
FITS_TOKENS = [
    "attention",
    "branching",
    "branching_attn",
    "conv",
    "convnn",
    "convnn_attn",
    "kvt",
    "local_attention",
    "sparse_attention",
    "vig",
]
def net_cfg(name: str) -> Any:
    """cfg/net/<name>.yaml composed with its schema, as main.py sees it."""
    return compose_cfg([f"net={name}"]).net


def build(name: str, layer: LayerFactory, image_size: int | None = None, **over: Any) -> nn.Module:
    """Instantiate cfg/net/<name>.yaml the way main.py does, with test overrides."""
    size, tiny = TINY[name]
    cfg = net_cfg(name)
    for k, v in {**tiny, **over}.items():
        cfg[k] = v
    return instantiate(cfg)(
        layer=layer, in_channels=3, num_classes=10, image_size=image_size or size
    )


def role(name: str) -> str:
    return instantiate(net_cfg(name)).func.LAYER_ROLE


def test_every_net_config_is_partial_and_declares_a_role() -> None:
    names = sorted(p.stem for p in NET_DIR.glob("*.yaml") if p.stem != "simple")
    assert names == NETS
    for name in NETS:
        assert net_cfg(name)._partial_ is True
        assert (role(name) == "none") == (name in NO_LAYER)
        assert role(name) in ("2d", "tokens", "none")


def _pairs(compatible: bool) -> list[Any]:
    out = []
    for net in NETS:
        if net in NO_LAYER:
            if compatible:
                out.append(pytest.param(net, "conv", id=f"{net}-conv"))
            continue
        fits = FITS_2D if net.startswith(("vgg", "resnet", "convnext", "ccnn")) else FITS_TOKENS
        for layer in LAYER_NAMES:
            if (layer in fits) != compatible:
                continue
            out.append(pytest.param(net, layer, id=f"{net}-{layer}"))
    return out


@pytest.mark.parametrize("net, layer", _pairs(compatible=True))
def test_forward_backward(net: str, layer: str) -> None:
    torch.manual_seed(0)
    model = build(net, LayerFactory(layer, **LAYER_OPTIONS[layer])).train()
    size = TINY[net][0]
    x = torch.randn(2, 3, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("net, layer", _pairs(compatible=False))
def test_incompatible_pairs_list_the_layers_that_fit(net: str, layer: str) -> None:
    fits = FITS_TOKENS if role(net) == "tokens" else FITS_2D
    with pytest.raises(IncompatibleLayerError, match=f"layer={layer}") as err:
        build(net, LayerFactory(layer, **LAYER_OPTIONS[layer]))
    assert str(fits) in str(err.value)


def test_role_matches_factory_support() -> None:
    for name in LAYER_NAMES:
        f = LayerFactory(name)
        assert f.supports_2d == (name in FITS_2D)
        assert f.supports_tokens == (name in FITS_TOKENS)


# ----------------------------------------------------------------- parameter counts vs torchvision
def _shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in module.state_dict().values()]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth, letter", [(11, "A"), (13, "B"), (16, "D"), (19, "E")])
def test_vgg_features_match_torchvision_bn(depth: int, letter: str) -> None:
    ours = VGG(LayerFactory("conv"), depth=depth).features
    ref = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[letter], batch_norm=True)
    assert _count(ours) == _count(ref)
    assert _shapes(ours) == _shapes(ref)
    def kind(m: nn.Module) -> type:
        return nn.Conv2d if isinstance(m, nn.Conv2d) else type(m)  # Conv2dSame is a Conv2d

    assert [kind(m) for m in ours] == [kind(m) for m in ref]


def test_vgg_imagenet_head_is_torchvision_classifier() -> None:
    head = VGG(LayerFactory("conv"), head="imagenet", width_multiplier=1 / 16).classifier
    c = 32 * 7 * 7
    assert _count(head) == (c * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert sum(isinstance(m, nn.Dropout) for m in head) == 2
    out = VGG(LayerFactory("conv"), head="imagenet", width_multiplier=1 / 16)(
        torch.randn(1, 3, 32, 32)
    )
    assert out.shape == (1, 10)


@pytest.mark.parametrize("depth", [18, 34])
def test_resnet_imagenet_stem_matches_torchvision(depth: int) -> None:
    ours = ResNet(LayerFactory("conv"), depth=depth, stem="imagenet", image_size=224)
    ref = getattr(torchvision.models, f"resnet{depth}")(num_classes=10)
    assert _count(ours) == _count(ref)
    assert sorted(_shapes(ours)) == sorted(_shapes(ref))


def test_resnet_cifar_stem_matches_torchvision_with_3x3_stem() -> None:
    ours = ResNet(LayerFactory("conv"), depth=18, stem="cifar")
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = nn.Identity()
    assert _count(ours) == _count(ref)
    assert ours.layer2[0].conv1.stride == (2, 2)  # a true strided conv with layer=conv
    x = torch.randn(1, 3, 32, 32)
    ours.load_state_dict(_renamed_torchvision(ref.state_dict()))
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def _renamed_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {"conv1.": "stem.0.", "bn1.": "stem.1."}
    out = {}
    for k, v in state.items():
        for old, new in names.items():
            if k.startswith(old):
                k = new + k[len(old) :]
        out[k] = v
    return out


def test_resnet_stride2_with_layer_is_layer_then_avgpool_on_odd_maps() -> None:
    model = ResNet(LayerFactory("attention"), depth=18, base_width=4, image_size=18)
    first = model.layer2[0].conv1
    assert isinstance(first, nn.Sequential) and isinstance(first[1], nn.AvgPool2d)
    assert model(torch.randn(2, 3, 18, 18)).shape == (2, 10)  # 18 → 9 → 5 → 3


# ------------------------------------------------------------------------------ ConvNeXt-mini
class _LectureBlock(nn.Module):
    """Transcribed from the CNN lecture notebook (the independent reference)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, 4 * in_channels, groups=in_channels, kernel_size=[7, 7], padding="same"
        )
        self.conv2 = nn.Conv2d(4 * in_channels, in_channels, kernel_size=1)
        self.conv3 = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.conv1(inputs)
        x = F.layer_norm(x, x.shape)
        x = self.conv3(F.gelu(self.conv2(x)))
        return x + inputs


class _LectureClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, kernel_size=4, stride=4)
        self.conv_block_1 = nn.Sequential(*(_LectureBlock(32) for _ in range(5)))
        self.downsample = nn.Conv2d(32, 64, kernel_size=2, stride=2)
        self.conv_block_2 = nn.Sequential(*(_LectureBlock(64) for _ in range(5)))
        self.bottleneck = nn.Conv2d(64, 10, kernel_size=1, stride=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.stem(inputs)
        x = F.layer_norm(x, x.shape)
        x = self.conv_block_1(x)
        x = self.downsample(F.layer_norm(x, x.shape))
        x = self.bottleneck(self.conv_block_2(x))
        return F.avg_pool2d(x, kernel_size=x.shape[-2:]).reshape((-1, 10))


def test_convnext_mini_is_the_lecture_network() -> None:
    torch.manual_seed(0)
    ref = _LectureClassifier()
    ours = instantiate(net_cfg("convnext_mini"))(
        layer=LayerFactory("conv"), in_channels=3, num_classes=10, image_size=32
    )
    assert _count(ours.stem) == 1568
    block = ours.conv_block_1[0]
    assert [_count(block.conv1), _count(block.conv2), _count(block.conv3)] == [6400, 4128, 1056]
    assert _shapes(ours) == _shapes(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x))


def test_convnext_layer_norm_modes() -> None:
    torch.manual_seed(0)
    kw = {"channels": [4, 8], "depths": [1, 1], "image_size": 16}
    x = torch.randn(3, 3, 16, 16)
    per_sample = ConvNextMini(LayerFactory("conv"), layer_norm="per_sample", **kw).eval()
    torch.testing.assert_close(per_sample(x)[:1], per_sample(x[:1]))
    lecture = ConvNextMini(LayerFactory("conv"), **kw).eval()
    lecture.load_state_dict(per_sample.state_dict())
    assert not torch.allclose(lecture(x)[:1], lecture(x[:1]))  # batch-dependent, as the notebook


def test_convnext_replaceable_layer_is_conv1() -> None:
    model = ConvNextMini(LayerFactory("attention"), channels=[4, 8], depths=[1, 1], image_size=16)
    assert type(model.conv_block_1[0].conv1).__name__ == "Attention2d"
    assert model.conv_block_1[0].conv1.out_channels == 16


# ------------------------------------------------------------------------------------ ViT
def test_vit_positions_and_patches() -> None:
    layer = LayerFactory("attention")
    sin = ViT(layer, image_size=16, patch_size=4, dim=8, depth=1, mlp_dim=16)
    assert sin.pos_embed.shape == (1, 17, 8) and "pos_embed" not in dict(sin.named_parameters())
    learned = ViT(layer, image_size=24, patch_size=8, dim=8, depth=1, pos_embedding="learned")
    assert "pos_embed" in dict(learned.named_parameters())
    assert learned(torch.randn(2, 3, 24, 24)).shape == (2, 10)
    vit_224 = build("vit_tiny", layer, image_size=224, patch_size=16)
    assert vit_224.pos_embed.shape == (1, 197, 192)


def test_vit_num_heads_from_layer() -> None:
    model = build("vit_tiny", LayerFactory("attention", num_heads=3))
    assert model.blocks[0].mixer.num_heads == 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ViT(LayerFactory("attention"), image_size=30, patch_size=4), "not divisible"),
        (lambda: ViT(LayerFactory("attention"), pos_embedding="rope"), "pos_embedding='rope'"),
        (lambda: VGG(LayerFactory("conv"), depth=12), r"depth=12 .*\[11, 13, 16, 19\]"),
        (lambda: VGG(LayerFactory("conv"), head="tiny"), "head='tiny'"),
        (lambda: VGG(LayerFactory("conv"), image_size=16), "image_size=16"),
        (lambda: ResNet(LayerFactory("conv"), depth=50), r"depth=50 .*\[18, 34\]"),
        (lambda: ResNet(LayerFactory("conv"), stem="big"), "stem='big'"),
        (lambda: ConvNextMini(LayerFactory("conv"), image_size=20), "image_size=20"),
        (lambda: ConvNextMini(LayerFactory("conv"), layer_norm="x"), "layer_norm='x'"),
    ],
)
def test_backbone_argument_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("preset", ["vgg11_cifar10_conv2d", "vgg11_cifar10_convnn",
                                    "vgg11_cifar10_branching"])
def test_vgg_presets_build_the_published_network(preset: str) -> None:
    """The presets that quote the original's numbers build its VGG (torchvision classifier)."""
    cfg = compose_cfg([f"experiment={preset}"])
    assert cfg.net.head == "imagenet"
    if preset.endswith("conv2d"):
        net = instantiate(cfg.net)(layer=LayerFactory("conv"), in_channels=3, num_classes=10,
                                   image_size=32)
        assert sum(p.numel() for p in net.parameters()) == 128_812_810


@pytest.mark.parametrize(
    ("name", "first", "second"),
    [
        ("branching", "Conv1dNNMixer", "Conv1dMixer"),
        ("branching_attn", "ConvNNAttention", "MultiHeadAttention"),
    ],
)
def test_vit_branching_token_mixers(name: str, first: str, second: str) -> None:
    import convnn

    f = LayerFactory(name, K=3, branch_ratio=0.25)
    mixer = f.token_mixer(16)
    assert isinstance(mixer, convnn.BranchingMixer)
    assert (mixer.first_channels, mixer.second_channels) == (4, 12)
    assert type(mixer.first).__name__ == first and type(mixer.second).__name__ == second
    assert mixer(torch.randn(2, 5, 16)).shape == (2, 5, 16)
