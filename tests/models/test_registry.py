"""The backbone registry: every cfg/net preset composes a registered backbone's schema, names
resolve both ways, and a second class under a taken name is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from framework.build import net_name
from models import BACKBONES, backbone_for_target, create_backbone, register_backbone
from models.layer_factory import LayerFactory
from models.vgg import VGG
from tests.framework.helpers import compose_cfg

NET_DIR = Path(__file__).resolve().parents[2] / "cfg" / "net"


@pytest.mark.parametrize("preset", sorted(p.stem for p in NET_DIR.glob("*.yaml")))
def test_every_net_preset_is_a_registered_backbone(preset: str) -> None:
    # catches: a cfg/net yaml whose schema is not (or no longer) in the registry
    cfg = compose_cfg([f"net={preset}"])
    entry = backbone_for_target(str(cfg.net._target_))
    assert BACKBONES[entry.name] is entry


@pytest.mark.parametrize(
    ("preset", "name"),
    [("vgg11", "VGG11"), ("resnet34", "ResNet34"), ("vit_tiny", "ViT"), ("simple", "SimpleNet")],
)
def test_net_name_reads_the_variant_key(preset: str, name: str) -> None:
    # catches: a lost variant_key (VGG instead of VGG11 in every error message)
    assert net_name(compose_cfg([f"net={preset}"])) == name


def test_create_backbone_builds_the_registered_class() -> None:
    # catches: create_backbone ignoring its keyword options or building another class
    net = create_backbone(
        "VGG",
        layer=LayerFactory("conv"),
        in_channels=3,
        num_classes=7,
        image_size=32,
        depth=11,
        width_multiplier=1 / 16,
    )
    assert type(net) is VGG
    assert net.classifier.out_features == 7


def test_unknown_names_and_taken_names_are_refused() -> None:
    # catches: a silent overwrite of a backbone, or an unhelpful KeyError for a typo
    with pytest.raises(ValueError, match=r"backbone='vgg' is not registered; choose one of .*VGG"):
        create_backbone("vgg")
    with pytest.raises(ValueError, match="backbone 'VGG' is already registered"):

        @register_backbone(name="VGG")
        class Other(nn.Module):
            pass

    assert BACKBONES["VGG"].cls is VGG
