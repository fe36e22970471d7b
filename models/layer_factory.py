"""One layer-factory mechanism for every backbone: a layer option (``layer=convnn`` ...) becomes
an object that builds 2-D layers for CNNs and token mixers for transformers.

Backbones never read configs; they receive a :class:`LayerFactory` and call
``factory.conv2d(in_channels, out_channels)`` (a stride-1 layer that keeps H×W) or
``factory.token_mixer(dim)`` (a module mapping (B, N, D) → (B, N, D)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["LAYER_NAMES", "IncompatibleLayerError", "LayerFactory"]


class IncompatibleLayerError(ValueError):
    """A layer option was asked for a role (2-D layer or token mixer) it cannot fill."""


# Options every ConvNN-style layer accepts (SPEC §1 names), and their defaults.
_CONVNN_OPTIONS: dict[str, Any] = {
    "K": 9,
    "magnitude_type": "cosine",
    "padding": 0,
    "shuffle_pattern": "NA",
    "shuffle_scale": 1,
    "similarity_type": "Col",
    "aggregation_type": "Col",
    "lambda_param": 0.5,
}
_ATTN_OPTIONS: dict[str, Any] = {
    **_CONVNN_OPTIONS,
    "magnitude_type": "matmul",
    "num_heads": 1,
    "attention_dropout": 0.0,
    "convolution_type": "depthwise",
    "softmax_topk_val": True,
    "coordinate_encoding": False,
}
_CONV_OPTIONS: dict[str, Any] = {"kernel_size": 3}

# name -> accepted options with defaults. `sampling` is handled separately (the sampling group).
_OPTIONS: dict[str, dict[str, Any]] = {
    "conv": _CONV_OPTIONS,
    "convnn": _CONVNN_OPTIONS,
    "convnn_attn": _ATTN_OPTIONS,
    "branching": {**_CONVNN_OPTIONS, **_CONV_OPTIONS, "branch_ratio": 0.5},
    "branching_attn": {**_ATTN_OPTIONS, **_CONV_OPTIONS, "branch_ratio": 0.5},
    "attention": {"num_heads": 1, "attention_dropout": 0.0},
    "kvt": {"num_heads": 1, "attention_dropout": 0.0, "K": 100},
    "local_attention": {"num_heads": 1, "attention_dropout": 0.0, "window_size": 16},
    "sparse_attention": {
        "num_heads": 1,
        "attention_dropout": 0.0,
        "pattern": "strided",
        "stride": 8,
    },
}
LAYER_NAMES: tuple[str, ...] = tuple(_OPTIONS)

_SAMPLING_DEFAULTS: dict[str, Any] = {
    "type": "all",
    "num_samples": -1,
    "sample_padding": 0,
    "eval_mode": "fixed",
}


def _sampling_kwargs(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Map the `sampling` group onto the layer constructor keywords of SPEC §1.2."""
    return {
        "sampling_type": sampling["type"],
        "num_samples": sampling["num_samples"],
        "sample_padding": sampling["sample_padding"],
        "eval_sampling": sampling["eval_mode"],
    }


def _pick(options: Mapping[str, Any], keys: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in keys if k in options}


