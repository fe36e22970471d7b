"""Conv1dNN / Conv2dNN against the dense reference, the 3×3-conv identity, and the layer contract
(self at slot 0, sampling, no per-call state, determinism, gradients, compile, errors)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnn import Conv1d_NN, Conv1dNN, Conv2d_NN, Conv2dNN, ConvNNBase, TokenMap
from convnn.functional import knn_search
from tests.convnn.reference import reference_forward

METRICS = ("cosine", "euclidean", "matmul")
SEARCH_VALUES = [
    ("Col", "Col"),
    ("Col", "Loc_Col"),
    ("Loc_Col", "Col"),
    ("Loc_Col", "Loc_Col"),
    ("Loc", "Col"),
    ("Loc", "Loc_Col"),
]


def _unshuffled_shape(layer, x: torch.Tensor) -> tuple[int, ...]:
    s = layer.shuffle_scale if layer.shuffle_pattern in ("B", "BA") else 1
    return tuple(n // s for n in x.shape[2:])


def _assert_matches_reference(layer, x: torch.Tensor) -> None:
    """Eval mode: the candidate draw is deterministic, so the reference can repeat it."""
    layer.eval()
    cand = layer.sampler.candidates(_unshuffled_shape(layer, x), layer.padding, training=False)
    torch.testing.assert_close(layer(x), reference_forward(layer, x, cand))


# ------------------------------------------------------------------------ reference equality
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize(("similarity", "aggregation"), SEARCH_VALUES)
def test_conv2d_matches_reference(metric, padding, similarity, aggregation) -> None:
    torch.manual_seed(0)
    layer = Conv2dNN(
        3,
        4,
        K=6,
        magnitude_type=metric,
        padding=padding,
        similarity_type=similarity,
        aggregation_type=aggregation,
        lambda_param=0.3,
    ).double()
    _assert_matches_reference(layer, torch.randn(2, 3, 5, 7, dtype=torch.float64))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize(("similarity", "aggregation"), SEARCH_VALUES)
def test_conv1d_matches_reference(metric, padding, similarity, aggregation) -> None:
    torch.manual_seed(1)
    layer = Conv1dNN(
        3,
        5,
        K=4,
        magnitude_type=metric,
        padding=padding,
        similarity_type=similarity,
        aggregation_type=aggregation,
    ).double()
    _assert_matches_reference(layer, torch.randn(2, 3, 11, dtype=torch.float64))


@pytest.mark.parametrize("pattern", ["NA", "B", "A", "BA"])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("dims", [1, 2])
def test_shuffle_patterns_match_reference(pattern: str, padding: int, dims: int) -> None:
    torch.manual_seed(2)
    cls = Conv1dNN if dims == 1 else Conv2dNN
    layer = cls(
        2,
        3,
        K=3,
        padding=padding,
        shuffle_pattern=pattern,
        shuffle_scale=2,
        aggregation_type="Loc_Col",
    ).double()
    shape = (8,) if dims == 1 else (4, 6)
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    _assert_matches_reference(layer, x)
    scale = {"NA": 1, "B": 0.5, "A": 2, "BA": 1}[pattern]
    assert layer(x).shape == (2, 3, *[int(n * scale) for n in shape])
    s = 2**dims
    assert layer.weight.shape[0] == (3 * s if pattern in ("A", "BA") else 3)
    assert layer.weight.shape[1] == (2 * s if pattern in ("B", "BA") else 2) + dims


@pytest.mark.parametrize("sampling", ["random", "spatial"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("padding", [0, 2])
def test_sampled_candidates_match_reference(sampling: str, metric: str, padding: int) -> None:
    torch.manual_seed(3)
    layer = Conv2dNN(
        3,
        4,
        K=4,
        sampling_type=sampling,
        num_samples=3,
        sample_padding=1 if sampling == "spatial" else 0,
        magnitude_type=metric,
        padding=padding,
        similarity_type="Loc_Col",
    ).double()
    _assert_matches_reference(layer, torch.randn(2, 3, 6, 9, dtype=torch.float64))
    layer1d = Conv1dNN(3, 4, K=3, sampling_type=sampling, num_samples=4, padding=padding).double()
    _assert_matches_reference(layer1d, torch.randn(2, 3, 13, dtype=torch.float64))


def test_random_training_matches_reference_with_same_draw() -> None:
    torch.manual_seed(4)
    layer = Conv2dNN(3, 4, K=5, sampling_type="random", num_samples=7, padding=1).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    cand = layer.sampler.candidates((5, 6), 1, training=True)
    torch.testing.assert_close(y, reference_forward(layer, x, cand))


@pytest.mark.parametrize("dims", [1, 2])
def test_k_equal_one_and_k_equal_n(dims: int) -> None:
    torch.manual_seed(5)
    cls = Conv1dNN if dims == 1 else Conv2dNN
    shape = (7,) if dims == 1 else (3, 4)
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    n_padded = 9 if dims == 1 else 5 * 6
    for K in (1, n_padded):
        for metric in METRICS:
            layer = cls(3, 2, K=K, padding=1, magnitude_type=metric).double()
            _assert_matches_reference(layer, x)
    # K = 1 is a pointwise (1×1) convolution of each token with itself
    layer = cls(3, 2, K=1).double()
    conv = F.conv1d(x.flatten(2), layer.weight, layer.bias).view(2, 2, *shape)
    torch.testing.assert_close(layer(x), conv)


def test_square_map_matches_reference() -> None:
    torch.manual_seed(6)
    layer = Conv2dNN(4, 4, K=9, padding=1, magnitude_type="cosine").double()
    _assert_matches_reference(layer, torch.randn(3, 4, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "matmul"])
@pytest.mark.parametrize(
    ("dims", "size", "padding", "K"),
    [(2, 32, 1, 9), (2, 5, 1, 12), (2, 6, 2, 20), (2, 2, 1, 9), (1, 7, 2, 4), (1, 12, 1, 9)],
)
def test_surplus_padding_is_never_searched_and_changes_nothing(metric, dims, size, padding, K):
    """The hard layers search the real tokens and only the K-1 first padding tokens. Integer
    features with many all-zero tokens tie with the padding (score 0) and NaN pixels tie
    everywhere, so the selection must still equal a search over every token."""
    torch.manual_seed(23)
    shape = (2, 3) + (size,) * dims
    x = torch.randint(-1, 2, shape).float() * (torch.rand(shape) < 0.6)
    x.view(-1)[5] = float("nan")
    layer = (Conv2dNN if dims == 2 else Conv1dNN)(3, 4, K=K, padding=padding, magnitude_type=metric)
    tokens = layer.prepare_tokens(x)
    got = layer.select_neighbors(tokens)
    full = knn_search(
        tokens.search
        if tokens.search.shape[1] == tokens.query_positions.numel()
        else tokens.search.index_select(1, tokens.query_positions),
        tokens.search,
        K,
        metric,
        query_positions=tokens.query_positions,
    )
    assert torch.equal(got, full)
    pruned = layer._without_surplus_padding(tokens)
    n_pad = tokens.search.shape[1] - tokens.query_positions.numel()
    if n_pad > K - 1:
        assert pruned.numel() == tokens.query_positions.numel() + K - 1
        pads = sorted(set(range(tokens.search.shape[1])) - set(tokens.query_positions.tolist()))
        assert sorted(pruned.tolist()) == sorted(tokens.query_positions.tolist() + pads[: K - 1])
    else:
        assert pruned is None


def test_single_channel_cosine_massive_ties_match_reference() -> None:
    torch.manual_seed(7)
    layer = Conv2dNN(1, 3, K=9, padding=1).double()
    x = torch.randn(2, 1, 6, 5, dtype=torch.float64)
    _assert_matches_reference(layer, x)
    assert torch.equal(layer(x), layer(x))


# --------------------------------------------------------------------- 3×3 conv identity
@pytest.mark.parametrize("size", [5, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loc_euclidean_all_k9_pad1_equals_conv3x3(size: int, dtype: torch.dtype) -> None:
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(dtype)
    layer = Conv2dNN(3, 5, K=9, padding=1, magnitude_type="euclidean", similarity_type="Loc").to(
        dtype
    )
    with torch.no_grad():
        layer.weight.copy_(conv.weight.reshape(5, 3, 9))
        layer.bias.copy_(conv.bias)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    tol = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(layer(x), conv(x), **tol)


# ------------------------------------------------------------------- selection properties
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"padding": 2},
        {"sampling_type": "random", "num_samples": 6, "padding": 1},
        {"sampling_type": "spatial", "num_samples": 3, "padding": 1},
        {"similarity_type": "Loc_Col"},
    ],
)
def test_self_is_slot_zero(kwargs: dict) -> None:
    torch.manual_seed(9)
    layer = Conv2dNN(3, 4, K=5, **kwargs)
    tokens = layer.prepare_tokens(torch.randn(2, 3, 5, 6))
    idx = layer.select_neighbors(tokens)
    assert torch.equal(idx[..., 0], tokens.query_positions.expand(2, -1))
    assert (idx[..., 1:] != idx[..., :1]).all()


def test_loc_indices_are_raster_sorted() -> None:
    layer = Conv2dNN(3, 4, K=9, padding=1, similarity_type="Loc", magnitude_type="euclidean")
    tokens = layer.prepare_tokens(torch.randn(1, 3, 4, 4))
    idx = layer.select_neighbors(tokens)
    assert torch.equal(idx, idx.sort(-1).values)
    # the (0, 0) output pixel sits at (1, 1) of the 6×6 padded map: its 3×3 neighbourhood
    assert idx[0, 0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]


def test_random_draws_differ_in_training_and_repeat_in_eval() -> None:
    torch.manual_seed(10)
    layer = Conv2dNN(3, 4, K=3, sampling_type="random", num_samples=4)
    x = torch.randn(2, 3, 6, 6)
    outs = [layer(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    fresh = Conv2dNN(3, 4, K=3, sampling_type="random", num_samples=4, eval_sampling="random")
    fresh.load_state_dict(layer.state_dict())
    fresh.eval()
    evals = [fresh(x) for _ in range(3)]
    assert not torch.equal(evals[0], evals[1]) or not torch.equal(evals[1], evals[2])


# -------------------------------------------------------------------------- layer contract
def test_one_instance_any_batch_and_spatial_size() -> None:
    layer = Conv2dNN(3, 4, K=5, padding=1, similarity_type="Loc_Col", aggregation_type="Loc_Col")
    for shape in [(1, 3, 5, 7), (4, 3, 8, 8), (2, 3, 6, 3), (3, 3, 3, 3)]:
        assert layer(torch.randn(shape)).shape == (shape[0], 4, *shape[2:])
    layer1d = Conv1dNN(3, 4, K=3, sampling_type="spatial", num_samples=3)
    for shape in [(1, 3, 5), (5, 3, 17), (2, 3, 3)]:
        assert layer1d(torch.randn(shape)).shape == (shape[0], 4, shape[2])
    assert not any(k.startswith("_cache") for k in vars(layer))


def test_deterministic_algorithms_forward_backward() -> None:
    torch.manual_seed(11)
    layer = Conv2dNN(3, 4, K=5, padding=1, sampling_type="random", num_samples=8)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            x.grad = None
            torch.manual_seed(0)
            layer(x).square().sum().backward()
            grads.append(x.grad.clone())
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    ("cls", "shape", "kwargs"),
    [
        (Conv2dNN, (2, 2, 3, 4), {"K": 4, "padding": 1}),
        (Conv2dNN, (1, 2, 4, 4), {"K": 3, "shuffle_pattern": "BA", "shuffle_scale": 2}),
        (
            Conv2dNN,
            (1, 2, 3, 3),
            {"K": 3, "similarity_type": "Loc_Col", "aggregation_type": "Loc_Col"},
        ),
        (Conv1dNN, (2, 2, 6), {"K": 3, "padding": 2, "magnitude_type": "euclidean"}),
        (Conv1dNN, (1, 2, 6), {"K": 2, "sampling_type": "spatial", "num_samples": 3}),
    ],
)
def test_gradcheck_float64(cls, shape, kwargs) -> None:
    torch.manual_seed(12)
    layer = cls(2, 3, **kwargs).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


def test_follows_to_dtype_and_loads_conv1d_weights() -> None:
    layer = Conv2dNN(3, 4, K=5).to(torch.float64)
    assert layer.weight.dtype == torch.float64
    assert layer(torch.randn(1, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64
    original = nn.Conv1d(3, 4, kernel_size=5, stride=5)
    layer = Conv2dNN(3, 4, K=5)
    layer.load_state_dict(original.state_dict())
    assert torch.equal(layer.weight, original.weight)
    assert dict(layer.named_parameters()).keys() == {"weight", "bias"}


def test_aliases_and_repr() -> None:
    assert Conv2d_NN is Conv2dNN and Conv1d_NN is Conv1dNN
    text = repr(Conv2dNN(3, 8, K=4, sampling_type="random", num_samples=9, padding=1))
    for part in ("3, 8, K=4", "sampling_type='random'", "num_samples=9", "padding=1"):
        assert part in text


def test_aliases_for_magnitude_accepted() -> None:
    assert Conv2dNN(3, 4, magnitude_type="similarity").magnitude_type == "cosine"
    assert Conv2dNN(3, 4, magnitude_type="distance").magnitude_type == "euclidean"


def test_layer_factory_builds_and_runs() -> None:
    from models.layer_factory import LayerFactory

    sampling = {"sampling_type": "random", "num_samples": 8}
    factory = LayerFactory("convnn", sampling=sampling, padding=1)
    layer = factory.conv2d(3, 6)
    assert isinstance(layer, Conv2dNN) and layer(torch.randn(2, 3, 5, 5)).shape == (2, 6, 5, 5)


@pytest.mark.slow
def test_torch_compile_smoke() -> None:
    torch.manual_seed(13)
    layer = Conv2dNN(3, 4, K=5, padding=1, similarity_type="Loc_Col", aggregation_type="Loc_Col")
    compiled = torch.compile(layer)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x))
    assert compiled(torch.randn(3, 3, 5, 7)).shape == (3, 4, 5, 7)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0}, r"in_channels=0 must be an integer >= 1"),
        ({"out_channels": 2.0}, r"out_channels=2.0"),
        ({"K": 0}, r"K=0 must be an integer >= 1"),
        ({"K": 12, "sampling_type": "random", "num_samples": 10}, r"K=12 .*1 <= K <= 11"),
        ({"K": 5, "sampling_type": "spatial", "num_samples": 1}, r"K=5 .*\(1 candidates\)"),
        ({"sampling_type": "random", "num_samples": 0}, r"num_samples=0"),
        ({"sampling_type": "spatial", "num_samples": 0}, r"num_samples=0"),
        ({"sampling_type": "nearest"}, r"sampling_type='nearest'.*all"),
        ({"sample_padding": -2}, r"sample_padding=-2"),
        ({"eval_sampling": "once"}, r"eval_sampling='once'"),
        ({"magnitude_type": "l2"}, r"magnitude_type='l2'.*cosine"),
        ({"padding": -1}, r"padding=-1 must be an integer >= 0"),
        ({"shuffle_pattern": "AB"}, r"shuffle_pattern='AB'.*NA"),
        ({"shuffle_scale": 0}, r"shuffle_scale=0 must be an integer >= 1"),
        ({"shuffle_scale": 1.5}, r"shuffle_scale=1.5"),
        ({"similarity_type": "Color"}, r"similarity_type='Color'.*Loc_Col"),
        ({"aggregation_type": "Loc"}, r"aggregation_type='Loc'.*Col"),
        ({"lambda_param": 1.5}, r"lambda_param=1.5 must be a number in \[0, 1\]"),
        ({"lambda_param": -0.1}, r"lambda_param=-0.1"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    args = {"in_channels": 3, "out_channels": 4, **kwargs}
    for cls in (Conv1dNN, Conv2dNN):
        with pytest.raises(ValueError, match=match):
            cls(**args)


def test_call_errors_name_shapes() -> None:
    layer = Conv2dNN(3, 4, K=9)
    with pytest.raises(ValueError, match=r"K=9 .*spatial shape \(2, 4\).*8 tokens"):
        layer(torch.randn(1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"expects input \(B, C, H, W\) with C=3, got shape"):
        layer(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"expects input \(B, C, T\)"):
        Conv1dNN(3, 4)(torch.randn(1, 3, 5, 5))
    shuffled = Conv2dNN(3, 4, K=3, shuffle_pattern="BA", shuffle_scale=2)
    with pytest.raises(
        ValueError, match=r"spatial shape \(5, 6\) is not divisible by shuffle_scale=2"
    ):
        shuffled(torch.randn(1, 3, 5, 6))
    with pytest.raises(ValueError, match=r"spatial shape \(7,\) is not divisible"):
        Conv1dNN(3, 4, K=2, shuffle_pattern="B", shuffle_scale=2)(torch.randn(1, 3, 7))
    spatial = Conv2dNN(3, 4, K=2, sampling_type="spatial", num_samples=2, sample_padding=3)
    with pytest.raises(ValueError, match=r"sample_padding=3 .*spatial shape \(5, 6\)"):
        spatial(torch.randn(1, 3, 5, 6))


def test_all_options_grid_runs() -> None:
    """A coarse sweep over options that the reference tests do not combine."""
    x = torch.randn(2, 4, 4, 8)
    for sampling, pattern in itertools.product(["all", "random", "spatial"], ["NA", "BA"]):
        layer = Conv2dNN(
            4,
            6,
            K=3,
            sampling_type=sampling,
            num_samples=-1 if sampling == "all" else 2,
            shuffle_pattern=pattern,
            shuffle_scale=2,
            padding=1,
            similarity_type="Loc_Col",
            aggregation_type="Loc_Col",
        )
        assert layer(x).shape == (2, 6, 4, 8)


def test_tiny_memory_budget_gives_identical_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    import convnn.functional as cf

    torch.manual_seed(14)
    layer = Conv2dNN(3, 4, K=7, padding=1, similarity_type="Loc_Col")
    x = torch.randn(3, 3, 6, 7, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    monkeypatch.setattr(cf, "MEMORY_BUDGET", 1)  # one query per work block
    y_small = layer(x)
    (gx_small,) = torch.autograd.grad(y_small.square().sum(), x)
    torch.testing.assert_close(y_small, y)
    torch.testing.assert_close(gx_small, gx)


def test_base_extension_point_replaces_only_mix() -> None:
    """A subclass implementing ``mix`` inherits padding, coordinates, sampling and shuffles."""

    class MeanOfNeighbours(ConvNNBase):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.proj = nn.Linear(self.value_channels, self.mix_out_channels)

        def mix(self, tokens: TokenMap) -> torch.Tensor:
            idx = self.select_neighbors(tokens)
            b, nq, k = idx.shape
            flat = tokens.values.gather(
                1, idx.reshape(b, nq * k, 1).expand(-1, -1, tokens.values.shape[-1])
            )
            return self.proj(flat.view(b, nq, k, -1).mean(2))

    layer = MeanOfNeighbours(
        3, 4, K=5, padding=1, shuffle_pattern="BA", shuffle_scale=2, aggregation_type="Loc_Col"
    )
    assert (layer.token_channels, layer.value_channels, layer.mix_out_channels) == (12, 14, 16)
    assert layer(torch.randn(2, 3, 6, 8)).shape == (2, 4, 6, 8)
    with pytest.raises(NotImplementedError, match="must implement mix"):
        ConvNNBase(3, 4)(torch.randn(1, 3, 4, 4))


def test_bf16_autocast_forward_backward() -> None:
    torch.manual_seed(15)
    layer = Conv2dNN(3, 4, K=5, padding=1, similarity_type="Loc_Col", aggregation_type="Loc_Col")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad is not None
    # the search runs in float32: bf16 features pick the neighbours float32 would pick for them
    col = Conv2dNN(3, 4, K=5, padding=1)
    xb = torch.randn(2, 3, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = col.select_neighbors(col.prepare_tokens(xb))
    assert torch.equal(idx, col.select_neighbors(col.prepare_tokens(xb.float())))
