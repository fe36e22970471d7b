"""Backbones, the layer factory and the backbone registry (plain PyTorch: no Lightning, Hydra).

Importing ``models`` registers every backbone: a new one is a module here with a
``@register_backbone`` class, imported below, plus its ``cfg/net/<preset>.yaml``.
:func:`from_pretrained` loads an exported network. The LightningModule lives in
:mod:`models.module` and is never imported here, so ``import models`` needs neither Lightning nor
Hydra.
"""

from models import (  # noqa: F401  (registers the backbones)
    ccnn,
    convnext,
    patch_knn,
    resnet,
    simple,
    vgg,
    vig,
    vit,
)
from models.pretrained import from_pretrained
from models.registry import (
    BACKBONES,
    Backbone,
    backbone_for_target,
    create_backbone,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "backbone_for_target",
    "create_backbone",
    "from_pretrained",
    "register_backbone",
]
