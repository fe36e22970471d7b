"""GPU readiness: no host syncs, per-device work blocks, dtype checks, NaN handling, compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import convnn.functional as cf
from convnn import (
    Branching,
    CKConv2d,
    Conv1dNN,
    Conv1dNNAttention,
    Conv1dNNMixer,
    Conv2dNN,
    Conv2dNNAttention,
    ConvNNAttention,
    FlexConv2d,
    KNNAttention,
)
from convnn.functional import attend_neighbors, knn_search, selected_scores
from convnn.mixers import SparseAttention

# Profiler events that wait for a tensor value on the host (a stream drain on a GPU).
SYNC_EVENTS = frozenset(
    {
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::equal",
    }
)
SAMPLING = {
    "all": {"sampling_type": "all"},
    "random": {"sampling_type": "random", "num_samples": 10},
    "spatial": {"sampling_type": "spatial", "num_samples": 3},
}
SAMPLING_1D = {
    "all": {"sampling_type": "all"},
    "random": {"sampling_type": "random", "num_samples": 10},
    "spatial": {"sampling_type": "spatial", "num_samples": 6},
}
METRICS = ("cosine", "euclidean", "matmul")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops in many blocks: intra-op threads only add wake-up latency on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv(i: int, o: int) -> nn.Module:
    return nn.Conv2d(i, o, 3, padding=1)


def _case(name: str, sampling: str, metric: str) -> tuple[nn.Module, torch.Tensor]:
    """(module, input) of one layer kind with one sampling and metric, tiny shapes."""
    kw2 = {**SAMPLING[sampling], "magnitude_type": metric, "K": 4, "padding": 1}
    kw1 = {**SAMPLING_1D[sampling], "magnitude_type": metric, "K": 4}
    img, seq, tok = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 16), torch.randn(2, 16, 4)
    if name == "Conv1dNN":
        return Conv1dNN(4, 4, **kw1), seq
    if name == "Conv2dNN":
        return Conv2dNN(4, 4, **kw2), img
    if name == "Conv1dNNAttention":
        return Conv1dNNAttention(4, 4, num_heads=2, attention_dropout=0.1, **kw1), seq
    if name == "Conv2dNNAttention":
        return Conv2dNNAttention(4, 4, convolution_type="standard", **kw2), img
    if name == "ConvNNAttention":
        return ConvNNAttention(4, convolution_type="depthwise-separable", **kw1), tok
    if name == "Conv1dNNMixer":
        return Conv1dNNMixer(4, **kw1), tok
    if name == "Branching":
        return Branching(4, 6, lambda i, o: Conv2dNN(i, o, **kw2), _conv), img
    raise AssertionError(name)


LAYERS = (
    "Conv1dNN",
    "Conv2dNN",
    "Conv1dNNAttention",
    "Conv2dNNAttention",
    "ConvNNAttention",
    "Conv1dNNMixer",
    "Branching",
)
CASES = [(n, s, m) for n in LAYERS for s in SAMPLING for m in METRICS]


def _one_sample(x: torch.Tensor, sampling: str = "all") -> int:
    """Budget of one sample's search scores: one search block per sample (and head)."""
    queries = x.shape[-1] ** 2 if x.dim() == 4 else max(x.shape[1:])
    tokens = (x.shape[-1] + 2) ** 2 if x.dim() == 4 else queries
    candidates = {"all": tokens, "random": 10, "spatial": 9 if x.dim() == 4 else 6}[sampling]
    per_query = cf._search_bytes_per_query(candidates, 3)
    return queries * per_query