class LayerFactory:
    """Builds the chosen layer for any backbone from plain options.

    Args:
        name: one of :data:`LAYER_NAMES`.
        sampling: the sampling group (``type``, ``num_samples``, ``sample_padding``,
            ``eval_mode``); used by every ConvNN layer in the network.
        **options: layer hyper-parameters; unknown keys are rejected with the valid ones listed.
    """

    def __init__(self, name: str, sampling: Mapping[str, Any] | None = None, **options: Any):
        if name not in _OPTIONS:
            raise ValueError(
                f"layer.name={name!r} is not a known layer; choose one of {LAYER_NAMES}"
            )
        allowed = _OPTIONS[name]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"layer.{unknown[0]} is not an option of layer={name}; "
                f"valid options are {sorted(allowed)}"
            )
        self.name = name
        self.options: dict[str, Any] = {**allowed, **options}
        merged = dict(_SAMPLING_DEFAULTS)
        merged.update(dict(sampling or {}))
        unknown_s = sorted(set(merged) - set(_SAMPLING_DEFAULTS))
        if unknown_s:
            raise ValueError(
                f"sampling.{unknown_s[0]} is not a sampling option; valid options are "
                f"{sorted(_SAMPLING_DEFAULTS)}"
            )
        self.sampling = merged

    # ---------------------------------------------------------------- roles
    @property
    def supports_2d(self) -> bool:
        """Whether this layer can replace a 3×3 convolution in a CNN."""
        return self.name in _BUILD_2D

    @property
    def supports_tokens(self) -> bool:
        """Whether this layer can be the token mixer of a transformer block."""
        return self.name in _BUILD_TOKENS

    def conv2d(self, in_channels: int, out_channels: int) -> nn.Module:
        """A stride-1 layer mapping (B, in, H, W) → (B, out, H, W)."""
        if not self.supports_2d:
            raise IncompatibleLayerError(
                f"layer={self.name} cannot be used in a CNN backbone; layers that fit are "
                f"{sorted(_BUILD_2D)}"
            )
        return _BUILD_2D[self.name](self, in_channels, out_channels)

    def token_mixer(self, dim: int) -> nn.Module:
        """A token mixer mapping (B, N, dim) → (B, N, dim)."""
        if not self.supports_tokens:
            raise IncompatibleLayerError(
                f"layer={self.name} cannot be a transformer token mixer; layers that fit are "
                f"{sorted(_BUILD_TOKENS)}"
            )
        return _BUILD_TOKENS[self.name](self, dim)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"LayerFactory({self.name!r}, {opts}, sampling={self.sampling})"

    # ------------------------------------------------------- shared builders
    def _convnn_kwargs(self, keys: Mapping[str, Any]) -> dict[str, Any]:
        return {**_pick(self.options, keys), **_sampling_kwargs(self.sampling)}

    def _conv(self, in_channels: int, out_channels: int) -> nn.Module:
        k = int(self.options["kernel_size"])
        return nn.Conv2d(in_channels, out_channels, k, padding=k // 2)

    def _convnn(self, in_channels: int, out_channels: int) -> nn.Module:
        from convnn import Conv2dNN

        return Conv2dNN(in_channels, out_channels, **self._convnn_kwargs(_CONVNN_OPTIONS))

    def _convnn_attn(self, in_channels: int, out_channels: int) -> nn.Module:
        from convnn import Conv2dNNAttention

        return Conv2dNNAttention(in_channels, out_channels, **self._convnn_kwargs(_ATTN_OPTIONS))


def _branching(nn_builder: Callable[[LayerFactory, int, int], nn.Module]):
    def build(f: LayerFactory, in_channels: int, out_channels: int) -> nn.Module:
        from convnn import Branching

        return Branching(
            in_channels,
            out_channels,
            first=lambda i, o: nn_builder(f, i, o),
            second=lambda i, o: f._conv(i, o),
            branch_ratio=float(f.options["branch_ratio"]),
        )

    return build


def _attention_2d(f: LayerFactory, in_channels: int, out_channels: int) -> nn.Module:
    from convnn import Attention2d

    return Attention2d(in_channels, out_channels, **_pick(f.options, _OPTIONS["attention"]))


def _tokens(cls_name: str) -> Callable[[LayerFactory, int], nn.Module]:
    """A builder for the token mixer ``convnn.<cls_name>`` (input (B, N, dim))."""

    def build(f: LayerFactory, dim: int) -> nn.Module:
        import convnn

        cls = getattr(convnn, cls_name)
        kwargs = dict(f.options)
        if f.name in ("convnn", "convnn_attn"):
            kwargs.update(_sampling_kwargs(f.sampling))
        return cls(dim, **kwargs)

    return build


def _branching_tokens(attn: bool) -> Callable[[LayerFactory, int], nn.Module]:
    """Token Branching: Conv1dNN ‖ Conv1d (``branching``) or ConvNN-Attention ‖ attention."""

    def build(f: LayerFactory, dim: int) -> nn.Module:
        import convnn

        def first(d: int) -> nn.Module:
            if attn:
                return convnn.ConvNNAttention(d, **f._convnn_kwargs(_ATTN_OPTIONS))
            return convnn.Conv1dNNMixer(d, **f._convnn_kwargs(_CONVNN_OPTIONS))

        def second(d: int) -> nn.Module:
            if attn:
                return convnn.MultiHeadAttention(d, **_pick(f.options, _OPTIONS["attention"]))
            return convnn.Conv1dMixer(d, **_pick(f.options, _CONV_OPTIONS))

        ratio = float(f.options["branch_ratio"])
        return convnn.BranchingMixer(dim, first=first, second=second, branch_ratio=ratio)

    return build


_BUILD_2D: dict[str, Callable[..., nn.Module]] = {
    "conv": LayerFactory._conv,
    "convnn": LayerFactory._convnn,
    "convnn_attn": LayerFactory._convnn_attn,
    "branching": _branching(LayerFactory._convnn),
    "branching_attn": _branching(LayerFactory._convnn_attn),
    "attention": _attention_2d,
}
_BUILD_TOKENS: dict[str, Callable[..., nn.Module]] = {
    "conv": _tokens("Conv1dMixer"),
    "convnn": _tokens("Conv1dNNMixer"),
    "convnn_attn": _tokens("ConvNNAttention"),
    "attention": _tokens("MultiHeadAttention"),
    "kvt": _tokens("KNNAttention"),
    "local_attention": _tokens("LocalAttention"),
    "sparse_attention": _tokens("SparseAttention"),
    "branching": _branching_tokens(attn=False),
    "branching_attn": _branching_tokens(attn=True),
}
