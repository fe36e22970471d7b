"""One layer-factory mechanism for every backbone: a layer kind (``layer=convnn`` ...) becomes an
object that builds 2-D layers for CNNs and token mixers for transformers.

Backbones depend only on the protocol: ``factory.conv2d(in_channels, out_channels, *, stride=1)``
(a layer mapping (B, in, H, W) → (B, out, H/stride, W/stride)) and ``factory.token_mixer(dim)``
((B, N, dim) → (B, N, dim)). What each kind builds, and its options with their defaults, come
from :data:`convnn.LAYERS` and the constructors' signatures: nothing is restated here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from convnn import (
    LAYERS,
    SAMPLING_KEYWORDS,
    Conv2dSame,
    constructor_keywords,
    layer_options,
)

__all__ = ["LAYER_NAMES", "IncompatibleLayerError", "LayerFactory"]

LAYER_NAMES: tuple[str, ...] = tuple(LAYERS)


class IncompatibleLayerError(ValueError):
    """A layer kind was asked for a role (2-D layer or token mixer) it cannot fill."""


class LayerFactory:
    """Builds the chosen layer kind for any backbone from plain options.

    Args:
        name: one of :data:`LAYER_NAMES`.
        sampling: candidate sampling of every ConvNN layer, as the constructors' keywords
            (``sampling_type``, ``num_samples``, ``sample_padding``, ``eval_sampling``); omitted
            keys keep the constructor defaults. Ignored by kinds without a neighbour search.
        **options: the kind's options (:func:`convnn.layer_options`); unknown keys are rejected.
    """

    def __init__(
        self, name: str, sampling: Mapping[str, Any] | None = None, **options: Any
    ) -> None:
        if name not in LAYERS:
            raise ValueError(f"name={name!r} is not a known layer; choose one of {LAYER_NAMES}")
        allowed = layer_options(name)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"{unknown[0]}={options[unknown[0]]!r} is not an option of layer={name}; "
                f"valid options are {sorted(allowed)}"
            )
        sampling = dict(sampling or {})
        unknown = sorted(set(sampling) - set(SAMPLING_KEYWORDS))
        if unknown:
            raise ValueError(
                f"{unknown[0]}={sampling[unknown[0]]!r} is not a sampling option; valid options "
                f"are {sorted(SAMPLING_KEYWORDS)}"
            )
        self.name = name
        self.spec = LAYERS[name]
        self.options: dict[str, Any] = {**allowed, **options}
        self.sampling: dict[str, Any] = sampling if self.spec.uses_sampling else {}

    # ---------------------------------------------------------------------------- roles
    @property
    def supports_2d(self) -> bool:
        """Whether this kind can replace a 3×3 convolution in a CNN."""
        return self.spec.conv2d is not None

    @property
    def supports_tokens(self) -> bool:
        """Whether this kind can be the token mixer of a transformer block."""
        return self.spec.tokens is not None

    def conv2d(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        kernel_size: int | None = None,
        groups: int = 1,
        bias: bool = True,
    ) -> nn.Module:
        """A layer (B, in, H, W) → (B, out, ⌈H/stride⌉, ⌈W/stride⌉).

        ``kernel_size``, ``groups`` and ``bias`` describe the backbone's own convolution at this
        position; only the plain ``conv`` kind uses them (``kernel_size`` defaults to the
        ``kernel_size`` option). Other kinds run at stride 1 on the full map, followed by a
        ``stride``×``stride`` average pool (``ceil_mode``), so a search sees every token.
        """
        if not self.supports_2d:
            raise IncompatibleLayerError(
                f"layer={self.name} cannot be used in a CNN backbone; layers that fit are "
                f"{sorted(n for n, s in LAYERS.items() if s.conv2d is not None)}"
            )
        if self.spec.conv2d is Conv2dSame:
            return Conv2dSame(
                in_channels,
                out_channels,
                self.options["kernel_size"] if kernel_size is None else kernel_size,
                stride=stride,
                groups=groups,
                bias=bias,
            )
        layer = self._build(self.spec.conv2d, self.spec.branches, in_channels, out_channels)
        if stride == 1:
            return layer
        return nn.Sequential(layer, nn.AvgPool2d(stride, stride, ceil_mode=True))

    def token_mixer(self, dim: int) -> nn.Module:
        """A token mixer mapping (B, N, dim) → (B, N, dim)."""
        if not self.supports_tokens:
            raise IncompatibleLayerError(
                f"layer={self.name} cannot be a transformer token mixer; layers that fit are "
                f"{sorted(n for n, s in LAYERS.items() if s.tokens is not None)}"
            )
        return self._build(self.spec.tokens, self.spec.token_branches, dim)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"LayerFactory({self.name!r}, {opts}, sampling={self.sampling})"

    # ---------------------------------------------------------------------------- build
    def _kwargs(self, cls: type) -> dict[str, Any]:
        """The options and sampling keywords that ``cls``'s constructor accepts."""
        accepted = constructor_keywords(cls)
        merged = {**self.options, **self.sampling}
        return {k: v for k, v in merged.items() if k in accepted}

    def _build(self, cls: type, branches: tuple[type, type] | None, *sizes: int) -> nn.Module:
        if branches is None:
            return cls(*sizes, **self._kwargs(cls))
        first, second = branches
        return cls(
            *sizes,
            first=lambda *s: first(*s, **self._kwargs(first)),
            second=lambda *s: second(*s, **self._kwargs(second)),
            **self._kwargs(cls),
        )
