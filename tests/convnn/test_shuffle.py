"""PixelShuffle1d / PixelUnshuffle1d: exact inverses with nn.PixelShuffle's channel layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convnn import PixelShuffle1d, PixelUnshuffle1d


@pytest.mark.parametrize("r", [1, 2, 3])
def test_round_trip_is_exact(r: int) -> None:
    x = torch.randn(2, 4 * r, 5)
    y = PixelShuffle1d(r)(x)
    assert y.shape == (2, 4, 5 * r)
    assert torch.equal(PixelUnshuffle1d(r)(y), x)
    z = torch.randn(3, 2, 6 * r)
    assert torch.equal(PixelShuffle1d(r)(PixelUnshuffle1d(r)(z)), z)


def test_layout_matches_formula_and_2d_pixel_shuffle() -> None:
    r = 3
    x = torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 6, 4)
    y = PixelShuffle1d(r)(x)
    for c in range(2):
        for t in range(4):
            for i in range(r):
                assert y[:, c, t * r + i].tolist() == x[:, c * r + i, t].tolist()
    # the same grouping as the 2-D op: channel c·r + i goes to sub-position i of pixel t
    in2d = torch.zeros(2, 2 * r * r, 1, 4)
    in2d.view(2, 2, r, r, 1, 4)[:, :, 0] = x.view(2, 2, r, 1, 4)  # first row of each r×r block
    assert torch.equal(F.pixel_shuffle(in2d, r)[:, :, 0], y)


def test_errors_name_argument_and_shape() -> None:
    with pytest.raises(ValueError, match=r"upscale_factor=0 must be an integer >= 1"):
        PixelShuffle1d(0)
    with pytest.raises(ValueError, match=r"downscale_factor=2.0"):
        PixelUnshuffle1d(2.0)
    with pytest.raises(ValueError, match=r"C divisible by 2, got shape \(1, 3, 4\)"):
        PixelShuffle1d(2)(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match=r"T divisible by 2, got shape \(1, 3, 5\)"):
        PixelUnshuffle1d(2)(torch.randn(1, 3, 5))


def test_repr() -> None:
    assert "upscale_factor=2" in repr(PixelShuffle1d(2))
    assert "downscale_factor=3" in repr(PixelUnshuffle1d(3))
