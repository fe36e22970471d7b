"""convnn.functional: scores, exact blocked search with deterministic ties, gather, aggregation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import convnn.functional as cf
from convnn.functional import (
    aggregate_neighbors,
    canonical_magnitude,
    coordinate_grid_1d,
    coordinate_grid_2d,
    gather_neighbors,
    knn_search,
    pairwise_scores,
    selected_scores,
)
from tests.convnn.reference import dense_scores

METRICS = ("cosine", "euclidean", "matmul")


def _stable_knn(scores, K, include_self, self_pos=None, candidates=None):
    """Dense reference: sort every row (stable → lower index wins ties)."""
    b, nq, nk = scores.shape
    scores = scores.clone()
    if candidates is not None:
        allowed = torch.zeros(nk, dtype=torch.bool)
        allowed[candidates] = True
        scores[:, :, ~allowed] = -math.inf
    if include_self:
        scores[:, torch.arange(nq), self_pos] = -math.inf
        order = torch.argsort(-scores, dim=-1, stable=True)[..., : K - 1]
        return torch.cat([self_pos.view(1, nq, 1).expand(b, nq, 1), order], dim=-1)
    return torch.argsort(-scores, dim=-1, stable=True)[..., :K]


# ------------------------------------------------------------------------------ magnitude
def test_canonical_magnitude_aliases() -> None:
    assert canonical_magnitude("similarity") == "cosine"
    assert canonical_magnitude("distance") == "euclidean"
    assert canonical_magnitude("dot") == "matmul"
    for m in METRICS:
        assert canonical_magnitude(m) == m


def test_canonical_magnitude_error_names_argument_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"magnitude_type='manhattan'.*cosine.*euclidean"):
        canonical_magnitude("manhattan")


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_scores_match_plain_formula(metric: str) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 7, 4, dtype=torch.float64)
    got = pairwise_scores(q, k, metric)
    assert got.shape == (2, 5, 7)
    torch.testing.assert_close(got, dense_scores(q, k, metric))


def test_pairwise_scores_float32_under_autocast() -> None:
    q = torch.randn(1, 6, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = pairwise_scores(q, q, "cosine")
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, pairwise_scores(q.float(), q.float(), "cosine"))


def test_cosine_of_zero_vector_is_zero_not_nan() -> None:
    x = torch.zeros(1, 3, 2)
    x[0, 1] = torch.tensor([1.0, 0.0])
    assert torch.isfinite(pairwise_scores(x, x, "cosine")).all()


# ---------------------------------------------------------------------------------- search
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("include_self", [True, False])
def test_knn_search_matches_dense_sort(metric: str, include_self: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 20, 5)
    for K in (1, 2, 7, 20):
        got = knn_search(x, x, K, metric, include_self=include_self)
        ref = _stable_knn(pairwise_scores(x, x, metric), K, include_self, torch.arange(20))
        assert torch.equal(got, ref), (metric, K)


def test_self_is_slot_zero_and_never_repeated() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 30, 3)
    idx = knn_search(x, x, 30, "euclidean")
    assert torch.equal(idx[..., 0], torch.arange(30).expand(2, 30))
    assert torch.equal(idx.sort(-1).values, torch.arange(30).expand(2, 30, 30))


def test_query_positions_and_candidates() -> None:
    torch.manual_seed(3)
    keys = torch.randn(2, 25, 4)
    qpos = torch.tensor([3, 7, 8, 12, 24])
    cand = torch.tensor([20, 1, 7, 12, 13, 2, 9])  # unsorted on purpose; contains selfs 7, 12
    got = knn_search(keys[:, qpos], keys, 5, "cosine", candidates=cand, query_positions=qpos)
    scores = pairwise_scores(keys[:, qpos], keys, "cosine")
    assert torch.equal(got, _stable_knn(scores, 5, True, qpos, cand))
    plain = knn_search(keys[:, qpos], keys, 4, "cosine", candidates=cand, include_self=False)
    assert torch.equal(plain, _stable_knn(scores, 4, False, candidates=cand))


@pytest.mark.parametrize("metric", METRICS)
def test_queries_none_are_the_keys_at_the_query_positions(metric: str) -> None:
    """Catches queries=None (taken from the prepared keys) drifting from passing them."""
    torch.manual_seed(3)
    keys = torch.randint(-2, 3, (2, 40, 4)).float()  # ties everywhere
    qpos = torch.tensor([3, 7, 8, 12, 24, 39])
    cand = torch.tensor([20, 1, 7, 12, 13, 2, 9, 30, 31])
    for kwargs in ({}, {"candidates": cand}, {"include_self": False}):
        given = knn_search(keys[:, qpos], keys, 5, metric, query_positions=qpos, **kwargs)
        taken = knn_search(None, keys, 5, metric, query_positions=qpos, **kwargs)
        assert torch.equal(taken, given), kwargs
    with pytest.raises(ValueError, match="query_positions"):
        knn_search(None, keys, 5, metric)


def test_cached_search_plan_follows_in_place_changes_of_the_candidates() -> None:
    """Catches the per-candidate-set bookkeeping cache serving a stale plan after the same
    candidates tensor (or its query positions) is modified in place."""
    torch.manual_seed(6)
    keys = torch.randn(2, 30, 4)
    qpos = torch.arange(0, 30, 2)
    cand = torch.arange(0, 30, 3)
    scores = pairwise_scores(keys[:, qpos], keys, "cosine")
    for _ in range(2):
        got = knn_search(None, keys, 4, "cosine", candidates=cand, query_positions=qpos)
        assert torch.equal(got, _stable_knn(scores, 4, True, qpos, cand))
        cand.add_(1)  # same tensor, new values
    qpos.add_(1)
    scores = pairwise_scores(keys[:, qpos], keys, "cosine")
    got = knn_search(None, keys, 4, "cosine", candidates=cand, query_positions=qpos)
    assert torch.equal(got, _stable_knn(scores, 4, True, qpos, cand))


@pytest.mark.parametrize("metric", METRICS)
def test_reused_search_plan_gives_the_same_neighbours(metric: str) -> None:
    """Catches a reused plan (its -inf columns past the candidates folded into the self
    column's scatter) selecting differently from the first call or a dense search, in one
    block or many, with every query's self among the candidates or not."""
    torch.manual_seed(7)
    keys = torch.randn(2, 320, 4)
    keys[:, 5:40] = 0.0  # ties
    qpos = torch.arange(0, 320, 2)
    scores = pairwise_scores(keys[:, qpos], keys, metric)
    # 160 candidates: one score column per candidate + 1, padded to blocks of 32 for K = 3;
    # 9 candidates: no blocks, one spare column
    for cand, k in ((torch.arange(0, 320, 2), 3), (torch.arange(0, 320, 2) + 1, 3),
                    (torch.arange(3, 30, 3), 4)):  # fmt: skip
        ref = _stable_knn(scores, k, True, qpos, cand)
        for budget in (2**30, 2**30, 3000, 2**30):
            got = knn_search(
                None, keys, k, metric, candidates=cand, query_positions=qpos, memory_budget=budget
            )
            assert torch.equal(got, ref), (cand.numel(), budget)


@pytest.mark.parametrize("metric", METRICS)
def test_blocked_search_identical_to_dense(metric: str) -> None:
    torch.manual_seed(4)
    x = torch.randn(4, 60, 6)
    dense = knn_search(x, x, 9, metric, memory_budget=2**40)
    # budget of a few rows: many query blocks; budget below one row of the batch: batch blocks
    for budget in (60 * 4 * 8 * 3, 1):
        assert torch.equal(knn_search(x, x, 9, metric, memory_budget=budget), dense)
    cand = torch.arange(0, 60, 3)
    dense_c = knn_search(x, x, 5, metric, candidates=cand, memory_budget=2**40)
    assert torch.equal(knn_search(x, x, 5, metric, candidates=cand, memory_budget=1), dense_c)


def test_module_level_memory_budget_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 40, 3)
    dense = knn_search(x, x, 6, "cosine")
    calls = []
    original = cf.search._scores_prepared

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(cf.search, "_scores_prepared", counting)  # where the search looks it up
    per_query = cf._search_bytes_per_query(40, 5)
    monkeypatch.setattr(cf, "MEMORY_BUDGET", 8 * per_query)  # 8 queries per block, 5 per sample
    assert torch.equal(knn_search(x, x, 6, "cosine"), dense)
    assert len(calls) == 10


