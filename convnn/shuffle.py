"""1-D pixel shuffle: ``PixelShuffle1d`` and ``PixelUnshuffle1d`` are exact inverses.

Channel layout follows :class:`torch.nn.PixelShuffle`: ``out[b, c, t·r + i] = in[b, c·r + i, t]``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = [
    "PixelShuffle1d",
    "PixelUnshuffle1d",
    "check_scale",
    "pixel_shuffle_1d",
    "pixel_unshuffle_1d",
]


def check_scale(name: str, value: object) -> int:
    """Return ``value`` as a positive int scale, or raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return value


def pixel_shuffle_1d(x: Tensor, r: int) -> Tensor:
    """(B, C, T) → (B, C / r, T · r); ValueError with the shape if C is not divisible by r."""
    if x.dim() != 3 or x.shape[1] % r:
        raise ValueError(
            f"pixel shuffle 1d with upscale_factor={r} needs (B, C, T) with C divisible by {r}, "
            f"got shape {tuple(x.shape)}"
        )
    b, c, t = x.shape
    return x.reshape(b, c // r, r, t).transpose(2, 3).reshape(b, c // r, t * r)


def pixel_unshuffle_1d(x: Tensor, r: int) -> Tensor:
    """(B, C, T) → (B, C · r, T / r); ValueError with the shape if T is not divisible by r."""
    if x.dim() != 3 or x.shape[2] % r:
        raise ValueError(
            f"pixel unshuffle 1d with downscale_factor={r} needs (B, C, T) with T divisible by "
            f"{r}, got shape {tuple(x.shape)}"
        )
    b, c, t = x.shape
    return x.reshape(b, c, t // r, r).transpose(2, 3).reshape(b, c * r, t // r)


class PixelShuffle1d(nn.Module):
    """(B, C, T) → (B, C / r, T · r): moves channel groups of size r into the sequence."""

    def __init__(self, upscale_factor: int) -> None:
        super().__init__()
        self.upscale_factor = check_scale("upscale_factor", upscale_factor)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle_1d(x, self.upscale_factor)

    def extra_repr(self) -> str:
        return f"upscale_factor={self.upscale_factor}"


class PixelUnshuffle1d(nn.Module):
    """(B, C, T) → (B, C · r, T / r): the exact inverse of :class:`PixelShuffle1d`."""

    def __init__(self, downscale_factor: int) -> None:
        super().__init__()
        self.downscale_factor = check_scale("downscale_factor", downscale_factor)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_unshuffle_1d(x, self.downscale_factor)

    def extra_repr(self) -> str:
        return f"downscale_factor={self.downscale_factor}"
