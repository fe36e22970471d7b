"""ViG's Grapher (Han et al., "Vision GNN"): a dynamic kNN graph convolution over feature maps.

The block is 1×1 conv + BN → graph convolution over the k nearest tokens → 1×1 conv + BN →
drop-path → residual. The graph is rebuilt every forward from L2-normalised features: the
k·dilation nearest keys of every token by squared Euclidean distance (plus an optional fixed
relative-position bias), every ``dilation``-th of them kept. Keys are the tokens themselves, or
``r``×``r`` average-pooled tokens when ``r > 1``.

Names, defaults and state-dict keys follow the original ``gcn_lib`` (``Grapher``,
``DyGraphConv2d``, ``EdgeConv2d``, ``MRConv2d``, ``GraphSAGE``, ``GINConv2d``), so its weights load
unchanged. The neighbour search is :func:`convnn.functional.knn_search` (exact, ties to the lower
key index, blocked: the distance matrix is never resident beyond one block; the
relative-position bias is added per block). Feature maps are (B, C, H, W); graph tensors use the
original's (B, C, N, 1) layout.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.functional import gather_neighbors, knn_search

__all__ = [
    "GRAPH_ACTIVATIONS",
    "GRAPH_CONVS",
    "GRAPH_NORMS",
    "BasicConv",
    "DropPath",
    "DyGraphConv2d",
    "EdgeConv2d",
    "GINConv2d",
    "GraphSAGE",
    "Grapher",
    "GrapherConv2d",
    "GrapherMixer",
    "MRConv2d",
    "act_layer",
    "relative_position_bias",
]

GRAPH_CONVS: tuple[str, ...] = ("edge", "mr", "sage", "gin")
GRAPH_ACTIVATIONS: tuple[str, ...] = ("relu", "leakyrelu", "prelu", "gelu", "hswish")
GRAPH_NORMS: tuple[str, ...] = ("batch", "instance")
_GROUPS = 4  # the original's 1×1 graph-convolution filters are grouped in 4


def act_layer(act: str) -> nn.Module:
    """The activation named ``act`` as the original builds it (slope 0.2 for leaky ReLU, PReLU)."""
    name = act.lower()
    if name == "relu":
        return nn.ReLU()
    if name == "leakyrelu":
        return nn.LeakyReLU(0.2)
    if name == "prelu":
        return nn.PReLU(num_parameters=1, init=0.2)
    if name == "gelu":
        return nn.GELU()
    return nn.Hardswish()


def _norm(norm: str, channels: int) -> nn.Module:
    if norm.lower() == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    return nn.InstanceNorm2d(channels, affine=False)


def _is_off(value: str | None) -> bool:
    return value is None or value.lower() == "none"


def _check_choice(key: str, value: str | None, choices: tuple[str, ...], optional: bool) -> None:
    if optional and _is_off(value):
        return
    if not isinstance(value, str) or value.lower() not in choices:
        allowed = choices + (("none",) if optional else ())
        raise ValueError(f"{key}={value!r} is not supported; choose one of {allowed}")


class BasicConv(nn.Sequential):
    """[1×1 conv (groups 4) → norm → act] per consecutive pair of ``channels``; Kaiming init."""

    def __init__(
        self,
        channels: list[int],
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
    ) -> None:
        mods: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            mods.append(nn.Conv2d(c_in, c_out, 1, bias=bias, groups=_GROUPS))
            if not _is_off(norm):
                mods.append(_norm(norm, channels[-1]))
            if not _is_off(act):
                mods.append(act_layer(act))
        super().__init__(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _channels_last(x: Tensor) -> Tensor:
    """(B, C, N, 1) → (B, N, C)."""
    return x.squeeze(-1).transpose(1, 2)


def _neighbours(x: Tensor, idx: Tensor) -> Tensor:
    """Features (B, N, K, C) of the neighbours ``idx`` (B, N, K) of (B, C, Nk, 1) ``x``."""
    return gather_neighbors(_channels_last(x), idx)


class MRConv2d(nn.Module):
    """Max-relative graph convolution: nn([x_i ; max_j (x_j − x_i)]), channels interleaved."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.nn = BasicConv([in_channels * 2, out_channels], act, norm, bias)

    def forward(self, x: Tensor, idx: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, C, N, 1) tokens, (B, N, K) neighbours among ``y`` (or ``x``) → (B, out, N, 1)."""
        # max_j (x_j − x_i) = max_j x_j − x_i exactly: subtracting x_i is monotone in x_j
        rel = _neighbours(x if y is None else y, idx).amax(2).transpose(1, 2).unsqueeze(-1) - x
        b, c, n, _ = x.shape
        return self.nn(torch.stack([x, rel], dim=2).reshape(b, 2 * c, n, 1))


class EdgeConv2d(nn.Module):
    """Edge convolution: max_j nn([x_i ; x_j − x_i]) over the neighbours j of every token i."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.nn = BasicConv([in_channels * 2, out_channels], act, norm, bias)

    def forward(self, x: Tensor, idx: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, C, N, 1) tokens, (B, N, K) neighbours among ``y`` (or ``x``) → (B, out, N, 1).

        The 1×1 filter is linear: W[x_i; x_j − x_i] + b = W[x_i; −x_i] + b + W[0; x_j]. Both terms
        are computed per token and only the second is gathered: K times fewer filter products
        than filtering every edge, same edge features for the norm and activation.
        """
        conv = self.nn[0]
        keys = x if y is None else y
        centre = conv(torch.cat([x, -x], dim=1))  # (B, out, N, 1)
        lin = F.conv2d(
            torch.cat([torch.zeros_like(keys), keys], dim=1),
            conv.weight,
            None,
            1,
            0,
            1,
            conv.groups,
        )
        edges = _neighbours(lin, idx).permute(0, 3, 1, 2) + centre  # (B, out, N, K)
        for module in list(self.nn)[1:]:
            edges = module(edges)
        return edges.amax(-1, keepdim=True)


class GraphSAGE(nn.Module):
    """GraphSAGE: nn2([x_i ; max_j nn1(x_j)])."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.nn1 = BasicConv([in_channels, in_channels], act, norm, bias)
        self.nn2 = BasicConv([in_channels * 2, out_channels], act, norm, bias)

    def forward(self, x: Tensor, idx: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, C, N, 1) tokens, (B, N, K) neighbours among ``y`` (or ``x``) → (B, out, N, 1)."""
        xj = _neighbours(x if y is None else y, idx).permute(0, 3, 1, 2)  # (B, C, N, K)
        xj = self.nn1(xj).amax(-1, keepdim=True)
        return self.nn2(torch.cat([x, xj], dim=1))


class GINConv2d(nn.Module):
    """GIN: nn((1 + ε) x_i + Σ_j x_j) with a learnable ε (initially 0)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.nn = BasicConv([in_channels, out_channels], act, norm, bias)
        self.eps = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, idx: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, C, N, 1) tokens, (B, N, K) neighbours among ``y`` (or ``x``) → (B, out, N, 1)."""
        xj = _neighbours(x if y is None else y, idx).sum(2).transpose(1, 2).unsqueeze(-1)
        return self.nn((1 + self.eps) * x + xj)


_CONV_CLASSES: dict[str, type[nn.Module]] = {
    "edge": EdgeConv2d,
    "mr": MRConv2d,
    "sage": GraphSAGE,
    "gin": GINConv2d,
}


class DyGraphConv2d(nn.Module):
    """Dynamic graph convolution: the kNN graph of the current features, then ``gconv``.

    Neighbours: the ``kernel_size``·``dilation`` nearest keys of every token by squared
    Euclidean distance between L2-normalised features (plus ``relative_pos``), every
    ``dilation``-th kept; in training with ``stochastic``, with probability ``epsilon`` a random
    ``kernel_size`` of them instead (one draw per forward, as the original).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 9,
        dilation: int = 1,
        conv: str = "edge",
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.0,
        r: int = 1,
    ) -> None:
        super().__init__()
        self.gconv = _CONV_CLASSES[conv.lower()](in_channels, out_channels, act, norm, bias)
        self.k = int(kernel_size)
        self.d = int(dilation)
        self.r = int(r)
        self.stochastic = bool(stochastic)
        self.epsilon = float(epsilon)

    def neighbours(self, x: Tensor, y: Tensor | None, relative_pos: Tensor | None) -> Tensor:
        """(B, N, kernel_size) neighbour indices of (B, C, N, 1) ``x`` among ``y`` (or ``x``)."""
        queries = F.normalize(_channels_last(x), dim=-1)
        keys = queries if y is None else F.normalize(_channels_last(y), dim=-1)
        reach = self.k * self.d
        if reach > keys.shape[1]:
            raise ValueError(
                f"kernel_size={self.k} × dilation={self.d} = {reach} neighbours but only "
                f"{keys.shape[1]} tokens to choose from; lower kernel_size or dilation"
            )
        bias = None if relative_pos is None else -relative_pos
        idx = knn_search(queries, keys, reach, "euclidean", include_self=False, score_bias=bias)
        if self.stochastic and self.training and torch.rand(1) < self.epsilon:
            return idx[..., torch.randperm(reach, device=idx.device)[: self.k]]
        return idx[..., :: self.d]

    def forward(self, x: Tensor, relative_pos: Tensor | None = None) -> Tensor:
        """(B, C, H, W) → (B, out, H, W)."""
        b, c, h, w = x.shape
        y = None
        if self.r > 1:
            if h % self.r or w % self.r:
                raise ValueError(
                    f"r={self.r} does not divide the {h}×{w} feature map; use an r that divides "
                    "both sides (1 disables key pooling)"
                )
            y = F.avg_pool2d(x, self.r, self.r).reshape(b, c, -1, 1)
        x = x.reshape(b, c, -1, 1)
        idx = self.neighbours(x, y, relative_pos)
        return self.gconv(x, idx, y).reshape(b, -1, h, w)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's branch with probability ``p`` in training, else scale it
    by 1/(1 − p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """Identity in eval or at p = 0."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    out = pos.reshape(-1, 1) * (1.0 / 10000**omega).reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def relative_position_bias(dim: int, grid: int) -> Tensor:
    """ViG's (grid², grid²) relative-position table: 2·⟨p_i, p_j⟩ / dim for the 2-D sine-cosine
    position embeddings p (MAE's layout: first half of the channels from the column index,
    second half from the row index), in float64."""
    if dim % 4:
        raise ValueError(f"in_channels={dim} must be divisible by 4 for relative_pos")
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # numpy meshgrid(w, h) layout
    # the original's grid[0] varies along the columns, grid[1] along the rows
    pos = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return 2.0 * pos @ pos.t() / pos.shape[1]


class Grapher(nn.Module):
    """ViG's Grapher block on (B, C, H, W): x + drop_path(fc2(graph_conv(fc1(x)))).

    Args:
        in_channels: channels C (kept); divisible by 2 (4 for ``sage``/``gin``) for the grouped
            1×1 filters.
        kernel_size: neighbours per token k.
        dilation: keep every ``dilation``-th of the k·dilation nearest.
        conv: graph convolution, ``edge`` | ``mr`` | ``sage`` | ``gin``.
        act: activation in the graph convolution (``relu`` | ``leakyrelu`` | ``prelu`` |
            ``gelu`` | ``hswish``); ``None`` for none.
        norm: normalisation in the graph convolution (``batch`` | ``instance`` | ``None``).
        bias: bias of the graph convolution's filters.
        stochastic, epsilon: in training, with probability ``epsilon`` random neighbours among
            the k·dilation nearest instead of the dilated ones.
        r: keys are r×r average-pooled tokens (r must divide the map).
        n: tokens of the map the relative-position table is built for (a square number);
            other maps get the table bicubically resized.
        drop_path: stochastic-depth probability of the branch.
        relative_pos: add ViG's fixed relative-position bias to the distances.
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int = 9,
        dilation: int = 1,
        conv: str = "edge",
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.0,
        r: int = 1,
        n: int = 196,
        drop_path: float = 0.0,
        relative_pos: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("conv", conv, GRAPH_CONVS, optional=False)
        _check_choice("act", act, GRAPH_ACTIVATIONS, optional=True)
        _check_choice("norm", norm, GRAPH_NORMS, optional=True)
        for key, value in (
            ("kernel_size", kernel_size),
            ("dilation", dilation),
            ("r", r),
            ("n", n),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be an integer >= 1")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon={epsilon!r} must be in [0, 1]")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path={drop_path!r} must be in [0, 1)")
        need = _GROUPS if conv.lower() in ("sage", "gin") else _GROUPS // 2
        if in_channels % need:
            raise ValueError(
                f"in_channels={in_channels} must be divisible by {need} for conv={conv!r} "
                f"(the graph convolution's 1×1 filters are grouped in {_GROUPS})"
            )
        self.channels = in_channels
        self.n = n
        self.r = r
        self.fc1 = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.BatchNorm2d(in_channels)
        )
        self.graph_conv = DyGraphConv2d(
            in_channels, in_channels * 2, kernel_size, dilation, conv, act, norm, bias,
            stochastic, epsilon, r,
        )  # fmt: skip
        self.fc2 = nn.Sequential(
            nn.Conv2d(in_channels * 2, in_channels, 1), nn.BatchNorm2d(in_channels)
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.relative_pos: nn.Parameter | None = None
        if relative_pos:
            side = math.isqrt(n)
            if side * side != n or n % (r * r):
                raise ValueError(
                    f"n={n} must be a square number of tokens divisible by r²={r * r} for "
                    "relative_pos"
                )
            table = relative_position_bias(in_channels, side).float()[None, None]
            table = F.interpolate(
                table, size=(n, n // (r * r)), mode="bicubic", align_corners=False
            )
            self.relative_pos = nn.Parameter(-table.squeeze(1), requires_grad=False)

    def _relative_pos(self, h: int, w: int) -> Tensor | None:
        """The table for an h×w map: as built when h·w = n, else bicubically resized."""
        if self.relative_pos is None or h * w == self.n:
            return self.relative_pos
        n = h * w
        return F.interpolate(
            self.relative_pos.unsqueeze(0), size=(n, n // (self.r * self.r)), mode="bicubic"
        ).squeeze(0)

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch drop_path(fc2(graph_conv(fc1(x)))) on (B, C, H, W)."""
        x = self.fc1(x)
        _, _, h, w = x.shape
        x = self.graph_conv(x, self._relative_pos(h, w))
        return self.drop_path(self.fc2(x))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        return self.branch(x) + x


class GrapherConv2d(nn.Module):
    """The ``vig`` layer in a CNN: [1×1 conv + BN from in to out channels, when they differ] →
    :class:`Grapher` (out channels). Same options as :class:`Grapher`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 9,
        dilation: int = 1,
        conv: str = "edge",
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.0,
        r: int = 1,
        n: int = 196,
        drop_path: float = 0.0,
        relative_pos: bool = False,
    ) -> None:
        super().__init__()
        self.proj: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels)
            )
        self.grapher = Grapher(
            out_channels, kernel_size, dilation, conv, act, norm, bias, stochastic, epsilon, r, n,
            drop_path, relative_pos,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) → (B, out, H, W)."""
        return self.grapher(self.proj(x))


class GrapherMixer(nn.Module):
    """The ``vig`` layer as a transformer token mixer: (B, N, D) → (B, N, D), the Grapher's
    residual branch over all N tokens as one graph.

    Every token, the CLS token included, is a node: it searches its neighbours among all tokens
    and is a candidate neighbour of every other. Key pooling (``r > 1``) and the 2-D
    relative-position bias need a patch grid without the CLS token, so the mixer refuses them.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 9,
        dilation: int = 1,
        conv: str = "edge",
        act: str | None = "relu",
        norm: str | None = None,
        bias: bool = True,
        stochastic: bool = False,
        epsilon: float = 0.0,
        r: int = 1,
        n: int = 196,
        drop_path: float = 0.0,
        relative_pos: bool = False,
    ) -> None:
        super().__init__()
        if r != 1:
            raise ValueError(
                f"r={r} pools keys over a 2-D patch grid; as a token mixer the Grapher sees the "
                "token sequence (CLS included): use r=1"
            )
        if relative_pos:
            raise ValueError(
                "relative_pos=True needs a 2-D patch grid; as a token mixer the Grapher sees the "
                "token sequence (CLS included): use relative_pos=false"
            )
        self.grapher = Grapher(
            dim, kernel_size, dilation, conv, act, norm, bias, stochastic, epsilon, r, n,
            drop_path, relative_pos,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) tokens → (B, N, D) mixed tokens (the caller adds the residual)."""
        grid = x.transpose(1, 2).unsqueeze(-1)  # (B, D, N, 1)
        return self.grapher.branch(grid).squeeze(-1).transpose(1, 2)
