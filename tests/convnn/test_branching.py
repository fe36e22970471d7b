"""Branching: channel split, [first, second] concatenation, 1×1 fusion, degenerate ratios."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convnn import Branching, Conv1dNN, Conv2dNN


def _conv(i: int, o: int) -> nn.Module:
    return nn.Conv2d(i, o, 3, padding=1)


def _convnn(i: int, o: int) -> nn.Module:
    return Conv2dNN(i, o, K=5, padding=1)


@pytest.mark.parametrize(
    ("ratio", "split"), [(0.5, (4, 4)), (0.25, (2, 6)), (0.3, (2, 6)), (0.7, (6, 2))]
)
def test_split_and_forward_equals_concat_then_pointwise(ratio: float, split) -> None:
    torch.manual_seed(0)
    block = Branching(3, 8, _convnn, _conv, branch_ratio=ratio)
    assert (block.first_channels, block.second_channels) == split
    assert block.first.out_channels == split[0] and block.second.out_channels == split[1]
    x = torch.randn(2, 3, 5, 6)
    expected = block.pointwise(torch.cat([block.first(x), block.second(x)], dim=1))
    torch.testing.assert_close(block(x), expected)
    assert block(x).shape == (2, 8, 5, 6)


def test_ratio_zero_and_one_build_a_single_branch() -> None:
    only_conv = Branching(3, 8, _convnn, _conv, branch_ratio=0.0)
    assert only_conv.first is None and isinstance(only_conv.second, nn.Conv2d)
    only_nn = Branching(3, 8, _convnn, _conv, branch_ratio=1)
    assert only_nn.second is None and isinstance(only_nn.first, Conv2dNN)
    x = torch.randn(1, 3, 4, 4)
    for block in (only_conv, only_nn):
        assert block(x).shape == (1, 8, 4, 4)
    torch.testing.assert_close(only_nn(x), only_nn.pointwise(only_nn.first(x)))


def test_gradients_reach_both_branches() -> None:
    block = Branching(3, 6, _convnn, _conv)
    block(torch.randn(2, 3, 4, 4)).square().sum().backward()
    assert block.first.weight.grad is not None and block.second.weight.grad is not None


def test_1d_branches() -> None:
    block = Branching(
        3,
        4,
        lambda i, o: Conv1dNN(i, o, K=3),
        lambda i, o: nn.Conv1d(i, o, 3, padding=1),
    )
    assert block(torch.randn(2, 3, 7)).shape == (2, 4, 7)


def test_layer_factory_branching() -> None:
    from models.layer_factory import LayerFactory

    layer = LayerFactory("branching", branch_ratio=0.5, padding=1).conv2d(3, 8)
    assert isinstance(layer, Branching) and isinstance(layer.first, Conv2dNN)
    assert layer(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "half", True])
def test_ratio_validation(ratio) -> None:
    with pytest.raises(ValueError, match=r"branch_ratio=.* must be a number in \[0, 1\]"):
        Branching(3, 8, _convnn, _conv, branch_ratio=ratio)


def test_channel_validation_and_repr() -> None:
    with pytest.raises(ValueError, match=r"out_channels=0 must be an integer >= 1"):
        Branching(3, 0, _convnn, _conv)
    assert "split=(4, 4)" in repr(Branching(3, 8, _convnn, _conv))


# ------------------------------------------------------------------ token-level BranchingMixer
@pytest.mark.parametrize(("ratio", "split"), [(0.5, (6, 6)), (0.25, (3, 9)), (0.3, (4, 8))])
def test_mixer_equals_hand_written_channel_split(ratio: float, split) -> None:
    from convnn import BranchingMixer, Conv1dMixer, Conv1dNNMixer

    torch.manual_seed(0)
    block = BranchingMixer(
        12, lambda d: Conv1dNNMixer(d, K=3), lambda d: Conv1dMixer(d), branch_ratio=ratio
    )
    d1 = split[0]
    assert (block.first_channels, block.second_channels) == split
    assert block.first.dim == split[0] and block.second.dim == split[1]
    x = torch.randn(2, 7, 12)
    first = Conv1dNNMixer(d1, K=3)
    first.load_state_dict(block.first.state_dict())
    second = Conv1dMixer(12 - d1)
    second.load_state_dict(block.second.state_dict())
    proj = nn.Linear(12, 12)
    proj.load_state_dict(block.proj.state_dict())
    expected = proj(torch.cat([first(x[..., :d1]), second(x[..., d1:])], dim=-1))
    torch.testing.assert_close(block(x), expected)


def test_mixer_attention_branches_and_degenerate_ratios() -> None:
    from convnn import BranchingMixer, ConvNNAttention, MultiHeadAttention

    def first(d: int) -> nn.Module:
        return ConvNNAttention(d, K=4, magnitude_type="matmul")

    def second(d: int) -> nn.Module:
        return MultiHeadAttention(d, num_heads=2)

    x = torch.randn(2, 5, 8)
    block = BranchingMixer(8, first, second, branch_ratio=0.5)
    expected = block.proj(torch.cat([block.first(x[..., :4]), block.second(x[..., 4:])], dim=-1))
    torch.testing.assert_close(block(x), expected)
    only_attn = BranchingMixer(8, first, second, branch_ratio=0.0)
    assert only_attn.first is None and only_attn.second.dim == 8
    only_nn = BranchingMixer(8, first, second, branch_ratio=1)
    assert only_nn.second is None and only_nn.first.in_channels == 8
    for block in (only_attn, only_nn):
        assert block(x).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="branch_ratio"):
        BranchingMixer(8, first, second, branch_ratio=1.5)


@pytest.mark.parametrize("ratio", [0.01, 0.99])
def test_a_ratio_that_empties_a_branch_is_refused(ratio: float) -> None:
    """0 < ratio < 1 must give both branches channels (else a branch silently disappears)."""
    from convnn import BranchingMixer, Conv1dMixer

    with pytest.raises(ValueError, match=rf"branch_ratio={ratio} leaves the .* of 16 channels"):
        Branching(
            3,
            16,
            first=lambda i, o: nn.Conv2d(i, o, 1),
            second=lambda i, o: nn.Conv2d(i, o, 1),
            branch_ratio=ratio,
        )
    with pytest.raises(ValueError, match=rf"branch_ratio={ratio} leaves"):
        BranchingMixer(16, first=Conv1dMixer, second=Conv1dMixer, branch_ratio=ratio)
