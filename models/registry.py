"""The backbone registry: one table from a backbone's name to its constructor.

A backbone class registers itself with ``@register_backbone`` (its module is imported by
``models/__init__.py``); ``cfg/net/<preset>.yaml`` then composes ``/schema/net/<name>``, the schema
derived from the constructor's signature. ``create_backbone(name, ...)`` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

__all__ = ["BACKBONES", "Backbone", "backbone_for_target", "create_backbone", "register_backbone"]

T = TypeVar("T", bound=type[nn.Module])


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: its ``name`` (the ``schema/net/<name>`` config node), the class,
    and ``variant_key``, the constructor keyword whose value completes the name a user reads
    (``VGG`` + ``depth=11`` → ``VGG11``)."""

    name: str
    cls: type[nn.Module]
    variant_key: str | None = None

    @property
    def target(self) -> str:
        """The class's import path (the ``_target_`` of its net schema)."""
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def display_name(self, options: Mapping[str, Any]) -> str:
        """The network as a user names it (``VGG11``, ``ResNet18``, ``ViT``, ``SimpleNet`` ...)."""
        variant = options.get(self.variant_key) if self.variant_key else None
        return f"{self.name}{variant}" if variant is not None else self.name


BACKBONES: dict[str, Backbone] = {}


def register_backbone(
    cls: T | None = None, *, name: str | None = None, variant_key: str | None = None
) -> T | Callable[[T], T]:
    """Class decorator adding a backbone to :data:`BACKBONES` (``name`` defaults to the class
    name). The constructor takes ``layer``, ``in_channels``, ``num_classes``, ``image_size`` and
    keyword options with defaults, which become the ``net.*`` config keys."""

    def add(klass: T) -> T:
        key = name or klass.__name__
        if key in BACKBONES and BACKBONES[key].cls is not klass:
            raise ValueError(f"backbone {key!r} is already registered ({BACKBONES[key].target})")
        BACKBONES[key] = Backbone(key, klass, variant_key)
        return klass

    return add(cls) if cls is not None else add


def backbone_for_target(target: str) -> Backbone:
    """The registered backbone whose class is ``target`` (an import path)."""
    for entry in BACKBONES.values():
        if entry.target == target:
            return entry
    raise KeyError(
        f"{target} is not a registered backbone; registered: {', '.join(sorted(BACKBONES))}"
    )


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` with ``kwargs`` (``layer``, ``in_channels``, ``num_classes``,
    ``image_size`` and its options)."""
    if name not in BACKBONES:
        raise ValueError(
            f"backbone={name!r} is not registered; choose one of {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[name].cls(**kwargs)
