"""The catalogue of layer kinds by name, for code that builds networks from names (configs, CLIs).

Each name maps to the classes it builds: the module a CNN position gets (``conv2d``), the token
mixer a transformer block gets (``tokens``), and for a :class:`~convnn.Branching` kind the two
branch classes. A kind's options and their defaults are *derived* from those constructors'
keyword signatures (:func:`layer_options`), so a default is written once, in the constructor.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from convnn.attention import Conv1dNNAttention, Conv2dNNAttention, ConvNNAttention
from convnn.branching import Branching, BranchingMixer
from convnn.continuous import CKConv2d, FlexConv2d
from convnn.graph import GrapherConv2d, GrapherMixer
from convnn.layers import Conv1dNN, Conv2dNN
from convnn.mixers import (
    Attention2d,
    Conv1dMixer,
    Conv1dNNMixer,
    KNNAttention,
    LocalAttention,
    MultiHeadAttention,
    SparseAttention,
)

__all__ = [
    "LAYERS",
    "SAMPLING_KEYWORDS",
    "Conv2dSame",
    "LayerSpec",
    "constructor_keywords",
    "layer_options",
]

#: Constructor keywords that come from a network's candidate sampling, not from the layer kind.
SAMPLING_KEYWORDS: tuple[str, ...] = (
    "sampling_type",
    "num_samples",
    "sample_padding",
    "eval_sampling",
)

# Structural arguments a network supplies (sizes, sub-layer builders); never user options.
_STRUCTURAL = frozenset({"in_channels", "out_channels", "dim", "first", "second"})


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with "same" padding for an odd ``kernel_size``: the plain-convolution kind."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size!r} must be an odd integer >= 1")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd so that the layer keeps H×W")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
        )


# Keywords a network sets per position (a strided or depthwise position), not the user.
_PER_POSITION: dict[type[nn.Module], frozenset[str]] = {
    Conv2dSame: frozenset({"stride", "groups", "bias"})
}


@dataclass(frozen=True)
class LayerSpec:
    """The classes one layer kind builds; ``None`` where the kind cannot fill that role."""

    conv2d: type[nn.Module] | None
    tokens: type[nn.Module] | None
    branches: tuple[type[nn.Module], type[nn.Module]] | None = None
    token_branches: tuple[type[nn.Module], type[nn.Module]] | None = None

    def classes(self) -> tuple[type[nn.Module], ...]:
        """Every constructor whose keywords are options of this kind."""
        found = [self.conv2d, self.tokens, *(self.branches or ()), *(self.token_branches or ())]
        return tuple(c for c in found if c is not None)

    @property
    def uses_sampling(self) -> bool:
        """Whether some constructor of this kind takes the candidate-sampling keywords."""
        return any(SAMPLING_KEYWORDS[0] in _signature_keywords(c) for c in self.classes())


# Modules that forward ``**kwargs`` to another constructor: their options are that one's.
_FORWARDS: dict[type[nn.Module], type[nn.Module]] = {
    Conv1dNNMixer: Conv1dNN,
    ConvNNAttention: Conv1dNNAttention,
}


def _signature_keywords(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    out = {
        name: p.default
        for name, p in params.items()
        if name != "self"
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.default is not p.empty
    }
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and cls in _FORWARDS:
        out = {**_signature_keywords(_FORWARDS[cls]), **out}
    return out


def constructor_keywords(cls: type) -> dict[str, Any]:
    """The keyword arguments ``cls`` accepts, with their defaults (forwarded ones included)."""
    return _signature_keywords(cls)


LAYERS: Mapping[str, LayerSpec] = {
    "conv": LayerSpec(conv2d=Conv2dSame, tokens=Conv1dMixer),
    "convnn": LayerSpec(conv2d=Conv2dNN, tokens=Conv1dNNMixer),
    "convnn_attn": LayerSpec(conv2d=Conv2dNNAttention, tokens=ConvNNAttention),
    "branching": LayerSpec(
        conv2d=Branching,
        tokens=BranchingMixer,
        branches=(Conv2dNN, Conv2dSame),
        token_branches=(Conv1dNNMixer, Conv1dMixer),
    ),
    "branching_attn": LayerSpec(
        conv2d=Branching,
        tokens=BranchingMixer,
        branches=(Conv2dNNAttention, Conv2dSame),
        token_branches=(ConvNNAttention, MultiHeadAttention),
    ),
    "attention": LayerSpec(conv2d=Attention2d, tokens=MultiHeadAttention),
    "ckconv": LayerSpec(conv2d=CKConv2d, tokens=None),
    "flexconv": LayerSpec(conv2d=FlexConv2d, tokens=None),
    "kvt": LayerSpec(conv2d=None, tokens=KNNAttention),
    "local_attention": LayerSpec(conv2d=None, tokens=LocalAttention),
    "sparse_attention": LayerSpec(conv2d=None, tokens=SparseAttention),
    "vig": LayerSpec(conv2d=GrapherConv2d, tokens=GrapherMixer),
}


def layer_options(name: str) -> dict[str, Any]:
    """The user options of layer kind ``name`` with their constructor defaults.

    The union of its constructors' keywords, less sizes, sub-layer builders, the sampling
    keywords, and what a network sets per position (:class:`Conv2dSame`'s ``stride``, ``groups``,
    ``bias``). Where
    two constructors share a keyword, the first one's default is kept (``conv2d`` before tokens).
    """
    if name not in LAYERS:
        raise ValueError(f"name={name!r} is not a known layer; choose one of {sorted(LAYERS)}")
    options: dict[str, Any] = {}
    for cls in LAYERS[name].classes():
        for key, default in _signature_keywords(cls).items():
            if key in _STRUCTURAL or key in SAMPLING_KEYWORDS or key in _PER_POSITION.get(cls, ()):
                continue
            options.setdefault(key, default)
    return options