def test_self_fills_the_gap_when_candidates_run_out() -> None:
    """K - 1 == M is allowed; a query whose self is one of the M candidates has only M - 1
    others, so self also fills the last slot instead of an arbitrary non-candidate."""
    torch.manual_seed(14)
    x = torch.randn(1, 6, 2)
    idx = knn_search(x, x, 3, "euclidean", candidates=torch.tensor([1, 4]))
    assert idx[0, 1].tolist() == [1, 4, 1]
    assert idx[0, 4].tolist() == [4, 1, 4]
    assert sorted(idx[0, 0, 1:].tolist()) == [1, 4]


def test_massive_ties_break_towards_lower_index() -> None:
    """1-channel cosine: every score is exactly ±1, so almost everything ties."""
    torch.manual_seed(6)
    x = torch.randn(3, 50, 1)
    scores = pairwise_scores(x, x, "cosine")
    assert set(scores.unique().tolist()) <= {-1.0, 1.0}
    for K in (1, 5, 26, 50):
        for budget in (1, 2**40):
            for include_self in (True, False):
                got = knn_search(x, x, K, "cosine", include_self=include_self, memory_budget=budget)
                ref = _stable_knn(scores, K, include_self, torch.arange(50))
                assert torch.equal(got, ref), (K, budget, include_self)


