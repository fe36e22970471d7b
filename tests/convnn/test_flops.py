"""FLOP counts of the ConvNN layers equal a hand count, on the eager path (the flop counter sees
the inner matmuls) and on the custom-op path (registered formulas), and a VGG11 with ConvNN
costs exactly its searches more than the same VGG11 with 3×3 convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import convnn.functional.budget as budget
from convnn import Conv2dNN, Conv2dNNAttention
from models.layer_factory import LayerFactory
from models.vgg import VGG


@pytest.fixture(params=["eager", "custom_ops"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test on both paths; the custom ops register their formulas on first use."""
    if request.param == "custom_ops":
        monkeypatch.setattr(budget, "_FORCE_CUSTOM_OPS", True)
        Conv2dNN(1, 1, K=2)(torch.randn(1, 1, 2, 2))
    return request.param


def _flops(module: nn.Module, x: torch.Tensor, *, backward: bool) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        out = module(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def _block_width(columns: int, k: int) -> int:
    """Scored columns rounded up to the top-K's blocks: 32 wide from 2·k·32 columns on, 8 wide
    from 2·k·8 on (the search scores whole blocks, the pad columns with zero keys)."""
    for width in (32, 8):
        if columns >= 2 * k * width:
            return -(-columns // width) * width
    return columns


def test_conv2dnn_fwd_bwd_equals_the_hand_count(path: str) -> None:
    """Catches a search, aggregation or aggregation-backward that counts 0 (or twice)."""
    B, C, OUT, K, H = 2, 4, 6, 4, 6
    n = H * H
    x = torch.randn(B, C, H, H, requires_grad=True)
    search = 2 * B * n * n * C  # every query against all 36 keys, C multiply-adds each
    agg = 2 * B * n * K * C * OUT  # one (K·C) × O matmul per query
    # backward: filter gradient and input gradient, one matmul of the same size each
    assert _flops(Conv2dNN(C, OUT, K=K), x, backward=True) == search + 3 * agg
    # padding 1: the 36 real tokens, the K - 1 first zero tokens and one spare column
    padded = 2 * B * n * (n + K - 1 + 1) * C
    assert _flops(Conv2dNN(C, OUT, K=K, padding=1), x, backward=True) == padded + 3 * agg


def test_conv2dnn_attention_fwd_bwd_equals_the_hand_count(path: str) -> None:
    """Catches the attention op's scores, gated aggregation or backward counting 0."""
    B, C, OUT, K, H = 2, 4, 6, 4, 6
    n = H * H
    tok = B * n
    x = torch.randn(B, C, H, H, requires_grad=True)
    layer = Conv2dNNAttention(C, OUT, K=K, convolution_type="standard")
    proj = 2 * tok * C * C  # each of q, k, v: (C -> C) per token
    search = 2 * B * n * n * C  # top-K among all 36 tokens ("all": self not forced)
    scores = 2 * tok * K * C  # cosine scores of the K selected keys
    agg = 2 * tok * K * C * OUT  # standard filter over the K gated values
    out_proj = 2 * tok * OUT * OUT
    forward = 3 * proj + search + scores + agg + out_proj
    # backward: out_proj (input + weight), attention (scores recomputed + their gradient,
    # filter + value gradients), q/k/v (recomputed from the tokens, input + weight each)
    backward = 2 * out_proj + 2 * scores + 2 * agg + 3 * 3 * proj
    assert _flops(layer, x, backward=False) == forward
    assert _flops(layer, x, backward=True) == forward + backward


def test_vgg11_convnn_costs_its_searches_more_than_vgg11_conv(path: str) -> None:
    """Catches ConvNN layers counted as 0 FLOPs in a network (VGG11 + ConvNN used to report
    10,240 FLOPs against 305 M for VGG11 + Conv2d)."""
    torch.manual_seed(0)
    width = 1 / 16
    x = torch.randn(1, 3, 32, 32)
    conv = VGG(LayerFactory("conv"), width_multiplier=width).eval()
    nn_ = VGG(LayerFactory("convnn", K=9, padding=1), width_multiplier=width).eval()
    with torch.no_grad():
        flops_conv = _flops(conv, x, backward=False)
        flops_nn = _flops(nn_, x, backward=False)
    # the searches, layer by layer: (input channels, map side) of VGG11's eight 3×3 layers
    k = 9
    search = 0
    for c, side in ((3, 32), (4, 16), (8, 8), (16, 8), (16, 4), (32, 4), (32, 2), (32, 2)):
        n = side * side
        padding_tokens = (side + 2) ** 2 - n
        columns = n + k - 1 + 1 if padding_tokens > k - 1 else (side + 2) ** 2
        search += 2 * n * _block_width(columns, k - 1) * c
    assert flops_nn - flops_conv == search
    assert flops_nn > flops_conv
