"""CCNN's CKConv/FlexConv (github:david-knigge/ccnn, ckconv/nn) re-written from its definitions,
with its parameter names and layouts, as an independent reference (CCNN itself is not in CI).

Kept literal on purpose: 1×1 convolutions over a (1, 2, S, S) grid, ``view(-1, C, S, S)`` of the
kernel, the centred crop by slice indices, Chang initialisation at the first forward, and the
FFT correlation with the input padded by the last kernel side. Differences from the original: no
OmegaConf, 2-D only, non-causal only, the grid is made in the module's dtype (CCNN makes it in
float32 and casts: the same in float32, coarser in float64) and the FFT output keeps its dtype
(CCNN casts it to float32).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def linspace_grid(size: int, dtype: torch.dtype) -> torch.Tensor:
    axes = [torch.linspace(-1, 1, steps=size, dtype=dtype)] * 2
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def gaussian_window(x, gamma, mu):
    return torch.exp(-0.5 * ((gamma * (x.unsqueeze(1) - mu)) ** 2).sum(2))


class MAGNetLayer(nn.Module):
    def __init__(self, hidden, omega_0, alpha, beta, init_spatial_value):
        super().__init__()
        self.mu = nn.Parameter(init_spatial_value * (2 * torch.rand(hidden, 2) - 1))
        self.gamma = nn.Parameter(torch.distributions.gamma.Gamma(alpha, beta).sample((hidden, 2)))
        self.linear = nn.Conv2d(2, hidden, 1, bias=True)
        self.linear.weight.data *= 2 * np.pi * omega_0 * self.gamma.view(*self.gamma.shape, 1, 1)
        self.linear.bias.data.fill_(0.0)

    def forward(self, x):
        window = gaussian_window(
            x, self.gamma.view(1, *self.gamma.shape, 1, 1), self.mu.view(1, *self.mu.shape, 1, 1)
        )
        return window * torch.sin(self.linear(x))


class MAGNet(nn.Module):
    def __init__(self, out_channels, hidden, no_layers, omega_0, init_spatial_value):
        super().__init__()
        self.linears = nn.ModuleList(nn.Conv2d(hidden, hidden, 1) for _ in range(no_layers))
        self.output_linear = nn.Conv2d(hidden, out_channels, 1)
        self.filters = nn.ModuleList(
            MAGNetLayer(hidden, omega_0, 6.0 / (layer + 1), 1.0, init_spatial_value)
            for layer in range(no_layers + 1)
        )
        for lin in self.linears:
            nn.init.kaiming_uniform_(lin.weight, nonlinearity="linear")
            lin.bias.data.fill_(1.0)
        nn.init.kaiming_uniform_(self.output_linear.weight, nonlinearity="linear")
        self.output_linear.bias.data.fill_(0.0)

    def forward(self, x):
        out = self.filters[0](x)
        for i in range(1, len(self.filters)):
            out = self.filters[i](x) * self.linears[i - 1](out)
        return self.output_linear(out)


class SIRENlayer2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, omega_0):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=True)
        self.register_buffer("omega_0", torch.full((1,), float(omega_0)))

    def forward(self, x):
        return self.omega_0 * F.conv2d(x, self.weight, self.bias)


class Sine(nn.Module):
    def forward(self, x):
        return torch.sin(x)


class SIREN(nn.Module):
    def __init__(self, out_channels, hidden, no_layers, omega_0):
        super().__init__()
        net = [SIRENlayer2d(2, hidden, omega_0), Sine()]
        for _ in range(no_layers - 2):
            net += [SIRENlayer2d(hidden, hidden, omega_0), Sine()]
        self.kernel_net = nn.Sequential(*net)
        self.output_linear = nn.Conv2d(hidden, out_channels, 1)
        first = True
        for m in self.kernel_net.modules():
            if isinstance(m, nn.Conv2d):
                w_std = (
                    1 / m.weight.shape[1] if first else math.sqrt(6.0 / m.weight.shape[1]) / omega_0
                )
                m.weight.data.uniform_(-w_std, w_std)
                m.bias.data.fill_(0.0)
                first = False
        nn.init.kaiming_uniform_(self.output_linear.weight, nonlinearity="linear")
        self.output_linear.bias.data.fill_(0.0)

    def forward(self, x):
        return self.output_linear(self.kernel_net(x))


def conv(x, kernel, bias, separable):
    padding = [s // 2 for s in kernel.shape[-2:]]
    groups = 1
    if separable:
        groups = kernel.shape[1]
        kernel = kernel.view(kernel.shape[1], 1, *kernel.shape[2:])
    return F.conv2d(x, kernel, bias=bias, padding=padding, stride=1, groups=groups)


def fftconv(x, kernel, bias, separable):
    assert not separable, "Separable fftconv not implemented."
    x_shape = x.shape
    pad = kernel.shape[-1] // 2
    x = F.pad(x, 4 * [pad])
    if x.shape[-1] % 2 != 0:
        x = F.pad(x, [0, 1])
    kernel = F.pad(
        kernel, [p for i in reversed(range(2, x.ndim)) for p in [0, x.shape[i] - kernel.shape[i]]]
    )
    x_fr = torch.fft.rfftn(x, dim=(2, 3))
    kernel_fr = torch.conj(torch.fft.rfftn(kernel, dim=(2, 3)))
    out = torch.fft.irfftn(torch.einsum("bi..., oi... -> bo...", x_fr, kernel_fr), dim=(2, 3))
    out = out[:, :, : x_shape[-2], : x_shape[-1]]
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


class CCNNConv(nn.Module):
    """CKConv / SeparableCKConv (``flex=False``) or FlexConv / SeparableFlexConv, Gaussian mask."""

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        separable,
        flex,
        kernel_type="MAGNet",
        size=9,
        no_hidden=8,
        no_layers=3,
        omega_0=10.0,
        chang=True,
        use_fft=False,
        mask_init_value=0.075,
        threshold=0.1,
        dynamic_cropping=True,
        learn_mean=False,
    ):
        super().__init__()
        init_spatial_value = mask_init_value * 1.667 if flex else 1.0
        kernel_out = in_channels if separable else in_channels * out_channels
        if kernel_type == "MAGNet":
            self.Kernel = MAGNet(kernel_out, no_hidden, no_layers, omega_0, init_spatial_value)
        else:
            self.Kernel = SIREN(kernel_out, no_hidden, no_layers, omega_0)
        self.bias = nn.Parameter(torch.zeros(in_channels if separable else out_channels))
        self.in_channels, self.separable, self.flex = in_channels, separable, flex
        self.kernel_size, self.use_fft, self.chang = size, use_fft, chang
        self.register_buffer("train_length", torch.zeros(1).int(), persistent=True)
        self.register_buffer("initialized", torch.zeros(1).bool(), persistent=True)
        if separable:
            self.channel_mixer = nn.Conv2d(in_channels, out_channels, 1)
            nn.init.kaiming_normal_(self.channel_mixer.weight)
            self.channel_mixer.bias.data.fill_(0.0)
        if flex:
            self.mask_width_param = nn.Parameter(torch.Tensor([mask_init_value, mask_init_value]))
            if learn_mean:
                self.mask_mean_param = nn.Parameter(torch.Tensor([0.0, 0.0]))
            else:
                self.register_buffer("mask_mean_param", torch.Tensor([0.0, 0.0]))
            self.register_buffer("mask_threshold", threshold * torch.ones(1), persistent=True)
            self.dynamic_cropping = dynamic_cropping

    def positions(self, x):
        if self.train_length[0] == 0:
            if self.kernel_size == "full":
                self.train_length[0] = 2 * x.shape[-1] - 1
            elif self.kernel_size == "same":
                self.train_length[0] = x.shape[-1]
            else:
                self.train_length[0] = int(self.kernel_size)
        dtype = self.Kernel.output_linear.weight.dtype
        self.linspace_stepsize = ((1.0 - (-1.0)) / (self.train_length[0] - 1)).to(dtype)
        return linspace_grid(int(self.train_length[0]), dtype).unsqueeze(0)

    def crop(self, kernel_pos):
        aux = self.mask_width_param * torch.sqrt(-2.0 * torch.log(self.mask_threshold))
        roots = torch.stack([self.mask_mean_param - aux, self.mask_mean_param + aux], dim=1)
        root = torch.max(torch.abs(roots), dim=1).values
        crops_needed = torch.abs(root) < 1.0
        mid_point = torch.tensor(kernel_pos.shape[-2:]) // 2
        index = torch.ceil((root - 0.0) / self.linspace_stepsize + 1e-8).int()
        index_1, index_2 = mid_point - (index - 1), mid_point + index
        slices = [slice(None)] * len(kernel_pos.shape)
        for i, crop_needed in enumerate(crops_needed):
            if crop_needed:
                slices[i + 2] = slice(int(index_1[i]), int(index_2[i]))
        return kernel_pos[tuple(slices)]

    def kernel(self, x):
        kernel_pos = self.positions(x)
        if self.flex and self.dynamic_cropping:
            with torch.no_grad():
                kernel_pos = self.crop(kernel_pos)
        if not self.initialized[0] and self.chang:
            with torch.no_grad():
                numel = kernel_pos.reshape(1, 2, -1).shape[-1]
                factor = numel if self.separable else self.in_channels * numel
                self.Kernel.output_linear.weight.data *= math.sqrt(1.0 / factor)
            self.initialized[0] = True
        kernel = self.Kernel(kernel_pos).view(-1, x.shape[1], *kernel_pos.shape[2:])
        if self.flex:
            mean = self.mask_mean_param.view(1, -1, 1, 1)
            width = self.mask_width_param.view(1, -1, 1, 1)
            mask = torch.exp(
                -0.5 * (1.0 / (width**2 + 1e-8) * (kernel_pos - mean) ** 2).sum(1, keepdim=True)
            )
            kernel = mask * kernel
        return kernel

    def forward(self, x):
        kernel = self.kernel(x)
        use_fft = self.use_fft and (not self.flex or all(s > 50 for s in kernel.shape[2:]))
        if use_fft and not self.separable:
            out = fftconv(x, kernel, self.bias, separable=False)
        else:  # CCNN asserts on separable FFT: the spatial result is what it should compute
            out = conv(x, kernel, self.bias, self.separable)
        return self.channel_mixer(out) if self.separable else out
