"""Token mixers (convnn.mixers): equivalences, masks, connectivity, validation, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convnn.mixers import (
    Attention2d,
    Conv1dMixer,
    Conv1dNNMixer,
    KNNAttention,
    LocalAttention,
    MultiHeadAttention,
    SparseAttention,
    _pattern_is_dense,
    sparse_pattern_mask,
)

DIM, HEADS, N = 8, 2, 13


def _x(n: int = N, b: int = 2) -> torch.Tensor:
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(1))


def _reference(mixer: torch.nn.Module) -> MultiHeadAttention:
    mha = MultiHeadAttention(DIM, num_heads=HEADS)
    mha.load_state_dict(mixer.state_dict())
    return mha.eval()


def _reference_1head(mixer: torch.nn.Module) -> MultiHeadAttention:
    mha = MultiHeadAttention(DIM, num_heads=1)
    mha.load_state_dict(mixer.state_dict())
    return mha.eval()


@pytest.mark.parametrize(
    "mixer",
    [
        KNNAttention(DIM, HEADS, K=N),
        KNNAttention(DIM, HEADS, K=1000),
        LocalAttention(DIM, HEADS, window_size=N),
        LocalAttention(DIM, HEADS, window_size=64),
        SparseAttention(DIM, HEADS, pattern="local", stride=N),
        SparseAttention(DIM, HEADS, pattern="local", stride=100),
    ],
    ids=["knn_K=N", "knn_K>N", "local_w=N", "local_w>N", "sparse_band=N", "sparse_band>N"],
)
def test_degenerate_mixers_equal_full_attention(mixer: torch.nn.Module) -> None:
    torch.manual_seed(0)
    mixer.eval()
    x = _x()
    torch.testing.assert_close(mixer(x), _reference(mixer)(x), rtol=1e-5, atol=1e-6)


def test_knn_attention_masks_all_but_top_k() -> None:
    torch.manual_seed(0)
    m = KNNAttention(DIM, num_heads=1, K=3).eval()
    x = _x()
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    scores = q @ k.transpose(1, 2) / DIM**0.5
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(3, -1).indices, 1)
    attn = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    torch.testing.assert_close(m(x), m.proj(attn @ v), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m(x), _reference_1head(m)(x))


@pytest.mark.parametrize("n, window", [(13, 4), (10, 3), (5, 2)])
def test_local_attention_windows_and_padding_mask(n: int, window: int) -> None:
    """Each window equals full attention on that slice alone: pad keys never get weight."""
    torch.manual_seed(0)
    m = LocalAttention(DIM, HEADS, window_size=window).eval()
    ref = _reference(m)
    x = _x(n)
    out = m(x)
    assert out.shape == x.shape
    for start in range(0, n, window):
        sl = slice(start, min(start + window, n))
        torch.testing.assert_close(out[:, sl], ref(x[:, sl]), rtol=1e-5, atol=1e-6)


def test_local_attention_isolates_windows() -> None:
    m = LocalAttention(DIM, HEADS, window_size=4).eval()
    x = _x(10)
    y = x.clone()
    y[:, 8:] += 5.0  # change only the last, partial window
    torch.testing.assert_close(m(x)[:, :8], m(y)[:, :8])
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


@pytest.mark.parametrize("n, stride", [(17, 4), (16, 4), (30, 5), (20, 8), (10, 3)])
def test_strided_pattern_connects_every_pair_in_two_hops(n: int, stride: int) -> None:
    a = sparse_pattern_mask(n, "strided", stride).float()
    assert ((a @ a) > 0).all()
    assert torch.equal(a, a.T)  # bidirectional
    assert not a.all()  # actually sparse for these sizes


def test_dense_pattern_rule_matches_the_mask() -> None:
    """SparseAttention skips the mask when it is all True, decided without reading the device."""
    for n in range(1, 14):
        for stride in range(1, 16):
            for pattern in ("local", "strided"):
                dense = bool(sparse_pattern_mask(n, pattern, stride).all())
                assert _pattern_is_dense(n, pattern, stride) == dense, (n, pattern, stride)


def test_local_pattern_is_a_band_and_not_two_hop_connected() -> None:
    a = sparse_pattern_mask(12, "local", 3)
    i = torch.arange(12)
    assert torch.equal(a, (i[:, None] - i[None, :]).abs() < 3)
    af = a.float()
    assert not ((af @ af) > 0).all()


def test_sparse_attention_uses_its_pattern() -> None:
    torch.manual_seed(0)
    m = SparseAttention(DIM, num_heads=1, pattern="strided", stride=4).eval()
    x = _x()
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    scores = q @ k.transpose(1, 2) / DIM**0.5
    mask = sparse_pattern_mask(N, "strided", 4)
    attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(m(x), m.proj(attn @ v), rtol=1e-5, atol=1e-6)


def test_attention2d_matches_token_attention() -> None:
    torch.manual_seed(0)
    m = Attention2d(3, 8, num_heads=2).eval()
    x = torch.randn(2, 3, 4, 5)
    out = m(x)
    assert out.shape == (2, 8, 4, 5)
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = m.attn.qkv(tokens).reshape(2, 20, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 20, 8)
    ref = m.attn.proj(ref).transpose(1, 2).reshape(2, 8, 4, 5)
    torch.testing.assert_close(out, ref)


def test_conv1d_mixer_is_depthwise_then_pointwise() -> None:
    m = Conv1dMixer(DIM, kernel_size=5)
    assert m.depthwise.groups == DIM and m.depthwise.kernel_size == (5,)
    assert m.pointwise.kernel_size == (1,)
    x = _x()
    assert m(x).shape == x.shape
    # token 0 only sees tokens 0..2 with kernel 5
    y = x.clone()
    y[:, 5:] = 0
    torch.testing.assert_close(m(x)[:, :3], m(y)[:, :3])


ALL_MIXERS = [
    lambda: MultiHeadAttention(DIM, HEADS, attention_dropout=0.1),
    lambda: KNNAttention(DIM, HEADS, attention_dropout=0.1, K=4),
    lambda: LocalAttention(DIM, HEADS, attention_dropout=0.1, window_size=4),
    lambda: SparseAttention(DIM, HEADS, attention_dropout=0.1, pattern="strided", stride=3),
    lambda: SparseAttention(DIM, HEADS, pattern="local", stride=3),
    lambda: Conv1dMixer(DIM),
]


@pytest.mark.parametrize("make", ALL_MIXERS)
def test_gradients_flow_to_input_and_every_parameter(make) -> None:
    m = make().train()
    x = _x().requires_grad_(True)
    m(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert "dim=8" in repr(m)


def test_attention2d_gradients() -> None:
    m = Attention2d(4, 6, num_heads=3)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())
    assert "num_heads=3" in repr(m)


def test_mixers_share_parameter_layout() -> None:
    keys = set(MultiHeadAttention(DIM, HEADS).state_dict())
    for m in (KNNAttention(DIM, HEADS), LocalAttention(DIM, HEADS), SparseAttention(DIM, HEADS)):
        assert set(m.state_dict()) == keys


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MultiHeadAttention(10, num_heads=3), r"num_heads=3 .*dim=10"),
        (lambda: MultiHeadAttention(8, num_heads=0), r"num_heads=0"),
        (lambda: MultiHeadAttention(8, attention_dropout=1.0), r"attention_dropout=1.0.*\[0, 1\)"),
        (lambda: MultiHeadAttention(8, attention_dropout=-0.1), r"attention_dropout=-0.1"),
        (lambda: KNNAttention(8, K=0), r"K=0 .*≥ 1"),
        (lambda: LocalAttention(8, window_size=0), r"window_size=0 .*≥ 1"),
        (lambda: SparseAttention(8, pattern="fixed"), r"pattern='fixed'.*local.*strided"),
        (lambda: SparseAttention(8, stride=0), r"stride=0"),
        (lambda: Conv1dMixer(8, kernel_size=4), r"kernel_size=4 .*odd"),
        (lambda: Attention2d(3, 10, num_heads=4), r"num_heads=4 .*out_channels=10"),
    ],
)
def test_constructor_validation(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_extra_repr_shows_hyper_parameters() -> None:
    assert "K=5" in repr(KNNAttention(DIM, K=5))
    assert "window_size=3" in repr(LocalAttention(DIM, window_size=3))
    assert "pattern='local', stride=2" in repr(SparseAttention(DIM, pattern="local", stride=2))
    assert "kernel_size=3" in repr(Conv1dMixer(DIM))


def test_conv1dnn_mixer_wraps_conv1dnn_over_tokens() -> None:
    torch.manual_seed(0)
    m = Conv1dNNMixer(DIM, K=3)
    x = _x().requires_grad_(True)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, m.layer(x.transpose(1, 2)).transpose(1, 2))
    out.sum().backward()
    assert x.grad is not None
    assert "dim=8" in repr(m)