def _profile_step(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Event counts of one forward + backward."""
    x = x.clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x).square().sum().backward()
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


# ------------------------------------------------------------------------- host syncs
@pytest.mark.parametrize(("name", "sampling", "metric"), CASES)
def test_forward_backward_has_no_host_sync(
    monkeypatch: pytest.MonkeyPatch, name: str, sampling: str, metric: str
) -> None:
    torch.manual_seed(0)
    module, x = _case(name, sampling, metric)
    module.train()
    module(x)  # lazy set-up outside the profile
    monkeypatch.setattr(cf, "MEMORY_BUDGET", _one_sample(x, sampling))
    counts = _profile_step(module, x)
    syncs = {k: v for k, v in counts.items() if k in SYNC_EVENTS}
    assert syncs == {}, syncs
    assert counts.get("aten::topk", 0) >= 2  # the budget really split the search into blocks


def test_knn_attention_has_no_host_sync_and_no_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module, x = (
        KNNAttention(8, num_heads=2, attention_dropout=0.1, K=3).train(),
        torch.randn(2, 20, 8),
    )
    monkeypatch.setattr(cf, "MEMORY_BUDGET", _one_sample(x))
    counts = _profile_step(module, x)
    assert {k: v for k, v in counts.items() if k in SYNC_EVENTS} == {}
    assert counts.get("aten::topk", 0) >= 4  # B · heads search blocks
    assert "aten::scaled_dot_product_attention" not in counts  # no (N, N) masked attention


@pytest.mark.parametrize("stride", [3, 20])
def test_sparse_attention_has_no_host_sync(stride: int) -> None:
    module = SparseAttention(8, num_heads=2, pattern="strided", stride=stride)  # sparse / dense
    assert _profile_step(module, torch.randn(2, 20, 8)).keys().isdisjoint(SYNC_EVENTS)


def test_sync_check_detects_a_host_read() -> None:
    """The profiler method sees `bool(tensor)`, the pattern that used to guard the tie repair."""

    class Syncing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if bool((x > 0).any()) else x

    counts = _profile_step(Syncing(), torch.randn(3))
    assert SYNC_EVENTS & set(counts)


@pytest.mark.parametrize("name", LAYERS)
def test_blocked_equals_dense_under_tiny_and_huge_budgets(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    torch.manual_seed(1)
    module, x = _case(name, "all", "cosine")
    module.eval()
    x = x.requires_grad_(True)
    results = []
    for budget in (1, 2**40):
        monkeypatch.setattr(cf, "MEMORY_BUDGET", budget)
        y = module(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        results.append((y, gx))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- work blocks
def test_budget_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cf, "MEMORY_BUDGET", None)
    monkeypatch.delenv(cf.MEMORY_BUDGET_ENV, raising=False)
    assert cf.resolve_memory_budget("cpu") == cf.CPU_MEMORY_BUDGET
    monkeypatch.setenv(cf.MEMORY_BUDGET_ENV, "12345")
    assert cf.resolve_memory_budget("cpu") == 12345
    monkeypatch.setattr(cf, "MEMORY_BUDGET", 777)
    assert cf.resolve_memory_budget("cpu") == 777
    assert cf.resolve_memory_budget("cpu", 99) == 99
    monkeypatch.setattr(cf, "MEMORY_BUDGET", None)
    monkeypatch.setenv(cf.MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="CONVNN_MEMORY_BUDGET='lots'"):
        cf.resolve_memory_budget("cpu")


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, free: int, reserved: int, allocated: int) -> list:
    calls: list[int] = []

    def mem_get_info(device=None):
        calls.append(1)
        return free, 140 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    monkeypatch.setattr(cf, "MEMORY_BUDGET", None)
    monkeypatch.delenv(cf.MEMORY_BUDGET_ENV, raising=False)
    return calls


def test_cuda_budget_is_a_fraction_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_cuda(monkeypatch, free=60 * 2**30, reserved=10 * 2**30, allocated=6 * 2**30)
    budget = cf.resolve_memory_budget(torch.device("cuda", 0))
    assert budget == int(64 * 2**30 * cf.CUDA_MEMORY_FRACTION)  # driver-free + cached reserve
    assert calls == [1]
    # an almost full device never gets less than the CPU budget
    _fake_cuda(monkeypatch, free=2**20, reserved=0, allocated=0)
    assert cf.resolve_memory_budget("cuda") == cf.CPU_MEMORY_BUDGET


def test_cifar_layer_on_cuda_runs_in_one_or_two_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """B=128 32×32 C64 K9: 64 search blocks on the CPU budget, ≤ 2 with a 24 GiB GPU's budget."""
    b, n, k, c = 128, 34 * 34, 9, 64
    search = cf._search_bytes_per_query(n, k - 1)
    cpu = cf._chunks(b, 1024, search, cf.CPU_MEMORY_BUDGET)
    _fake_cuda(monkeypatch, free=20 * 2**30, reserved=0, allocated=0)
    gpu_budget = cf.resolve_memory_budget("cuda")
    assert len(cpu) > 16
    assert len(cf._chunks(b, 1024, search, gpu_budget)) <= 2
    assert len(cf._agg_chunks(b, 1024, k, c, c, 4, gpu_budget)) == 1


def test_chunks_cover_every_query_exactly_once() -> None:
    for batch, nq, per_query, budget in [
        (5, 7, 3, 1),
        (5, 7, 3, 22),
        (5, 7, 3, 50),
        (3, 4, 8, 10**6),
    ]:
        blocks = cf._chunks(batch, nq, per_query, budget)
        seen = torch.zeros(batch, nq, dtype=torch.int64)
        for b0, b1, q0, q1 in blocks:
            seen[b0:b1, q0:q1] += 1
            assert (b1 - b0) * (q1 - q0) * per_query <= max(budget, per_query)
        assert bool((seen == 1).all())


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize(
    "make",
    [
        lambda: (Conv2dNN(3, 4, K=3), (2, 3, 5, 5)),
        lambda: (Conv1dNNAttention(3, 3, K=3), (2, 3, 7)),
        lambda: (Conv1dNNMixer(4, K=3), (2, 7, 4)),
        lambda: (KNNAttention(4, K=3), (2, 7, 4)),
    ],
    ids=["Conv2dNN", "Conv1dNNAttention", "Conv1dNNMixer", "KNNAttention"],
)
def test_non_floating_input_is_a_type_error(make, dtype: torch.dtype) -> None:
    module, shape = make()
    x = torch.ones(shape, dtype=dtype)
    with pytest.raises(TypeError, match=rf"floating-point input, got dtype {dtype}"):
        module(x)


def test_scores_float32_under_bf16_autocast() -> None:
    torch.manual_seed(2)
    q = torch.randn(1, 6, 5)
    idx = knn_search(q, q, 3, "cosine")
    w = torch.ones(1, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend_neighbors(
            q.bfloat16(), q.bfloat16(), q, idx, "cosine", weight=w, mode="depthwise"
        )
        assert knn_search(q.bfloat16(), q.bfloat16(), 3, "cosine").dtype == torch.long
    ref = attend_neighbors(
        q.bfloat16().float(), q.bfloat16().float(), q, idx, "cosine", weight=w, mode="depthwise"
    )
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("metric", METRICS)
def test_nan_key_is_never_selected_ahead_of_finite(metric: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 9, 3)
    x[0, 2] = math.nan
    for budget in (1, 2**40):
        idx = knn_search(x, x, 5, metric, memory_budget=budget)
        finite_rows = [i for i in range(9) if i != 2]
        assert not bool((idx[0, finite_rows, 1:] == 2).any())  # 7 finite others fill K - 1 = 4
        # the NaN query's own row is deterministic: lowest-index others (all scores are NaN)
        assert idx[0, 2].tolist() == [2, 0, 1, 3, 4]
        plain = knn_search(x, x, 9, metric, include_self=False, memory_budget=budget)
        assert plain[0, 0, -1].item() == 2 and plain[0, 2].tolist() == list(range(9))


def test_nan_pixel_poisons_only_its_own_image() -> None:
    torch.manual_seed(4)
    layer = Conv2dNN(3, 4, K=4, padding=1)
    x = torch.randn(2, 3, 5, 5)
    x[0, 1, 2, 2] = math.nan
    y = layer(x)
    assert bool(y[0].isnan().any())
    assert bool(y[1].isfinite().all())


# ------------------------------------------------------------------------ fused attend
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["sum", "depthwise", "standard"])
def test_attend_gradcheck_many_blocks(metric: str, mode: str) -> None:
    torch.manual_seed(5)
    bh, heads, n, d, kk = 4, 2, 5, 2, 2
    q = torch.randn(bh, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(bh, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(bh, n, d, dtype=torch.float64, requires_grad=True)
    idx = knn_search(q, k, kk, metric, include_self=False)
    shape = {"sum": None, "depthwise": (heads, kk, d), "standard": (heads, kk * d, 2)}[mode]
    w = None if shape is None else torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([0.0, 2.0], dtype=torch.float64).repeat(bh * n * kk // 2).view(bh, n, kk)

    def fn(q, k, v, *w):
        return attend_neighbors(
            q,
            k,
            v,
            idx,
            metric,
            weight=w[0] if w else None,
            mode=mode,
            heads=heads,
            gate_mask=mask,
            memory_budget=300,
        )

    inputs = (q, k, v) if w is None else (q, k, v, w)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_attend_equals_the_composite_formula(metric: str) -> None:
    """attention_gates(selected_scores) gate a depthwise filter over the gathered values."""
    torch.manual_seed(6)
    q, k, v = torch.randn(3, 2, 7, 4, dtype=torch.float64).unbind(0)
    idx = knn_search(q, k, 4, metric, include_self=False)
    w = torch.randn(1, 4, 4, dtype=torch.float64)
    g = cf.attention_gates(selected_scores(q, k, idx, metric), metric)
    ref = torch.einsum("bnk,bnkc->bnc", g, cf.gather_neighbors(v, idx) * w)
    got = attend_neighbors(q, k, v, idx, metric, weight=w, mode="depthwise", memory_budget=1)
    torch.testing.assert_close(got, ref)


def test_attention_keeps_no_gathered_tensor_for_backward() -> None:
    """Saved activations of a ConvNN-Attention step stay far below one (B, N, K, C) tensor."""
    torch.manual_seed(7)
    layer = Conv2dNNAttention(16, 16, K=9)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    gathered = 2 * 144 * 9 * 16
    assert max(saved) < gathered // 4


# ------------------------------------------------------------------------ torch.compile
def test_compiled_branching_net_never_recompiles_or_breaks() -> None:
    """SimpleNet-like: two Branching(Conv2dNN, Conv2d) blocks, train mode, with backward."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def block(i: int, o: int) -> Branching:
        return Branching(i, o, lambda a, b: Conv2dNN(a, b, K=4, padding=1), _conv)

    torch.manual_seed(8)
    net = nn.Sequential(
        block(3, 8), nn.ReLU(), block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    ).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            x = torch.randn(2, 3, 8, 8)
            out = compiled(x)
            out.square().sum().backward()
            torch.testing.assert_close(out, net(x))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("sampling", "training"), [("random", False), ("random", True), ("spatial", True)]
)
def test_sampled_candidates_compile_without_graph_breaks(sampling: str, training: bool) -> None:
    """eval_sampling='fixed' used to build a torch.Generator per call: two graph breaks; the
    cached spatial grid must not leak into the graph as a Python-side lookup either."""
    import torch._dynamo

    kw = {"sampling_type": sampling, "num_samples": 10 if sampling == "random" else 3}
    layer = Conv2dNN(3, 4, K=4, padding=1, **kw).train(training)
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(layer, backend="eager")
    torch.manual_seed(1)
    got = compiled(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, layer(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("include_self", [True, False])
def test_ties_spanning_many_chunks_match_a_stable_sort(include_self: bool) -> None:
    """Integer features: hundreds of exact ties per row, across several tie-search chunks."""
    torch.manual_seed(9)
    x = torch.randint(-1, 2, (2, 150, 2)).float()
    scores = cf.pairwise_scores(x, x, "euclidean")
    if include_self:
        scores[:, torch.arange(150), torch.arange(150)] = -math.inf
    for K in (2, 9, 40, 100):
        got = knn_search(x, x, K, "euclidean", include_self=include_self, memory_budget=5000)
        order = torch.argsort(-scores, dim=-1, stable=True)
        ref = order[..., : K - 1] if include_self else order[..., :K]
        if include_self:
            ref = torch.cat([torch.arange(150).view(1, 150, 1).expand(2, 150, 1), ref], dim=-1)
        assert torch.equal(got, ref), K


# ------------------------------------------------------------------ continuous kernels (CCNN)
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (CKConv2d, {}),
        (CKConv2d, {"use_fft": True}),
        (FlexConv2d, {"mask_dynamic_cropping": False, "mask_learn_mean": True}),
    ],
)
def test_continuous_layers_have_no_host_sync(cls: type, kwargs: dict) -> None:
    # Catches: reading the kernel-grid size or the Chang-initialised flag back from the device.
    module = cls(4, 4, 7, kernel_no_hidden=8, separable=True, **kwargs)
    x = torch.randn(2, 4, 6, 6)
    module(x)  # first forward: the grid size and Chang initialisation are decided once
    counts = _profile_step(module, x)
    assert {k: v for k, v in counts.items() if k in SYNC_EVENTS} == {}


def test_dynamic_cropping_is_the_one_host_read() -> None:
    # The documented exception: a crop size is a shape, read once per forward for both axes.
    module = FlexConv2d(4, 4, 7, kernel_no_hidden=8, separable=True)
    x = torch.randn(2, 4, 6, 6)
    module(x)
    counts = _profile_step(module, x)
    assert {k: v for k, v in counts.items() if k in SYNC_EVENTS} == {
        "aten::item": 1,
        "aten::_local_scalar_dense": 1,
    }