def test_integer_scores_ties_everywhere() -> None:
    """Few distinct values: ties inside the top-K and at its boundary, in every row."""
    torch.manual_seed(7)
    x = torch.randint(-2, 3, (2, 40, 2)).float()  # integer distances are exact in float32
    scores = pairwise_scores(x, x, "euclidean")
    for K in (3, 10, 39):
        got = knn_search(x, x, K, "euclidean", include_self=False, memory_budget=512)
        assert torch.equal(got, _stable_knn(scores, K, False))


def _tie_heavy_rows(rows: int, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Few distinct values (ties everywhere), -inf, ±0.0 and the NaN substitute mixed in."""
    s = torch.randint(-3, 4, (rows, m)).to(dtype)
    s[s == 3] = -math.inf
    s[s == 2] = torch.finfo(dtype).min
    s[s == 1] = -0.0  # equals +0.0: must tie with it, not rank below it
    s[s == -1] = 0.0
    return s


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(-scores, dim=-1, stable=True)[..., :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_topk_equals_stable_sort(dtype: torch.dtype) -> None:
    """Every path of the exact top-k (one topk with keys or repair, blocks of 8 or 32 columns,
    ragged widths padded with -inf, nested blocks) against a stable full sort."""
    torch.manual_seed(16)
    widths = (37, 64, 127, 128, 200, 324, 511, 512, 700, 1156, 1184, 2500)
    for m in widths:
        for k in (1, 2, 8, 16):
            scores = _tie_heavy_rows(64, m, dtype)
            ref = _stable_topk(scores, k)
            assert torch.equal(cf._exact_topk(scores.clone(), k), ref), (m, k)
            unordered = cf._exact_topk(scores.clone(), k, ordered=False)
            assert torch.equal(unordered, ref.sort(-1).values), (m, k)
        noise = torch.randn(64, m, dtype=dtype)
        assert torch.equal(cf._exact_topk(noise.clone(), 8), _stable_topk(noise, 8)), m
    assert cf._block_width(1156, 8) == 32 and cf._block_width(324, 8) == 8  # both levels ran
    assert cf._block_width(100, 8) == 1


def test_keyed_and_repaired_topk_agree_on_signed_zeros() -> None:
    """-0.0 == +0.0: the int64 keys must fold them, else -0.0 ranks below +0.0."""
    row = torch.tensor([[-0.0, 0.0, -1.0, -0.0, 0.0]])
    for k in (1, 2, 3, 4):
        assert cf._keyed_topk(row.clone(), k).tolist() == [[0, 1, 3, 4][:k]]
        assert cf._repaired_topk(row.clone(), k).tolist() == [[0, 1, 3, 4][:k]]


@pytest.mark.parametrize("metric", METRICS)
def test_search_on_a_padded_32x32_map_matches_dense_sort(metric: str) -> None:
    """The VGG first layer's search (1024 queries, 34×34 padded candidates, blockwise top-k with
    padded key columns) with integer features, so that ties sit at every boundary; also with
    sampled candidates (exclude mask padded alongside)."""
    torch.manual_seed(17)
    p, side = 1, 32
    x = F.pad(torch.randint(0, 3, (2, 3, side, side)).float(), (p, p, p, p))
    keys = x.flatten(2).transpose(1, 2).contiguous()  # (2, 1156, 3) with zero padding tokens
    grid = torch.arange(side + 2 * p).view(-1, 1) * (side + 2 * p) + torch.arange(side + 2 * p)
    qpos = grid[p : p + side, p : p + side].reshape(-1)
    queries = keys[:, qpos]
    scores = pairwise_scores(queries, keys, metric)
    got = knn_search(queries, keys, 9, metric, query_positions=qpos)
    assert torch.equal(got, _stable_knn(scores, 9, True, qpos))
    cand = torch.randperm(keys.shape[1])[:300]
    got = knn_search(queries, keys, 9, metric, query_positions=qpos, candidates=cand)
    assert torch.equal(got, _stable_knn(scores, 9, True, qpos, cand))


@pytest.mark.parametrize("metric", METRICS)
def test_search_never_returns_the_block_padding_columns(metric: str) -> None:
    """300 keys are searched as 304 columns (whole blocks of 8); the 4 extra zero keys would
    beat every real key here (all real scores are negative), so they must score -inf."""
    torch.manual_seed(18)
    queries = torch.rand(1, 50, 3) + 0.5
    keys = -(torch.rand(1, 300, 3) + 0.5)
    assert cf._search_width(300, 8) == 304
    got = knn_search(queries, keys, 8, metric, include_self=False)
    assert torch.equal(got, _stable_knn(pairwise_scores(queries, keys, metric), 8, False))


def test_constant_features_select_lowest_indices() -> None:
    x = torch.ones(1, 12, 3)
    idx = knn_search(x, x, 4, "euclidean")
    expected = torch.tensor([[i, *[j for j in range(12) if j != i][:3]] for i in range(12)])
    assert torch.equal(idx[0], expected)


def test_knn_search_errors_name_argument() -> None:
    x = torch.randn(1, 5, 2)
    with pytest.raises(ValueError, match=r"K=7 .*valid range: 1 <= K <= 5"):
        knn_search(x, x, 7, "cosine", include_self=False)
    with pytest.raises(ValueError, match=r"K=0"):
        knn_search(x, x, 0, "cosine")
    with pytest.raises(ValueError, match=r"K=4 .*3 are available"):
        knn_search(x, x, 4, "cosine", candidates=torch.tensor([0, 1, 2]), include_self=False)
    with pytest.raises(ValueError, match=r"magnitude_type='l1'"):
        knn_search(x, x, 2, "l1")
    with pytest.raises(ValueError, match=r"query_positions"):
        knn_search(x[:, :3], x, 2, "cosine")
    with pytest.raises(ValueError, match=r"queries must be \(B, N, D\)"):
        knn_search(x[0], x, 2, "cosine")


def test_knn_search_has_no_grad() -> None:
    x = torch.randn(1, 6, 2, requires_grad=True)
    idx = knn_search(x, x, 3, "cosine")
    assert idx.dtype == torch.long and not idx.requires_grad


# ---------------------------------------------------------------------- selected scores
@pytest.mark.parametrize("metric", METRICS)
def test_selected_scores_equal_dense_and_are_differentiable(metric: str) -> None:
    torch.manual_seed(8)
    q = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (2, 6, 4))
    got = selected_scores(q, k, idx, metric)
    torch.testing.assert_close(got, pairwise_scores(q, k, metric).gather(-1, idx))
    assert torch.autograd.gradcheck(lambda a, b: selected_scores(a, b, idx, metric), (q, k))


def test_selected_scores_float32_under_autocast() -> None:
    q = torch.randn(1, 4, 3, dtype=torch.bfloat16)
    idx = torch.zeros(1, 4, 2, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert selected_scores(q, q, idx, "matmul").dtype == torch.float32


# --------------------------------------------------------------------- gather / aggregate
def test_gather_neighbors() -> None:
    torch.manual_seed(9)
    v = torch.randn(2, 7, 3)
    idx = torch.randint(0, 7, (2, 4, 5))
    got = gather_neighbors(v, idx)
    assert got.shape == (2, 4, 5, 3)
    for b in range(2):
        assert torch.equal(got[b], v[b][idx[b]])


def _conv1d_reference(values, idx, weight, bias, gates):
    g = gather_neighbors(values, idx)
    if gates is not None:
        g = g * gates.unsqueeze(-1)
    b, n, k, c = g.shape
    seq = g.reshape(b, n * k, c).transpose(1, 2)  # (B, C, N·K): the original's layout
    return F.conv1d(seq, weight, bias, stride=k).transpose(1, 2)


@pytest.mark.parametrize("use_gates", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_aggregate_matches_stride_k_conv1d(use_gates: bool, use_bias: bool) -> None:
    torch.manual_seed(10)
    v = torch.randn(2, 11, 3, dtype=torch.float64)
    idx = torch.randint(0, 11, (2, 8, 4))
    w = torch.randn(5, 3, 4, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64) if use_bias else None
    gates = torch.rand(2, 8, 4, dtype=torch.float64) if use_gates else None
    ref = _conv1d_reference(v, idx, w, bias, gates)
    for budget in (1, 2**30):
        got = aggregate_neighbors(v, idx, w, bias, gates, memory_budget=budget)
        torch.testing.assert_close(got, ref)


def test_aggregate_gradcheck_float64_many_blocks() -> None:
    torch.manual_seed(11)
    v = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (2, 7, 4))
    w = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(2, 7, 4, dtype=torch.float64, requires_grad=True)

    def fn(v, w, bias, gates):
        return aggregate_neighbors(v, idx, w, bias, gates, memory_budget=300)

    assert torch.autograd.gradcheck(fn, (v, w, bias, gates))
    assert torch.autograd.gradcheck(lambda v, w: aggregate_neighbors(v, idx, w), (v, w))


def test_aggregate_gradients_match_reference_autograd() -> None:
    torch.manual_seed(12)
    v = torch.randn(3, 16, 4, requires_grad=True)
    idx = torch.randint(0, 16, (3, 16, 5))
    w = torch.randn(6, 4, 5, requires_grad=True)
    gates = torch.rand(3, 16, 5, requires_grad=True)
    gy = torch.randn(3, 16, 6)
    got = torch.autograd.grad(aggregate_neighbors(v, idx, w, None, gates), (v, w, gates), gy)
    ref = torch.autograd.grad(_conv1d_reference(v, idx, w, None, gates), (v, w, gates), gy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_aggregate_follows_autocast_like_conv1d() -> None:
    """Under bf16 autocast the aggregation runs in bf16 (nn.Conv1d would): equal to the call on
    bf16-cast inputs, and the float32 weight still gets a float32 gradient."""
    torch.manual_seed(19)
    values = torch.randn(2, 30, 6)
    idx = torch.randint(0, 30, (2, 12, 4))
    weight = torch.randn(5, 6, 4, requires_grad=True)
    bias = torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aggregate_neighbors(values, idx, weight, bias)
    assert out.dtype == torch.bfloat16
    ref = aggregate_neighbors(values.bfloat16(), idx, weight.bfloat16(), bias.bfloat16())
    assert torch.equal(out, ref)
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32


def test_aggregate_does_not_save_the_gathered_tensor() -> None:
    """Nothing K-fold (B·N·K·C elements) is kept alive for backward."""
    v = torch.randn(2, 50, 8, requires_grad=True)
    idx = torch.randint(0, 50, (2, 50, 9))
    w = torch.randn(4, 8, 9, requires_grad=True)
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        aggregate_neighbors(v, idx, w).sum().backward()
    assert max(sizes) < 2 * 50 * 9 * 8


def test_aggregate_deterministic_mode() -> None:
    torch.manual_seed(13)
    v = torch.randn(2, 30, 4, requires_grad=True)
    idx = torch.randint(0, 30, (2, 30, 6))
    w = torch.randn(3, 4, 6, requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            v.grad = None
            aggregate_neighbors(v, idx, w, memory_budget=500).sum().backward()
            grads.append(v.grad.clone())
        idx2 = knn_search(v.detach(), v.detach(), 5, "cosine")
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(grads[0], grads[1])
    assert idx2.shape == (2, 30, 5)


def test_aggregate_shape_errors() -> None:
    v = torch.randn(2, 5, 3)
    idx = torch.zeros(2, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must be \(O, C=3, K=2\)"):
        aggregate_neighbors(v, idx, torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match=r"gates must have idx's shape"):
        aggregate_neighbors(v, idx, torch.randn(4, 3, 2), gates=torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match=r"idx must be \(B, Nq, K\)"):
        aggregate_neighbors(v, idx[:1], torch.randn(4, 3, 2))


# ---------------------------------------------------------------------------- coordinates
def test_coordinate_grids() -> None:
    g = coordinate_grid_2d(3, 5, device="cpu", dtype=torch.float64)
    assert g.shape == (2, 3, 5) and g.dtype == torch.float64
    assert torch.equal(g[0, 1], torch.linspace(-1, 1, 5, dtype=torch.float64))  # x = columns
    assert torch.equal(g[1, :, 2], torch.linspace(-1, 1, 3, dtype=torch.float64))  # y = rows
    assert torch.equal(g[0, 0], g[0, 2]) and torch.equal(g[1, :, 0], g[1, :, 4])
    g1 = coordinate_grid_1d(4)
    assert g1.shape == (1, 4) and torch.equal(g1[0], torch.linspace(-1, 1, 4))


@pytest.mark.parametrize("budget", [None, 2048])
@pytest.mark.parametrize("batched", [False, True])
def test_knn_search_score_bias_equals_the_dense_biased_search(budget, batched):
    """Catches: a bias added to the wrong block rows/columns, or broadcast the wrong way."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 20, 4, generator=g)
    k = torch.randn(3, 12, 4, generator=g)
    shape = (3, 20, 12) if batched else (20, 12)
    bias = torch.randn(shape, generator=g).mul_(4).round_()  # large, with ties
    dense = pairwise_scores(q, k, "euclidean") + bias
    # the reference: stable sort, so ties go to the lower key index
    expected = torch.sort(dense, dim=-1, descending=True, stable=True).indices[..., :5]
    got = knn_search(q, k, 5, "euclidean", include_self=False, score_bias=bias,
                     memory_budget=budget)  # fmt: skip
    assert torch.equal(got, expected)
    cand = torch.tensor([1, 3, 4, 7, 8, 10, 11])
    got = knn_search(q, k, 3, "euclidean", include_self=False, candidates=cand, score_bias=bias)
    expected = cand[
        torch.sort(dense[..., cand], dim=-1, descending=True, stable=True).indices[..., :3]
    ]
    assert torch.equal(got, expected)


def test_knn_search_rejects_a_misshapen_score_bias():
    q = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"score_bias must have shape \(5, 5\) or \(B, 5, 5\)"):
        knn_search(q, q, 2, "cosine", score_bias=torch.zeros(5, 4))
