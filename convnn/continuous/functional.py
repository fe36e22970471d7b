"""The functional core of continuous kernels: relative-position grids, the Gaussian mask, its
crop, and convolution with a generated kernel (spatial or FFT, dense or depthwise).

Everything here is a pure function of tensors and Python sizes, so the layers stay thin and each
formula exists once. Formulas follow CCNN (Romero, Knigge et al.); where CCNN is wrong the fix is
noted (see docs/behaviour.md).
"""

from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FFT_MIN_KERNEL",
    "MASK_EPS",
    "conv2d_fft",
    "conv2d_spatial",
    "crop_sizes",
    "gaussian_mask",
    "grid_size",
    "relative_positions",
]

#: FlexConv uses the FFT only when every kernel side is larger than this (CCNN's rule).
FFT_MIN_KERNEL = 50
#: Added to the squared mask width so a zero width does not divide by zero (CCNN's value).
MASK_EPS = 1e-8


def grid_size(kernel_size: int | str, width: int) -> int:
    """Side of the kernel grid for ``kernel_size`` on a map of ``width`` columns.

    ``"same"``: the width (must be odd); ``"full"``: ``2·width − 1``; an odd int: itself.
    """
    if kernel_size == "full":
        return 2 * width - 1
    if kernel_size == "same":
        if width % 2 == 0:
            raise ValueError(
                f"kernel_size='same' takes the map width {width}, which is even, but a continuous "
                "kernel must have an odd side; use kernel_size='full' or an odd integer"
            )
        return width
    return int(kernel_size)


def relative_positions(
    sizes: tuple[int, int],
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    crop: tuple[int, int] | None = None,
) -> Tensor:
    """(h·w, 2) relative positions in [−1, 1] of a ``sizes`` grid, row-major (CCNN's
    ``linspace_grid`` with ``meshgrid(indexing="ij")``); ``crop`` keeps the centred h×w part."""
    axes = []
    for i, n in enumerate(sizes):
        axis = torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
        if crop is not None and crop[i] < n:
            start = n // 2 - crop[i] // 2
            axis = axis[start : start + crop[i]]
        axes.append(axis)
    rows, cols = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((rows, cols), dim=-1).reshape(-1, 2)


def gaussian_mask(positions: Tensor, mean: Tensor, width: Tensor) -> Tensor:
    """(N,) Gaussian mask ``exp(−½ Σ_d (p_d − μ_d)² / (σ_d² + ε))`` at (N, 2) ``positions``."""
    z = (positions - mean).square() / (width.square() + MASK_EPS)
    return torch.exp(-0.5 * z.sum(-1))


def crop_sizes(size: int, mean: Tensor, width: Tensor, threshold: float) -> tuple[int, int]:
    """Per-axis side of the kernel grid after dynamic cropping (CCNN's centred crop).

    The mask falls below ``threshold`` beyond ``|μ| + σ·√(−2 ln t)``; the grid is cut to the
    odd number of positions inside that radius. A crop size is a shape, so this reads the mask
    parameters on the host: the one host read of a continuous layer (none without cropping).
    """
    if size < 2:
        return (size, size)
    with torch.no_grad():
        step = struct.unpack("f", struct.pack("f", 2.0 / (size - 1)))[0]  # CCNN's float32 step
        spread = width * math.sqrt(-2.0 * math.log(threshold))
        root = torch.maximum((mean - spread).abs(), (mean + spread).abs())
        index = torch.ceil(root / step + 1e-8)
        cropped = torch.where(root < 1.0, 2 * index - 1, torch.full_like(index, size))
        sides = cropped.clamp(1, size).to(torch.int64)
        packed = int((sides[0] * (size + 1) + sides[1]).item())  # one host read for both axes
    return divmod(packed, size + 1)


def _depthwise(kernel: Tensor, separable: bool) -> tuple[Tensor, int]:
    if separable:
        return kernel.reshape(kernel.shape[1], 1, *kernel.shape[2:]), kernel.shape[1]
    return kernel, 1


def conv2d_spatial(
    x: Tensor, kernel: Tensor, bias: Tensor | None, separable: bool = False
) -> Tensor:
    """Cross-correlation of (B, C, H, W) ``x`` with an odd-sided kernel, output H×W.

    ``kernel``: (O, C, kh, kw), or (1, C, kh, kw) for ``separable`` (depthwise) convolution.
    """
    weight, groups = _depthwise(kernel, separable)
    kh, kw = weight.shape[-2:]
    if separable and x.device.type == "cpu":
        # oneDNN's depthwise backward is many times faster in channels-last on CPU.
        fmt = torch.channels_last
        x, weight = x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
        out = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=groups)
        return out.contiguous()
    return F.conv2d(x, weight.contiguous(), bias, padding=(kh // 2, kw // 2), groups=groups)


def conv2d_fft(x: Tensor, kernel: Tensor, bias: Tensor | None, separable: bool = False) -> Tensor:
    """:func:`conv2d_spatial` computed with FFTs (cost independent of the kernel size).

    Each axis is zero-padded by its own half kernel side (CCNN pads both by the last one, which
    shifts the output of a rectangular kernel); depthwise kernels work (CCNN asserts). Half
    precision runs in float32 (cuFFT needs power-of-two sizes in half).
    """
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x, kernel = x.float(), kernel.float()
    else:
        kernel = kernel.to(dtype)
    h, w = x.shape[-2:]
    kh, kw = kernel.shape[-2:]
    size = (h + kh - 1, w + kw - 1)
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2))
    x_fr = torch.fft.rfftn(x, s=size, dim=(-2, -1))
    k_fr = torch.fft.rfftn(kernel, s=size, dim=(-2, -1)).conj()
    if separable:
        out_fr = x_fr * k_fr
    else:
        out_fr = torch.einsum("bihw,oihw->bohw", x_fr, k_fr)
    out = torch.fft.irfftn(out_fr, s=size, dim=(-2, -1))[..., :h, :w]
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)
    return out.to(dtype)
