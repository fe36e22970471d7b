"""Kernel networks: small coordinate networks that map a relative position (x, y) ∈ [−1, 1]² to
the weights of a convolution kernel at that position (CCNN's ``ckconv.nn.ck``).

They act on (N, 2) positions and return (N, out) values with ``nn.Linear`` layers (CCNN uses 1×1
convolutions over a grid: the same maps, :func:`convnn.from_ccnn_state_dict` converts the
weights), so their matrix products appear in a FLOP count.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

__all__ = ["KERNEL_TYPES", "SIREN", "MAGNet", "build_kernel_net"]

KERNEL_TYPES: tuple[str, ...] = ("MAGNet", "SIREN")


class MAGNetFilter(nn.Module):
    """One anisotropic Gabor filter bank: ``exp(−½ Σ_d (γ_d (p_d − μ_d))²) · sin(W p + b)``."""

    def __init__(
        self,
        hidden: int,
        omega_0: float,
        alpha: float,
        beta: float,
        bias: bool,
        init_spatial_value: float,
    ) -> None:
        super().__init__()
        self.mu = nn.Parameter(init_spatial_value * (2 * torch.rand(hidden, 2) - 1))
        gamma = torch.distributions.Gamma(torch.tensor(alpha), torch.tensor(beta))
        self.gamma = nn.Parameter(gamma.sample((hidden, 2)))
        self.linear = nn.Linear(2, hidden, bias=bias)
        with torch.no_grad():
            self.linear.weight.mul_(2 * math.pi * omega_0 * self.gamma)
            if self.linear.bias is not None:
                self.linear.bias.zero_()

    def forward(self, positions: Tensor) -> Tensor:
        """(N, 2) positions → (N, hidden) filter responses."""
        envelope = (self.gamma * (positions.unsqueeze(1) - self.mu)).square().sum(-1)
        return torch.exp(-0.5 * envelope) * torch.sin(self.linear(positions))


class MAGNet(nn.Module):
    """Multiplicative Anisotropic Gabor Network: ``no_layers + 1`` Gabor filter banks multiplied
    into ``no_layers`` hidden linear maps, then a linear output layer (CCNN's ``MAGNet``)."""

    def __init__(
        self,
        out_channels: int,
        hidden: int,
        no_layers: int,
        omega_0: float,
        bias: bool = True,
        init_spatial_value: float = 1.0,
        alpha: float = 6.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.filters = nn.ModuleList(
            MAGNetFilter(hidden, omega_0, alpha / (i + 1), beta, bias, init_spatial_value)
            for i in range(no_layers + 1)
        )
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden, bias=bias) for _ in range(no_layers))
        self.output_linear = nn.Linear(hidden, out_channels, bias=bias)
        with torch.no_grad():
            for lin in self.linears:
                nn.init.kaiming_uniform_(lin.weight, nonlinearity="linear")
                if lin.bias is not None:
                    lin.bias.fill_(1.0)
            nn.init.kaiming_uniform_(self.output_linear.weight, nonlinearity="linear")
            if self.output_linear.bias is not None:
                self.output_linear.bias.zero_()

    def forward(self, positions: Tensor) -> Tensor:
        """(N, 2) positions → (N, out_channels) kernel values."""
        out = self.filters[0](positions)
        for filt, lin in zip(self.filters[1:], self.linears, strict=True):
            out = filt(positions) * lin(out)
        return self.output_linear(out)


class SIREN(nn.Module):
    """Sine network (Sitzmann et al.): ``no_layers − 1`` layers ``sin(ω₀ (W p + b))`` then a linear
    output layer (CCNN's ``SIREN``, ω₀ fixed)."""

    def __init__(
        self,
        out_channels: int,
        hidden: int,
        no_layers: int,
        omega_0: float,
        bias: bool = True,
    ) -> None:
        super().__init__()
        widths = [2] + [hidden] * (no_layers - 1)
        self.hidden = nn.ModuleList(
            nn.Linear(i, o, bias=bias) for i, o in itertools.pairwise(widths)
        )
        self.output_linear = nn.Linear(hidden, out_channels, bias=bias)
        self.omega_0 = float(omega_0)
        with torch.no_grad():
            for k, lin in enumerate(self.hidden):
                bound = 1.0 / lin.in_features if k == 0 else math.sqrt(6.0 / lin.in_features)
                lin.weight.uniform_(-bound, bound)
                if k > 0:
                    lin.weight.div_(omega_0)
                if lin.bias is not None:
                    lin.bias.zero_()
            nn.init.kaiming_uniform_(self.output_linear.weight, nonlinearity="linear")
            if self.output_linear.bias is not None:
                self.output_linear.bias.zero_()

    def forward(self, positions: Tensor) -> Tensor:
        """(N, 2) positions → (N, out_channels) kernel values."""
        out = positions
        for lin in self.hidden:
            out = torch.sin(self.omega_0 * lin(out))
        return self.output_linear(out)

    def extra_repr(self) -> str:
        return f"omega_0={self.omega_0}"


def build_kernel_net(
    kernel_type: str,
    out_channels: int,
    hidden: int,
    no_layers: int,
    omega_0: float,
    bias: bool,
    init_spatial_value: float,
) -> nn.Module:
    """The kernel network ``kernel_type`` (one of :data:`KERNEL_TYPES`)."""
    if kernel_type == "MAGNet":
        return MAGNet(out_channels, hidden, no_layers, omega_0, bias, init_spatial_value)
    if kernel_type == "SIREN":
        return SIREN(out_channels, hidden, no_layers, omega_0, bias)
    raise ValueError(f"kernel_type={kernel_type!r} is not one of {KERNEL_TYPES}")
