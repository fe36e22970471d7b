"""ConvNN-Attention layers: equality with softmax attention, a dense reference for
every convolution type, head separation, self handling in sampled modes, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convnn.functional.budget as budget
from convnn.attention import (
    Conv1d_NN_Attn,
    Conv1dNNAttention,
    Conv2d_NN_Attn,
    Conv2dNNAttention,
    ConvNNAttention,
)

CONV_TYPES = ("standard", "depthwise", "depthwise-separable")


# ------------------------------------------------------------------------------ references
def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(B, N, C) -> (B, h, N, C/h)."""
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def _dense_scores(q: torch.Tensor, k: torch.Tensor, magnitude_type: str) -> torch.Tensor:
    """Larger-is-better scores (..., Nq, Nk), computed densely."""
    if magnitude_type == "matmul":
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if magnitude_type == "cosine":
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return qn @ kn.transpose(-1, -2)
    return -((q.unsqueeze(-2) - k.unsqueeze(-3)) ** 2).sum(-1)


def dense_reference(layer: Conv1dNNAttention, tokens: torch.Tensor) -> torch.Tensor:
    """Straightforward ConvNN-Attention for `all` sampling, no padding/shuffle, Col/Col.

    tokens (B, N, C) -> (B, N, O). Neighbours are gathered into the original (B, C, N·K)
    sequence and aggregated by a stride-K ``F.conv1d`` with the layer's Conv1d-layout weights.
    """
    b, n, c = tokens.shape
    h, kk = layer.num_heads, layer.K
    q = _heads(layer.q_proj(tokens), h)
    k = _heads(layer.k_proj(tokens), h)
    v = _heads(layer.v_proj(tokens), h)
    scores = _dense_scores(q, k, layer.magnitude_type)
    idx = torch.argsort(-scores, dim=-1, stable=True)[..., :kk]  # ties -> lower index
    sel = scores.gather(-1, idx)
    if layer.magnitude_type == "euclidean":  # weights from the distance, as the original
        dist = (-sel).sqrt()
        g = (-dist).softmax(-1) if layer.softmax_topk_val else 1.0 / (dist + 1e-8)
    else:
        g = sel.softmax(-1) if layer.softmax_topk_val else sel
    d = c // h
    gathered = (
        v.unsqueeze(2).expand(b, h, n, n, d).gather(3, idx.unsqueeze(-1).expand(b, h, n, kk, d))
    )  # (B, h, N, K, d)
    gathered = gathered * g.unsqueeze(-1)
    seq = gathered.permute(0, 1, 4, 2, 3).reshape(b, c, n * kk)  # channel = head·d + j
    if layer.convolution_type == "standard":
        agg = F.conv1d(seq, layer.weight, layer.bias, stride=kk)
    else:
        agg = F.conv1d(seq, layer.weight, None, stride=kk, groups=c)
        if layer.convolution_type == "depthwise-separable":
            agg = F.conv1d(agg, layer.pointwise_weight, layer.pointwise_bias)
    return layer.out_proj(agg.transpose(1, 2))


