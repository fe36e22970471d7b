"""FLOP formulas of the custom ops for ``torch.utils.flop_counter``.

Convention (the flop counter's): a matrix product of (m × k) by (k × n) is 2·m·k·n FLOPs,
elementwise work and reductions count 0. Each formula counts exactly the products that the op's
kernel computes, so a :class:`~torch.utils.flop_counter.FlopCounterMode` gives the same total
on the eager path (plain functions, whose matmuls it sees one by one) and on the custom-op path
(opaque ops, counted by these formulas):

* search: one score per (query, scored column) and channel, 2·B·Nq·W·D, where W is the number of
  scored columns: the candidates (all keys when none are given), plus one spare column when
  sampled candidates may miss a query's self, rounded up to the top-K's whole blocks;
* aggregation: 2·B·Nq·K·C·O forward; backward 2·B·Nq·K·C·O for the filter gradient and as much
  again for the value (or gate) gradient;
* attention: per (row, query, neighbour) 2·D for a dot-product score (0 for the euclidean one),
  2·Cv for a ``sum``/``depthwise`` gated aggregation, 2·Cv·O for ``standard``; backward
  recomputes the scores, adds their gradient (2·D each) and the aggregation's (once for
  ``sum``/``depthwise``, twice for ``standard``);
* attention with its projections inside (``attend_projected``): the above plus v's projection
  forward (q and k come from the search's projections, counted where they are computed);
  backward recomputes q, k and v and adds the weight gradients (one product each again) and
  the token gradients (one product per projection whose tokens need one).

The formulas are registered on first use of a custom op (while compiling): importing
``torch.utils.flop_counter`` loads triton, too slow for ``import convnn`` and unneeded eagerly.
"""

from __future__ import annotations

import math
from typing import Any

from convnn.functional.topk import _search_width

__all__ = ["register_flop_formulas"]

_REGISTERED = False


def search_flops(queries: Any, keys: Any, K: int, candidates: Any, include_self: bool) -> int:
    """FLOPs of one exact search (shapes, not tensors: ``candidates`` is ``None`` or a shape)."""
    b, nq, d = queries
    if include_self and K == 1:
        return 0
    m = keys[1] if candidates is None else math.prod(candidates)
    columns = m + 1 if candidates is not None and include_self else m
    width = _search_width(columns, K - 1 if include_self else K)
    return 2 * b * nq * width * d


def _aggregate_flops(values, idx, weight, *args, out_shape=None, **kwargs) -> int:
    b, nq, k = idx
    return 2 * b * nq * k * values[2] * weight[0]


def _aggregate_backward_flops(
    grad_out, values, idx, weight, gates, budget, need_v, need_w, need_g, out_shape=None
) -> int:
    b, nq, k = idx
    one = 2 * b * nq * k * values[2] * weight[0]
    return one * (int(need_w) + int(need_v or need_g))


def _attend_parts(q, v, idx, weight, metric: str, mode: str) -> tuple[int, int]:
    """(score FLOPs, aggregation FLOPs) of one forward of the attention op."""
    bh, nq, kk = idx
    pairs = bh * nq * kk
    scores = 2 * pairs * q[2] if metric != "dist" else 0
    agg = 2 * pairs * v[2] * (weight[-1] if mode == "standard" else 1)
    return scores, agg


def _attend_flops(q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget, out_shape=None):
    scores, agg = _attend_parts(q, v, idx, weight, metric, mode)
    return scores + agg


def _attend_backward_flops(
    grad_out, q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget, out_shape=None
) -> int:
    scores, agg = _attend_parts(q, v, idx, weight, metric, mode)
    return 2 * scores + agg * (2 if mode == "standard" else 1)


def _projection_flops(x, xv, wq, wk, wv, idx, heads) -> tuple[int, int, int]:
    """FLOPs of projecting the q, k and v of :func:`attend_projected` once."""
    b, nk = x[0], x[1]
    nq = idx[1]
    v_in = wv[1]
    return 2 * b * nq * wq[1] * wq[0], 2 * b * nk * wk[1] * wk[0], 2 * b * nk * v_in * wv[0]


def _attend_projected_flops(
    x, xv, wq, wk, wv, qpos, q, k, idx, mask, weight, heads, metric, softmax, mode, budget,
    qscale, out_shape=None,
) -> int:  # fmt: skip
    scores, agg = _attend_parts(q, (0, 0, wv[0] // heads), idx, weight, metric, mode)
    return _projection_flops(x, xv, wq, wk, wv, idx, heads)[2] + scores + agg


def _attend_projected_backward_flops(
    grad_out, x, xv, wq, wk, wv, qpos, idx, mask, weight, heads, metric, softmax, mode, budget,
    qscale, dtype, need_x, need_xv, need_w, out_shape=None,
) -> int:  # fmt: skip
    q = (idx[0], idx[1], wq[0] // heads)
    scores, agg = _attend_parts(q, (0, 0, wv[0] // heads), idx, weight, metric, mode)
    pq, pk, pv = _projection_flops(x, xv, wq, wk, wv, idx, heads)
    recompute = pq + pk + pv
    grad_tokens = (pq + pk + (pv if xv is None else 0)) * int(need_x)
    grad_tokens += pv * int(need_xv and xv is not None)
    attend = 2 * scores + agg * (2 if mode == "standard" else 1)
    return attend + recompute * (1 + int(need_w)) + grad_tokens


def _knn_search_flops(
    queries,
    keys,
    K,
    magnitude_type,
    candidates,
    query_positions,
    include_self,
    budget,
    shared,
    score_bias=None,
    out_shape=None,
) -> int:
    if queries is None:  # the keys at query_positions
        queries = (keys[0], query_positions[0], keys[2])
    return search_flops(queries, keys, K, candidates, include_self)


def register_flop_formulas() -> None:
    """Register the formulas above with ``torch.utils.flop_counter`` (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    from torch.utils.flop_counter import register_flop_formula

    _REGISTERED = True
    ops = torch.ops.convnn
    for op, formula in (
        (ops.knn_search, _knn_search_flops),
        (ops.aggregate, _aggregate_flops),
        (ops.aggregate_backward, _aggregate_backward_flops),
        (ops.attend, _attend_flops),
        (ops.attend_backward, _attend_backward_flops),
        (ops.attend_projected, _attend_projected_flops),
        (ops.attend_projected_backward, _attend_projected_backward_flops),
    ):
        register_flop_formula(op)(formula)
