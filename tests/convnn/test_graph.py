"""ViG's Grapher against a reference written here the way the original ``gcn_lib`` computes it
(names mirror it, so its state dict is the original's): dense distance matrix, ``torch.topk``,
K-fold gathered edge tensors, numpy sine-cosine positions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnn.graph import Grapher, GrapherConv2d, GrapherMixer, relative_position_bias


# ------------------------------------------------------------------------------- reference
def ref_act(act):
    return {
        "relu": lambda: nn.ReLU(),
        "gelu": lambda: nn.GELU(),
        "leakyrelu": lambda: nn.LeakyReLU(0.2),
        "prelu": lambda: nn.PReLU(num_parameters=1, init=0.2),
        "hswish": lambda: nn.Hardswish(),
    }[act]()


class RefBasicConv(nn.Sequential):
    def __init__(self, channels, act="relu", norm=None, bias=True):
        m = []
        for i in range(1, len(channels)):
            m.append(nn.Conv2d(channels[i - 1], channels[i], 1, bias=bias, groups=4))
            if norm is not None and norm.lower() != "none":
                m.append(
                    nn.BatchNorm2d(channels[-1])
                    if norm == "batch"
                    else nn.InstanceNorm2d(channels[-1], affine=False)
                )
            if act is not None and act.lower() != "none":
                m.append(ref_act(act))
        super().__init__(*m)


def batched_index_select(x, idx):
    batch_size, num_dims, num_vertices_reduced = x.shape[:3]
    _, num_vertices, k = idx.shape
    idx_base = torch.arange(0, batch_size).view(-1, 1, 1) * num_vertices_reduced
    idx = (idx + idx_base).contiguous().view(-1)
    x = x.transpose(2, 1)
    feature = x.contiguous().view(batch_size * num_vertices_reduced, -1)[idx, :]
    return feature.view(batch_size, num_vertices, k, num_dims).permute(0, 3, 1, 2).contiguous()


class RefMRConv2d(nn.Module):
    def __init__(self, cin, cout, act, norm, bias):
        super().__init__()
        self.nn = RefBasicConv([cin * 2, cout], act, norm, bias)

    def forward(self, x, edge_index, y=None):
        x_i = batched_index_select(x, edge_index[1])
        x_j = batched_index_select(y if y is not None else x, edge_index[0])
        x_j, _ = torch.max(x_j - x_i, -1, keepdim=True)
        b, c, n, _ = x.shape
        x = torch.cat([x.unsqueeze(2), x_j.unsqueeze(2)], dim=2).reshape(b, 2 * c, n, _)
        return self.nn(x)


class RefEdgeConv2d(nn.Module):
    def __init__(self, cin, cout, act, norm, bias):
        super().__init__()
        self.nn = RefBasicConv([cin * 2, cout], act, norm, bias)

    def forward(self, x, edge_index, y=None):
        x_i = batched_index_select(x, edge_index[1])
        x_j = batched_index_select(y if y is not None else x, edge_index[0])
        return torch.max(self.nn(torch.cat([x_i, x_j - x_i], dim=1)), -1, keepdim=True)[0]


class RefGraphSAGE(nn.Module):
    def __init__(self, cin, cout, act, norm, bias):
        super().__init__()
        self.nn1 = RefBasicConv([cin, cin], act, norm, bias)
        self.nn2 = RefBasicConv([cin * 2, cout], act, norm, bias)

    def forward(self, x, edge_index, y=None):
        x_j = batched_index_select(y if y is not None else x, edge_index[0])
        x_j, _ = torch.max(self.nn1(x_j), -1, keepdim=True)
        return self.nn2(torch.cat([x, x_j], dim=1))


class RefGINConv2d(nn.Module):
    def __init__(self, cin, cout, act, norm, bias):
        super().__init__()
        self.nn = RefBasicConv([cin, cout], act, norm, bias)
        self.eps = nn.Parameter(torch.Tensor([0.0]))

    def forward(self, x, edge_index, y=None):
        x_j = batched_index_select(y if y is not None else x, edge_index[0])
        return self.nn((1 + self.eps) * x + torch.sum(x_j, -1, keepdim=True))


def ref_knn(x, y, k, relative_pos):
    """x (B, C, N, 1), y keys or None: squared distances of normalised features + bias, topk."""
    x = F.normalize(x, p=2.0, dim=1).transpose(2, 1).squeeze(-1)
    y = x if y is None else F.normalize(y, p=2.0, dim=1).transpose(2, 1).squeeze(-1)
    dist = (
        torch.sum(x * x, dim=-1, keepdim=True)
        - 2 * torch.matmul(x, y.transpose(2, 1))
        + torch.sum(y * y, dim=-1, keepdim=True).transpose(2, 1)
    )
    if relative_pos is not None:
        dist = dist + relative_pos
    _, nn_idx = torch.topk(-dist, k=k)
    b, n, _ = x.shape
    center = torch.arange(0, n).repeat(b, k, 1).transpose(2, 1)
    return torch.stack((nn_idx, center), dim=0)


class RefDyGraphConv2d(nn.Module):
    def __init__(self, cin, cout, k, d, conv, act, norm, bias, r):
        super().__init__()
        cls = {"edge": RefEdgeConv2d, "mr": RefMRConv2d, "sage": RefGraphSAGE, "gin": RefGINConv2d}
        self.gconv = cls[conv](cin, cout, act, norm, bias)
        self.k, self.d, self.r = k, d, r

    def forward(self, x, relative_pos=None):
        B, C, H, W = x.shape
        y = None
        if self.r > 1:
            y = F.avg_pool2d(x, self.r, self.r).reshape(B, C, -1, 1).contiguous()
        x = x.reshape(B, C, -1, 1).contiguous()
        edge_index = ref_knn(x, y, self.k * self.d, relative_pos)[:, :, :, :: self.d]
        return self.gconv(x, edge_index, y).reshape(B, -1, H, W).contiguous()


def np_relative_pos(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed and ViG's get_2d_relative_pos_embed, in numpy."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)
    )
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pe = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return 2 * np.matmul(pe, pe.transpose()) / pe.shape[1]


class RefGrapher(nn.Module):
    def __init__(self, c, k=9, d=1, conv="edge", act="relu", norm=None, bias=True, r=1, n=196,
                 relative_pos=False):  # fmt: skip
        super().__init__()
        self.n, self.r = n, r
        self.fc1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.graph_conv = RefDyGraphConv2d(c, 2 * c, k, d, conv, act, norm, bias, r)
        self.fc2 = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))
        self.relative_pos = None
        if relative_pos:
            t = torch.from_numpy(np.float32(np_relative_pos(c, int(n**0.5))))[None, None]
            t = F.interpolate(t, size=(n, n // (r * r)), mode="bicubic", align_corners=False)
            self.relative_pos = nn.Parameter(-t.squeeze(1), requires_grad=False)

    def forward(self, x):
        tmp = x
        x = self.fc1(x)
        _, _, H, W = x.shape
        rp = self.relative_pos
        if rp is not None and H * W != self.n:
            N = H * W
            rp = F.interpolate(rp.unsqueeze(0), size=(N, N // (self.r**2)), mode="bicubic").squeeze(
                0
            )
        return self.fc2(self.graph_conv(x, rp)) + tmp


def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights and BN statistics, so that eval mode uses every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not name.endswith("relative_pos"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.5)  # fmt: skip


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
    ("conv", "act", "norm", "k", "d", "r"),
    [
        ("edge", "relu", None, 9, 1, 1),
        ("edge", "gelu", "batch", 4, 2, 1),
        ("mr", "gelu", "batch", 5, 2, 1),
        ("mr", "relu", None, 3, 1, 2),
        ("sage", "leakyrelu", "batch", 4, 1, 1),
        ("gin", "relu", "instance", 4, 1, 1),
        ("edge", "hswish", None, 3, 1, 2),
    ],
)
def test_grapher_loads_the_original_state_dict_and_matches_it(conv, act, norm, k, d, r):
    """Catches: a renamed/reshaped parameter, MR's channel interleaving, a wrong neighbour set
    (normalisation, dilation, pooled keys), the edge-filter factorisation."""
    torch.manual_seed(0)
    ref = RefGrapher(8, k, d, conv, act, norm, True, r, n=64)
    _randomise(ref, 1)
    ours = Grapher(8, k, d, conv, act, norm, True, r=r, n=64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_grapher_relative_position_table_and_output_match_the_original():
    """Catches: a transposed/halved sine-cosine table, a missing sign, the bias not reaching the
    search, the bicubic resize for another map size."""
    torch.manual_seed(0)
    ref = RefGrapher(8, 4, 1, "mr", "gelu", "batch", True, r=2, n=16, relative_pos=True)
    ours = Grapher(8, 4, 1, "mr", "gelu", "batch", r=2, n=16, relative_pos=True)
    torch.testing.assert_close(ours.relative_pos, ref.relative_pos, rtol=0, atol=1e-6)
    _randomise(ref, 2)
    with torch.no_grad():  # a strong bias, so that it changes the neighbours
        ref.relative_pos.mul_(20.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    for side in (4, 8):
        x = torch.randn(2, 8, side, side)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_relative_position_bias_is_the_numpy_table():
    """Catches: rows and columns swapped in the position embedding."""
    ours = relative_position_bias(16, 5)
    assert ours.shape == (25, 25)
    np.testing.assert_allclose(ours.numpy(), np_relative_pos(16, 5), rtol=0, atol=1e-12)


def test_grapher_trains_and_reaches_every_parameter():
    """Catches: the search breaking autograd, a filter that never receives a gradient."""
    g = Grapher(8, 4, conv="edge", norm="batch", drop_path=0.1)
    out = g(torch.randn(2, 8, 6, 6))
    out.square().mean().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "shape", "message"),
    [
        ({"kernel_size": 9}, (1, 8, 2, 2), "kernel_size=9 × dilation=1 = 9 neighbours but only 4"),
        ({"kernel_size": 3, "dilation": 2}, (1, 8, 2, 2), "= 6 neighbours but only 4"),
        ({"kernel_size": 2, "r": 2}, (1, 8, 6, 5), "r=2 does not divide the 6×5 feature map"),
    ],
)
def test_grapher_refuses_maps_it_does_not_fit(kwargs, shape, message):
    """Catches: a silently truncated neighbour list or floor-pooled keys."""
    with pytest.raises(ValueError, match=message):
        Grapher(8, **kwargs).eval()(torch.randn(shape))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conv": "gat"}, "conv='gat' is not supported"),
        ({"act": "tanh"}, "act='tanh' is not supported"),
        ({"in_channels": 6, "conv": "gin"}, "in_channels=6 must be divisible by 4"),
        ({"relative_pos": True, "n": 20}, "n=20 must be a square number"),
        ({"kernel_size": 0}, "kernel_size=0 must be an integer >= 1"),
    ],
)
def test_grapher_rejects_bad_options(kwargs, message):
    kwargs = {"in_channels": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        Grapher(**kwargs)


def test_grapher_conv2d_projects_then_graphs():
    """Catches: a CNN position that changes the map size or skips the projection."""
    layer = GrapherConv2d(3, 8, kernel_size=4).eval()
    assert layer(torch.randn(2, 3, 5, 5)).shape == (2, 8, 5, 5)
    assert isinstance(GrapherConv2d(8, 8).proj, nn.Identity)


def test_grapher_mixer_is_the_branch_over_all_tokens():
    """Catches: a double residual, or the CLS token left out of the graph."""
    torch.manual_seed(0)
    mixer = GrapherMixer(8, kernel_size=4).eval()
    tokens = torch.randn(2, 17, 8)
    out = mixer(tokens)
    as_map = tokens.transpose(1, 2).unsqueeze(-1)
    expected = mixer.grapher(as_map) - as_map
    torch.testing.assert_close(out, expected.squeeze(-1).transpose(1, 2), rtol=1e-5, atol=1e-5)
    changed = tokens.clone()
    changed[:, 0] += 5.0  # the CLS token is a neighbour of the others
    assert not torch.allclose(mixer(changed)[:, 1:], out[:, 1:])
    with pytest.raises(ValueError, match="r=2 pools keys over a 2-D patch grid"):
        GrapherMixer(8, r=2)


def test_dilated_neighbours_are_every_dth_of_the_exact_top():
    """Catches: dilation applied before the search or to an unsorted list."""
    g = Grapher(8, kernel_size=3, dilation=2).eval()
    x = F.normalize(torch.randn(1, 8, 16, 1), dim=1)
    idx = g.graph_conv.neighbours(x, None, None)
    q = x.squeeze(-1).transpose(1, 2)
    d2 = torch.cdist(q, q).square()
    full = torch.sort(d2, dim=-1, stable=True).indices[..., :6]
    assert torch.equal(idx, full[..., ::2])
    assert math.prod(idx.shape) == 16 * 3