def sdpa_reference(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Multi-head softmax attention with the layer's own q/k/v/out projections."""
    h = layer.num_heads
    q, k, v = (_heads(p(tokens), h) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    a = F.scaled_dot_product_attention(q, k, v)
    return layer.out_proj(a.transpose(1, 2).flatten(2))


def _randomise(layer: nn.Module, seed: int = 0) -> None:
    """Give every parameter (including the depthwise ones initialised to 1) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _tok2d(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


# -------------------------------------------------------------------- attention at init
@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_2d_equals_sdpa_with_depthwise_ones_and_k_equal_n(num_heads: int) -> None:
    torch.manual_seed(0)
    layer = Conv2dNNAttention(8, 6, K=12, magnitude_type="matmul", num_heads=num_heads)
    assert layer.convolution_type == "depthwise" and layer.softmax_topk_val
    assert torch.equal(layer.weight, torch.ones(8, 1, 12))
    x = torch.randn(2, 8, 3, 4)
    out = layer(x)
    assert out.shape == (2, 6, 3, 4)
    torch.testing.assert_close(_tok2d(out), sdpa_reference(layer, _tok2d(x)))


@pytest.mark.parametrize("num_heads", [1, 3])
def test_token_mixer_equals_sdpa(num_heads: int) -> None:
    torch.manual_seed(1)
    mixer = ConvNNAttention(12, K=7, magnitude_type="matmul", num_heads=num_heads)
    x = torch.randn(3, 7, 12)  # 7 tokens, e.g. CLS + 6 patches: CLS is an ordinary token
    out = mixer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, sdpa_reference(mixer, x))


def test_token_mixer_accepts_layer_factory_keywords() -> None:
    from models.layer_factory import LayerFactory

    factory = LayerFactory("convnn_attn", K=5, num_heads=2)
    mixer = factory.token_mixer(8)
    assert isinstance(mixer, ConvNNAttention)
    x = torch.randn(2, 10, 8)
    assert mixer(x).shape == (2, 10, 8)
    conv = factory.conv2d(4, 6)
    assert isinstance(conv, Conv2dNNAttention)
    assert conv(torch.randn(1, 4, 3, 3)).shape == (1, 6, 3, 3)


def test_aliases_and_defaults() -> None:
    assert Conv1d_NN_Attn is Conv1dNNAttention and Conv2d_NN_Attn is Conv2dNNAttention
    layer = Conv2dNNAttention(4, 4)
    assert layer.K == 9 and layer.magnitude_type == "cosine" and layer.num_heads == 1
    assert layer.convolution_type == "depthwise" and layer.softmax_topk_val is True
    assert layer.q_proj.bias is None and layer.k_proj.bias is None and layer.v_proj.bias is None
    text = repr(layer)
    for key in ("K=9", "num_heads=1", "convolution_type='depthwise'", "softmax_topk_val=True"):
        assert key in text


# ------------------------------------------------------------------- dense reference
@pytest.mark.parametrize("convolution_type", CONV_TYPES)
@pytest.mark.parametrize("magnitude_type", ["matmul", "cosine", "euclidean"])
def test_matches_dense_reference(convolution_type: str, magnitude_type: str) -> None:
    torch.manual_seed(2)
    layer = Conv1dNNAttention(
        6, 5, K=3, magnitude_type=magnitude_type, convolution_type=convolution_type, num_heads=2
    ).double()
    _randomise(layer)
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x).transpose(1, 2), dense_reference(layer, x.transpose(1, 2)))


@pytest.mark.parametrize("convolution_type", CONV_TYPES)
def test_matches_dense_reference_without_softmax(convolution_type: str) -> None:
    torch.manual_seed(3)
    layer = Conv1dNNAttention(
        4,
        4,
        K=4,
        magnitude_type="matmul",
        convolution_type=convolution_type,
        softmax_topk_val=False,
    ).double()
    _randomise(layer, seed=3)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x).transpose(1, 2), dense_reference(layer, x.transpose(1, 2)))


def test_parameter_layouts() -> None:
    std = Conv2dNNAttention(4, 6, K=5, convolution_type="standard")
    assert std.weight.shape == (6, 4, 5) and std.bias.shape == (6,)
    assert std.out_proj.in_features == 6 and std.out_proj.out_features == 6
    dw = Conv2dNNAttention(4, 6, K=5, convolution_type="depthwise")
    assert dw.weight.shape == (4, 1, 5) and dw.bias is None
    assert dw.out_proj.in_features == 4 and dw.out_proj.out_features == 6
    sep = Conv2dNNAttention(4, 6, K=5, convolution_type="depthwise-separable")
    assert sep.weight.shape == (4, 1, 5) and sep.pointwise_weight.shape == (6, 4, 1)
    assert torch.equal(sep.weight, torch.ones(4, 1, 5))


# ---------------------------------------------------------------------------- heads
def test_heads_never_mix_tokens() -> None:
    """With identity projections, head j's output equals a single-head layer run on head j's
    channels alone, and perturbing one head's channels leaves the other heads untouched."""
    torch.manual_seed(4)
    c, h, n = 6, 3, 10
    d = c // h
    multi = Conv1dNNAttention(c, c, K=4, magnitude_type="matmul", num_heads=h)
    _randomise(multi, seed=4)
    with torch.no_grad():
        for p in (multi.q_proj, multi.k_proj, multi.v_proj, multi.out_proj):
            p.weight.copy_(torch.eye(c))
        multi.out_proj.bias.zero_()
    x = torch.randn(2, c, n)
    out = multi(x)
    for j in range(h):
        single = Conv1dNNAttention(d, d, K=4, magnitude_type="matmul", num_heads=1)
        with torch.no_grad():
            for p in (single.q_proj, single.k_proj, single.v_proj, single.out_proj):
                p.weight.copy_(torch.eye(d))
            single.out_proj.bias.zero_()
            single.weight.copy_(multi.weight[j * d : (j + 1) * d])
        torch.testing.assert_close(out[:, j * d : (j + 1) * d], single(x[:, j * d : (j + 1) * d]))
    x2 = x.clone()
    x2[:, :d, 5] += 3.0  # one token, head 0's channels only
    out2 = multi(x2)
    torch.testing.assert_close(out2[:, d:], out[:, d:])
    assert not torch.allclose(out2[:, :d], out[:, :d])


# ------------------------------------------------------------------ sampled modes / self
@pytest.mark.parametrize(("sampling_type", "num_samples"), [("random", 5), ("spatial", 2)])
def test_sampled_modes_put_self_at_slot_zero(sampling_type: str, num_samples: int) -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 4, 4, 5)
    # K = 1: only self is selected, softmax over one logit is 1 -> out = out_proj(v_self).
    one = Conv2dNNAttention(
        4, 3, K=1, magnitude_type="matmul", sampling_type=sampling_type, num_samples=num_samples
    )
    tokens = _tok2d(x)
    torch.testing.assert_close(_tok2d(one(x)), one.out_proj(one.v_proj(tokens)))
    # K = 2 without softmax, rank-1 weights zero: out = out_proj(<q_i, k_i>/sqrt(C) · v_i).
    two = Conv2dNNAttention(
        4,
        3,
        K=2,
        magnitude_type="matmul",
        sampling_type=sampling_type,
        num_samples=num_samples,
        softmax_topk_val=False,
    )
    with torch.no_grad():
        two.weight[:, :, 1] = 0.0
    q, k, v = two.q_proj(tokens), two.k_proj(tokens), two.v_proj(tokens)
    self_score = (q * k).sum(-1, keepdim=True) / 2.0
    torch.testing.assert_close(_tok2d(two(x)), two.out_proj(self_score * v))


def test_all_mode_does_not_force_self() -> None:
    torch.manual_seed(6)
    layer = Conv1dNNAttention(4, 4, K=1, magnitude_type="matmul")
    _randomise(layer, seed=6)
    x = torch.randn(1, 4, 12)
    tokens = x.transpose(1, 2)
    scores = layer.q_proj(tokens) @ layer.k_proj(tokens).transpose(1, 2)
    best = scores.argmax(-1)
    assert not torch.equal(best[0], torch.arange(12)), "test needs a token whose best is not self"
    torch.testing.assert_close(layer(x).transpose(1, 2), dense_reference(layer, tokens))


def test_sampling_with_enough_samples_is_pure_top_k() -> None:
    """M >= N behaves like `all`: self is not forced, the K best keys are taken as they are."""
    torch.manual_seed(14)
    kwargs = {"K": 3, "magnitude_type": "matmul", "num_heads": 2}
    dense = ConvNNAttention(6, **kwargs)
    sampled = ConvNNAttention(6, sampling_type="random", num_samples=50, **kwargs)
    sampled.load_state_dict(dense.state_dict())
    x = torch.randn(2, 9, 6)
    torch.testing.assert_close(sampled(x), dense(x))


def test_eval_sampling_is_reproducible() -> None:
    torch.manual_seed(7)
    layer = Conv1dNNAttention(4, 4, K=3, sampling_type="random", num_samples=4).eval()
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


# ----------------------------------------------------------------------- gradients
@pytest.mark.parametrize("convolution_type", CONV_TYPES)
def test_gradcheck(convolution_type: str) -> None:
    torch.manual_seed(8)
    layer = Conv1dNNAttention(
        4, 2, K=3, magnitude_type="matmul", convolution_type=convolution_type, num_heads=2
    ).double()
    _randomise(layer, seed=8)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def fn(inp: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("magnitude_type", "softmax"), [("cosine", True), ("euclidean", False), ("euclidean", True)]
)
def test_gradcheck_input_for_other_metrics(magnitude_type: str, softmax: bool) -> None:
    torch.manual_seed(15)
    layer = Conv1dNNAttention(
        4, 2, K=2, magnitude_type=magnitude_type, softmax_topk_val=softmax, num_heads=2
    ).double()
    _randomise(layer, seed=15)
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


# The projections run inside the fused op, whose forward and backward work through blocks of
# whole samples sized by the work budget: padding (queries at some positions only),
# coordinates (values apart from the search features), heads and every filter type.
BLOCKED = [
    {"padding": 1, "convolution_type": "standard", "magnitude_type": "cosine"},
    {"coordinate_encoding": True, "num_heads": 2, "magnitude_type": "euclidean"},
    {"similarity_type": "Loc_Col", "aggregation_type": "Loc_Col", "magnitude_type": "matmul"},
    {"convolution_type": "depthwise-separable", "num_heads": 2, "padding": 1},
]


@pytest.mark.parametrize("kwargs", BLOCKED)
def test_gradcheck_through_one_sample_blocks(
    kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a wrong token or projection gradient of the recomputed q/k/v, or one block's
    gradient written to another block's samples (budget 1: every block is one sample)."""
    monkeypatch.setattr(budget, "MEMORY_BUDGET", 1)
    torch.manual_seed(16)
    layer = Conv2dNNAttention(2, 4, K=3, **kwargs).double()
    _randomise(layer, seed=16)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def fn(inp: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kwargs", BLOCKED)
def test_sample_blocks_give_the_one_block_result(
    kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches blocks that drop, repeat or misplace samples (forward, input and weight
    gradients), against one block for the whole batch."""
    torch.manual_seed(17)
    layer = Conv2dNNAttention(4, 6, K=4, attention_dropout=0.0, **kwargs)
    _randomise(layer, seed=17)
    x = torch.randn(5, 4, 5, 4)
    grad = torch.randn(5, 6, 5, 4)

    def step(limit: int) -> list[torch.Tensor]:
        monkeypatch.setattr(budget, "MEMORY_BUDGET", limit)
        inp = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(inp)
        out.backward(grad)
        return [out.detach(), inp.grad, *(p.grad for p in layer.parameters())]

    whole, blocked = step(2**30), step(1)
    for a, b in zip(whole, blocked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "matmul"])
@pytest.mark.parametrize(("size", "padding", "K"), [(8, 1, 9), (5, 1, 12), (6, 2, 20), (2, 1, 9)])
def test_surplus_padding_is_never_searched_and_changes_nothing(
    metric: str, size: int, padding: int, K: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`all` mode searches the real tokens and only the K first padding tokens (their keys
    are all k_proj(0) = 0). Integer features with many all-zero tokens tie with the padding and
    a NaN pixel ties everywhere: output and gradients must equal a search over every token."""
    torch.manual_seed(24)
    shape = (2, 3, size, size)
    x = torch.randint(-1, 2, shape).float() * (torch.rand(shape) < 0.6)
    x.view(-1)[5] = float("nan")
    layer = Conv2dNNAttention(3, 4, K=K, padding=padding, magnitude_type=metric)
    tokens = layer.prepare_tokens(x)
    n_pad = tokens.search.shape[1] - tokens.query_positions.numel()
    pruned = layer._without_surplus_padding(tokens, K)
    if n_pad > K:
        assert pruned.numel() == tokens.query_positions.numel() + K
    else:
        assert pruned is None

    def step() -> list[torch.Tensor]:
        inp = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(inp)
        out.nan_to_num(0.0).sum().backward()
        return [out, inp.grad, *(p.grad for p in layer.parameters())]

    got = step()
    monkeypatch.setattr(layer, "_without_surplus_padding", lambda tokens, count: None)
    full = step()
    for a, b in zip(got, full, strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_autocast_bf16_backward_gives_float32_gradients() -> None:
    """Catches the recomputed projections' gradients leaving the op in bf16 (the parameters'
    and the input's gradients must have their dtype) or going non-finite."""
    torch.manual_seed(18)
    layer = Conv2dNNAttention(4, 4, K=3, padding=1, num_heads=2)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    for name, p in [("input", x), *layer.named_parameters()]:
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradients_reach_all_parameters_and_dropout_applies() -> None:
    torch.manual_seed(9)
    layer = Conv2dNNAttention(4, 4, K=3, attention_dropout=0.5, convolution_type="standard")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


# ---------------------------------------------------------------- shapes / modes
def test_one_instance_many_sizes() -> None:
    torch.manual_seed(10)
    layer2d = Conv2dNNAttention(4, 5, K=4, magnitude_type="euclidean", num_heads=2)
    for b, hh, ww in [(1, 2, 2), (3, 3, 5), (2, 6, 4)]:
        x = torch.randn(b, 4, hh, ww)
        out = layer2d(x)
        assert out.shape == (b, 5, hh, ww)
        torch.testing.assert_close(_tok2d(out), dense_reference(layer2d, _tok2d(x)))
    mixer = ConvNNAttention(8, K=2, num_heads=4)
    for b, n in [(1, 2), (4, 17), (2, 65)]:
        x = torch.randn(b, n, 8)
        torch.testing.assert_close(mixer(x), dense_reference(mixer, x))


def test_padding_shuffle_and_coordinates_run() -> None:
    torch.manual_seed(11)
    x = torch.randn(2, 4, 4, 6)
    for kwargs in (
        {"padding": 1},
        {"shuffle_pattern": "BA", "shuffle_scale": 2},
        {"coordinate_encoding": True},
        {"similarity_type": "Loc_Col", "aggregation_type": "Loc_Col"},
        {"similarity_type": "Loc", "magnitude_type": "euclidean"},
        {"sampling_type": "spatial", "num_samples": 3, "padding": 1},
    ):
        layer = Conv2dNNAttention(4, 8, K=4, num_heads=2, **kwargs)
        out = layer(x)
        assert out.shape == (2, 8, 4, 6), kwargs
        out.sum().backward()
    layer1d = Conv1dNNAttention(4, 6, K=3, padding=2, shuffle_pattern="BA", shuffle_scale=2)
    assert layer1d(torch.randn(2, 4, 8)).shape == (2, 6, 8)


def test_deterministic_mode() -> None:
    torch.manual_seed(12)
    layer = Conv2dNNAttention(4, 4, K=3, convolution_type="depthwise-separable", num_heads=2)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            x.grad = None
            out = layer(x)
            out.square().sum().backward()
            grads.append((out.detach(), x.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_autocast_bf16_runs() -> None:
    layer = Conv2dNNAttention(4, 4, K=3)
    x = torch.randn(1, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out.float()).all()


def test_to_dtype() -> None:
    layer = Conv1dNNAttention(4, 4, K=2, convolution_type="depthwise-separable").double()
    assert layer(torch.randn(1, 4, 5, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_heads": 3}, "num_heads"),
        ({"num_heads": 0}, "num_heads"),
        ({"convolution_type": "grouped"}, "convolution_type"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"attention_dropout": -0.1}, "attention_dropout"),
        ({"softmax_topk_val": "yes"}, "softmax_topk_val"),
        ({"coordinate_encoding": 1}, "coordinate_encoding"),
        ({"K": 0}, "K"),
        ({"magnitude_type": "manhattan"}, "magnitude_type"),
    ],
)
def test_invalid_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Conv2dNNAttention(4, 4, **kwargs)


def test_error_messages_name_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"convolution_type.*'grouped'.*depthwise-separable"):
        Conv1dNNAttention(4, 4, convolution_type="grouped")
    with pytest.raises(ValueError, match=r"num_heads=3.*4"):
        Conv1dNNAttention(4, 4, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        ConvNNAttention(10, num_heads=4)


def test_k_larger_than_tokens_is_an_error() -> None:
    layer = ConvNNAttention(4, K=9)
    with pytest.raises(ValueError, match="K"):
        layer(torch.randn(1, 5, 4))


# --------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    torch.manual_seed(13)
    layer = Conv2dNNAttention(4, 4, K=3, num_heads=2, convolution_type="standard")
    compiled = torch.compile(layer)
    for shape in [(2, 4, 4, 4), (1, 4, 3, 5)]:
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
