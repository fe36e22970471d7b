"""Branching: two layers in parallel on one input, concatenated, then a 1×1 conv."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["Branching", "BranchingMixer", "split_channels"]

LayerBuilder = Callable[[int, int], nn.Module]
MixerBuilder = Callable[[int], nn.Module]


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def split_channels(name: str, total: int, branch_ratio: float) -> tuple[int, int]:
    """``(round(branch_ratio · total), the rest)``: the channels of the first and second branch.

    Ratio 0 or 1 gives one branch; any other ratio must leave each branch at least one channel.
    """
    _check_size(name, total)
    if (
        isinstance(branch_ratio, bool)
        or not isinstance(branch_ratio, (int, float))
        or not 0.0 <= float(branch_ratio) <= 1.0
    ):
        raise ValueError(f"branch_ratio={branch_ratio!r} must be a number in [0, 1]")
    first = round(float(branch_ratio) * total)
    second = total - first
    if 0.0 < branch_ratio < 1.0 and 0 in (first, second):
        empty = "first" if first == 0 else "second"
        raise ValueError(
            f"branch_ratio={branch_ratio!r} leaves the {empty} branch with 0 of {total} "
            "channels; use 0 or 1 for a single branch, or a ratio that gives each branch at "
            "least one channel"
        )
    return first, second


class Branching(nn.Module):
    """Runs ``first`` (the ConvNN branch) and ``second`` side by side and fuses them.

    ``first(in_channels, round(branch_ratio · O))`` and ``second(in_channels, O - that)`` build
    the branches; their outputs are concatenated as [first, second] and mixed by a 1×1 conv
    (O → O). ``branch_ratio`` 0 builds only ``second``, 1 only ``first``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        first: LayerBuilder,
        second: LayerBuilder,
        branch_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        _check_size("in_channels", in_channels)
        self.first_channels, self.second_channels = split_channels(
            "out_channels", out_channels, branch_ratio
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.branch_ratio = float(branch_ratio)
        self.first = first(in_channels, self.first_channels) if self.first_channels else None
        self.second = second(in_channels, self.second_channels) if self.second_channels else None
        self.pointwise = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in (self.first, self.second) if branch is not None]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if y.dim() == 3:
            return self.pointwise(y.unsqueeze(-1)).squeeze(-1)
        return self.pointwise(y)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, branch_ratio={self.branch_ratio}, "
            f"split=({self.first_channels}, {self.second_channels})"
        )


class BranchingMixer(nn.Module):
    """Token-mixer Branching: (B, N, D) → (B, N, D) with two mixers side by side on the channels.

    Like :class:`Branching`, ``round(branch_ratio · D)`` channels go to ``first`` (the ConvNN
    branch) and the rest to ``second``: ``first(D1)`` mixes channels ``[:D1]``, ``second(D2)``
    channels ``[D1:]``; the outputs are concatenated as [first, second] and merged by a linear
    projection (D → D). ``branch_ratio`` 0 builds only ``second``, 1 only ``first``.
    """

    def __init__(
        self,
        dim: int,
        first: MixerBuilder,
        second: MixerBuilder,
        branch_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        self.first_channels, self.second_channels = split_channels("dim", dim, branch_ratio)
        self.dim = dim
        self.branch_ratio = float(branch_ratio)
        self.first = first(self.first_channels) if self.first_channels else None
        self.second = second(self.second_channels) if self.second_channels else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) → (B, N, D)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"BranchingMixer expects tokens (B, N, D) with D={self.dim}, "
                f"got shape {tuple(x.shape)}"
            )
        d1 = self.first_channels
        outs = []
        if self.first is not None:
            outs.append(self.first(x[..., :d1]))
        if self.second is not None:
            outs.append(self.second(x[..., d1:]))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return self.proj(y)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, branch_ratio={self.branch_ratio}, "
            f"split=({self.first_channels}, {self.second_channels})"
        )
