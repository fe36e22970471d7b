"""ConvNN-Attention against the original code's layer, transcribed here from its formulas
(`MultiHeadConvNNAttention` of the original ConvNN-Attention `layers.py`; the original is not
available in CI): every metric × softmax on/off × aggregation, the sampled modes where the
original is correct, the weight loader and the projection-bias switch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnn import (
    Attention2d,
    Conv1dNNAttention,
    Conv2dNNAttention,
    ConvNNAttention,
    KNNAttention,
    LocalAttention,
    MultiHeadAttention,
    SparseAttention,
    from_convnn_attention_state_dict,
    record_neighbors,
)

METRICS = ("matmul", "cosine", "euclidean")
CONV_TYPES = ("standard", "depthwise", "depthwise-separable")


# ------------------------------------------------------------------------------ reference
class OriginalConvNNAttention(nn.Module):
    """The original ``MultiHeadConvNNAttention`` on (B, N, D) tokens, with its parameter names.

    Per head (heads batch-combined into (B·h, d, N)): the original's ``W_k`` projects the
    tokens that search, ``W_q`` the candidates; scores ``K^T Q / sqrt(d)`` (matmul), cosine of
    the L2-normalised columns, or the distance ``sqrt(|k|² + |q|² − 2 k·q)`` (euclidean,
    smallest first); weights ``softmax(s)`` / ``softmax(−dist)``, or raw ``s`` /
    ``1 / (dist + 1e-8)``; the weighted neighbours go through a bias-free stride-K ``conv``;
    heads merge back; ``W_o``. Sampled modes: the candidates' self entries get the constant
    1.1 (euclidean) or −0.1, the K−1 best follow self, whose value is the constant 1.

    ``faithful=False`` makes the two sampled-mode constants what they stand for: self is
    excluded from the candidates (±inf) and its value is its own score (our documented rule).
    Heads are merged back as intended (the original scrambled tokens for h > 1).
    """

    def __init__(
        self,
        d_hidden: int,
        num_heads: int = 1,
        K: int = 3,
        sampling_type: str = "all",
        num_samples: int = -1,
        sample_padding: int = 0,
        magnitude_type: str = "matmul",
        convolution_type: str = "depthwise",
        softmax_topk_val: bool = True,
        faithful: bool = True,
    ) -> None:
        super().__init__()
        self.h, self.d, self.K = num_heads, d_hidden // num_heads, K
        self.sampling_type, self.num_samples = sampling_type, num_samples
        self.sample_padding = sample_padding
        self.magnitude_type, self.softmax_topk_val = magnitude_type, softmax_topk_val
        self.maximum = magnitude_type in ("cosine", "matmul")
        self.faithful = faithful
        self.W_q = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_k = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_v = nn.Linear(d_hidden, d_hidden, bias=False)
        self.W_o = nn.Linear(d_hidden, d_hidden, bias=False)
        d = self.d
        if convolution_type == "standard":
            self.conv: nn.Module = nn.Conv1d(d, d, K, stride=K, bias=False)
        elif convolution_type == "depthwise":
            self.conv = nn.Conv1d(d, d, K, stride=K, groups=d, bias=False)
        else:
            self.conv = nn.Sequential(
                nn.Conv1d(d, d, K, stride=K, groups=d, bias=False),
                nn.Conv1d(d, d, 1, bias=False),
            )
        self.last_weights: torch.Tensor | None = None

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B·h, d, N): the original's ``batch_combine(split_head(t))``."""
        b, n, _ = t.shape
        return t.view(b, n, self.h, self.d).permute(0, 2, 3, 1).reshape(b * self.h, self.d, n)

    def _similarity(self, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(B', d, N) × (B', d, M) → (B', N, M)."""
        if self.magnitude_type == "matmul":
            return torch.matmul(k.transpose(1, 2), q) / self.d**0.5
        if self.magnitude_type == "cosine":
            return torch.matmul(F.normalize(k, p=2, dim=1).transpose(1, 2), F.normalize(q, dim=1))
        kk = (k**2).sum(1, keepdim=True)
        qq = (q**2).sum(1, keepdim=True)
        return torch.sqrt(kk.transpose(1, 2) + qq - 2 * torch.bmm(k.transpose(1, 2), q))

    def _weights(self, values: torch.Tensor) -> torch.Tensor:
        if self.softmax_topk_val:
            return torch.softmax(values if self.maximum else -values, dim=-1)
        return values if self.maximum else 1.0 / (values + 1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self._split(self.W_k(x)), self._split(self.W_v(x))
        if self.sampling_type == "all":
            sim = self._similarity(k, self._split(self.W_q(x)))
            values, idx = torch.topk(sim, self.K, dim=2, largest=self.maximum)
        else:
            if self.sampling_type == "random":
                samples = torch.randperm(n)[: self.num_samples]
            else:
                p = self.sample_padding
                samples = torch.linspace(p, n - p - 1, self.num_samples).long()
            sim = self._similarity(k, self._split(self.W_q(x[:, samples])))
            rows = torch.arange(len(samples))
            if self.faithful:
                sim[:, samples, rows] = 1.1 if self.magnitude_type == "euclidean" else -0.1
            else:
                sim[:, samples, rows] = -math.inf if self.maximum else math.inf
            values, pos = torch.topk(sim, self.K - 1, dim=2, largest=self.maximum)
            own = torch.arange(n).view(1, n, 1).expand(b * self.h, n, 1)
            idx = torch.cat([own, samples[pos]], dim=-1)
            if self.faithful:
                self_value = torch.ones_like(values[..., :1])
            else:
                full = self._similarity(k, self._split(self.W_q(x)))
                self_value = full.diagonal(dim1=1, dim2=2).unsqueeze(-1)
            values = torch.cat([self_value, values], dim=-1)
        weights = self._weights(values)  # (B', N, K)
        self.last_weights = weights.detach()
        bh, d, kk = b * self.h, self.d, self.K
        gathered = torch.gather(
            v.unsqueeze(-1).expand(bh, d, n, kk), 2, idx.unsqueeze(1).expand(bh, d, n, kk)
        )
        prime = (gathered * weights.unsqueeze(1)).reshape(bh, d, n * kk)
        out = self.conv(prime)  # (B·h, d, N)
        return self.W_o(out.view(b, self.h, d, n).permute(0, 3, 1, 2).reshape(b, n, -1))


class OriginalAttention(nn.Module):
    """The original ViT's ``MultiHeadAttention``: bias-free W_q/W_k/W_v/W_o, softmax(QKᵀ/√d)V."""

    def __init__(self, d_hidden: int, num_heads: int) -> None:
        super().__init__()
        self.h, self.d = num_heads, d_hidden // num_heads
        for name in ("W_q", "W_k", "W_v", "W_o"):
            setattr(self, name, nn.Linear(d_hidden, d_hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.h, self.d).transpose(1, 2)

        q, k, v = split(self.W_q(x)), split(self.W_k(x)), split(self.W_v(x))
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1)
        return self.W_o((probs @ v).transpose(1, 2).reshape(b, n, c))


def _randomised(module: nn.Module, seed: int, *, positive: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            w = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5
            p.copy_(w.abs() if positive else w)
    return module


def _pair(seed: int, d: int = 6, num_heads: int = 1, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A randomised original layer and our ConvNNAttention loaded from its state dict."""
    faithful = kwargs.pop("faithful", True)
    ref = _randomised(
        OriginalConvNNAttention(d, num_heads, faithful=faithful, **kwargs).double(), seed
    )
    ours = ConvNNAttention(d, num_heads=num_heads, attention_bias=False, **kwargs).double()
    ours.load_state_dict(from_convnn_attention_state_dict(ref.state_dict(), num_heads=num_heads))
    return ref, ours


# ------------------------------------------------------------------- all candidates (exact)
@pytest.mark.parametrize("convolution_type", CONV_TYPES)
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("magnitude_type", METRICS)
def test_all_mode_equals_the_original(
    magnitude_type: str, softmax: bool, convolution_type: str
) -> None:
    """Catches a wrong score/weight formula (e.g. the squared distance as euclidean logit), the
    query/key roles not crossed, or a filter/projection layout mismatch."""
    ref, ours = _pair(
        1,
        K=4,
        magnitude_type=magnitude_type,
        softmax_topk_val=softmax,
        convolution_type=convolution_type,
    )
    x = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("magnitude_type", METRICS)
@pytest.mark.parametrize("dims", [1, 2])
def test_1d_and_2d_layers_equal_the_original_on_their_tokens(
    dims: int, magnitude_type: str, softmax: bool
) -> None:
    """The sequence and image layers share the formula: the original over their tokens
    (raster order for images). Catches a formula change reaching only the token mixer."""
    ref = _randomised(
        OriginalConvNNAttention(
            4,
            K=3,
            magnitude_type=magnitude_type,
            softmax_topk_val=softmax,
            convolution_type="standard",
        ).double(),
        3,
    )
    cls = Conv1dNNAttention if dims == 1 else Conv2dNNAttention
    ours = cls(
        4,
        4,
        K=3,
        magnitude_type=magnitude_type,
        softmax_topk_val=softmax,
        convolution_type="standard",
        attention_bias=False,
    ).double()
    ours.load_state_dict(from_convnn_attention_state_dict(ref.state_dict()))
    shape = (2, 4, 9) if dims == 1 else (2, 4, 3, 4)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    tokens = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours(x).flatten(2).transpose(1, 2), ref(tokens))


@pytest.mark.parametrize("convolution_type", ["standard", "depthwise", "depthwise-separable"])
@pytest.mark.parametrize("num_heads", [2, 3])
def test_heads_load_the_shared_per_head_filter(num_heads: int, convolution_type: str) -> None:
    """The original's one per-head filter expands to our per-channel layout (tiled /
    block-diagonal). Catches a head permutation in the loader."""
    ref, ours = _pair(
        5,
        d=6,
        num_heads=num_heads,
        K=3,
        magnitude_type="euclidean",
        convolution_type=convolution_type,
    )
    x = torch.randn(2, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours(x), ref(x))


# ------------------------------------------------------------------------------ sampled modes
SAMPLED = [("random", 5, 0), ("spatial", 4, 1)]


@pytest.mark.parametrize("convolution_type", ["standard", "depthwise"])
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize(("sampling_type", "num_samples", "sample_padding"), SAMPLED)
def test_sampled_modes_equal_the_original_where_it_is_correct(
    sampling_type: str,
    num_samples: int,
    sample_padding: int,
    softmax: bool,
    convolution_type: str,
) -> None:
    """The original's self value is the constant 1 and its self mask −0.1: exactly right for
    cosine when a token's query and key coincide (tied W_q = W_k) and every score is ≥ 0
    (non-negative features). Catches self at the wrong slot or scored as another candidate,
    and a candidate draw that differs from the original's ``randperm(N)[:M]``."""
    kwargs = {
        "K": 3,
        "sampling_type": sampling_type,
        "num_samples": num_samples,
        "sample_padding": sample_padding,
        "magnitude_type": "cosine",
        "softmax_topk_val": softmax,
        "convolution_type": convolution_type,
    }
    ref = OriginalConvNNAttention(6, **kwargs).double()
    _randomised(ref, 7, positive=True)
    with torch.no_grad():
        ref.W_q.weight.copy_(ref.W_k.weight)
        for name in ("W_v", "W_o", "conv"):
            _randomised(getattr(ref, name), 8)
    ours = ConvNNAttention(6, attention_bias=False, **kwargs).double()
    ours.load_state_dict(from_convnn_attention_state_dict(ref.state_dict()))
    x = torch.rand(2, 12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(10)
    expected = ref(x)
    torch.manual_seed(10)
    torch.testing.assert_close(ours.train()(x), expected)


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("magnitude_type", METRICS)
@pytest.mark.parametrize(("sampling_type", "num_samples", "sample_padding"), SAMPLED)
def test_sampled_modes_score_self_by_its_own_score(
    sampling_type: str,
    num_samples: int,
    sample_padding: int,
    magnitude_type: str,
    softmax: bool,
) -> None:
    """Everywhere else we keep the original's formulas but score self by its own score and
    exclude it from the candidates (docs/behaviour.md). Catches the euclidean weights of the
    sampled path diverging from the `all` path's."""
    ref, ours = _pair(
        11,
        K=4,
        sampling_type=sampling_type,
        num_samples=num_samples,
        sample_padding=sample_padding,
        magnitude_type=magnitude_type,
        softmax_topk_val=softmax,
        convolution_type="standard",
        faithful=False,
    )
    x = torch.randn(2, 12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    torch.manual_seed(13)
    expected = ref(x)
    torch.manual_seed(13)
    torch.testing.assert_close(ours.train()(x), expected)


# ------------------------------------------------------------------------ euclidean weights
@pytest.mark.parametrize("softmax", [True, False])
def test_euclidean_gradients_are_finite_at_zero_distance(softmax: bool) -> None:
    """Tied projections put every token at distance 0 from itself (its own nearest key).
    Catches a NaN/inf gradient from the square root at 0."""
    torch.manual_seed(14)
    layer = ConvNNAttention(4, K=3, magnitude_type="euclidean", softmax_topk_val=softmax)
    with torch.no_grad():
        layer.k_proj.weight.copy_(layer.q_proj.weight)
    x = torch.randn(2, 7, 4, requires_grad=True)
    out = layer(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("softmax", [True, False])
def test_recorded_euclidean_gates_are_the_original_weights(softmax: bool) -> None:
    """The neighbour analysis records the weights the layer applies. Catches the recording
    path keeping the squared-distance gates."""
    ref, ours = _pair(15, K=3, magnitude_type="euclidean", softmax_topk_val=softmax)
    x = torch.randn(1, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    ref(x)
    model = nn.Sequential(ours)
    with record_neighbors(model) as records:
        model(x)
    (record,) = records.values()
    torch.testing.assert_close(
        record.weights.reshape(ref.last_weights.shape), ref.last_weights.float()
    )


# ---------------------------------------------------------------------------- weight loader
def test_loader_renames_inside_a_whole_checkpoint() -> None:
    """Crossed query/key roles, any prefix, other keys and plain attention layers untouched.
    Catches W_q mapped to q_proj, or the original's plain attention renamed as ConvNN."""
    conv = OriginalConvNNAttention(4, K=3, convolution_type="depthwise-separable")
    plain = OriginalAttention(4, 1)
    sd = {f"transformer_encoder.0.attention.{k}": v for k, v in conv.state_dict().items()}
    sd |= {f"transformer_encoder.1.attention.{k}": v for k, v in plain.state_dict().items()}
    sd["classifier.weight"] = torch.zeros(10, 4)
    out = from_convnn_attention_state_dict(sd)
    p = "transformer_encoder.0.attention."
    assert sorted(k for k in out if k.startswith(p)) == [
        p + n
        for n in (
            "k_proj.weight",
            "out_proj.weight",
            "pointwise_weight",
            "q_proj.weight",
            "v_proj.weight",
            "weight",
        )
    ]
    assert torch.equal(out[p + "k_proj.weight"], conv.W_q.weight)
    assert torch.equal(out[p + "q_proj.weight"], conv.W_k.weight)
    assert torch.equal(out[p + "weight"], conv.conv[0].weight)
    assert torch.equal(out[p + "pointwise_weight"], conv.conv[1].weight)
    assert torch.equal(out["transformer_encoder.1.attention.W_q.weight"], plain.W_q.weight)
    assert "classifier.weight" in out


def test_loader_errors_name_the_problem() -> None:
    """Catches silent loading of a coordinate-encoding checkpoint or an impossible head count."""
    sd = OriginalConvNNAttention(4, K=3, convolution_type="standard").state_dict()
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide the width 4"):
        from_convnn_attention_state_dict(sd, num_heads=3)
    sd["conv.weight"] = torch.zeros(4, 5, 3)  # one coordinate channel per head
    with pytest.raises(ValueError, match=r"conv.weight has shape \(4, 5, 3\).*coordinate"):
        from_convnn_attention_state_dict(sd)


# ------------------------------------------------------------------------------ bias switch
def test_multi_head_attention_without_bias_is_the_original() -> None:
    """Catches a bias left on the fused projection or the output projection."""
    ref = _randomised(OriginalAttention(8, 2), 17)
    ours = MultiHeadAttention(8, 2, attention_bias=False)
    assert ours.qkv.bias is None and ours.proj.bias is None
    with torch.no_grad():
        ours.qkv.weight.copy_(torch.cat([ref.W_q.weight, ref.W_k.weight, ref.W_v.weight]))
        ours.proj.weight.copy_(ref.W_o.weight)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ours.eval()(x), ref(x))


def test_attention_bias_switch_on_every_attention_layer() -> None:
    """Default on (unchanged for CNN backbones), off drops every projection/filter bias.
    Catches a layer that ignores the keyword."""

    def biases(m: nn.Module) -> list[str]:
        return [n for n, _ in m.named_parameters() if n.endswith("bias")]

    makers = {
        "mha": lambda b: MultiHeadAttention(8, attention_bias=b),
        "kvt": lambda b: KNNAttention(8, K=3, attention_bias=b),
        "local": lambda b: LocalAttention(8, attention_bias=b),
        "sparse": lambda b: SparseAttention(8, attention_bias=b),
        "pixels": lambda b: Attention2d(4, 8, attention_bias=b),
        "convnn_attn_std": lambda b: ConvNNAttention(
            8, convolution_type="standard", attention_bias=b
        ),
        "convnn_attn_sep": lambda b: Conv2dNNAttention(
            4, 8, convolution_type="depthwise-separable", attention_bias=b
        ),
        "convnn_attn_dw": lambda b: Conv1dNNAttention(4, 8, attention_bias=b),
    }
    for name, make in makers.items():
        assert biases(make(True)), name
        assert biases(make(False)) == [], name
    assert biases(ConvNNAttention(8)) == ["out_proj.bias"]
    with pytest.raises(ValueError, match=r"attention_bias=1 .*bool"):
        MultiHeadAttention(8, attention_bias=1)
    with pytest.raises(ValueError, match=r"attention_bias='no' .*bool"):
        ConvNNAttention(8, attention_bias="no")
