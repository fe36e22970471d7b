"""Normalised coordinate grids appended to features by the coordinate-aware layers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "coordinate_grid_1d",
    "coordinate_grid_2d",
]


def coordinate_grid_2d(
    H: int, W: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """(2, H, W) coordinates: channel 0 = x (columns, linspace(-1, 1, W)), 1 = y (rows)."""
    xs = torch.linspace(-1.0, 1.0, W, device=device, dtype=dtype)
    ys = torch.linspace(-1.0, 1.0, H, device=device, dtype=dtype)
    return torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W)])


def coordinate_grid_1d(
    T: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """(1, T) coordinates linspace(-1, 1, T) along the sequence."""
    return torch.linspace(-1.0, 1.0, T, device=device, dtype=dtype).view(1, T)
