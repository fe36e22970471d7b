"""The exact neighbour search: :func:`knn_search` and its ``convnn::knn_search`` custom op."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from convnn.functional.budget import (
    _arange,
    _autocast_to_disable,
    _check_btd,
    _chunks,
    _const,
    _op_budget,
    _prepare,
    _scores_prepared,
    _use_custom_ops,
    canonical_magnitude,
    resolve_memory_budget,
)
from convnn.functional.flops import register_flop_formulas
from convnn.functional.topk import (
    _TIE_BYTES,
    _ascending,
    _ordered_topk,
    _search_width,
    _tie_columns,
)

__all__ = [
    "knn_search",
]

_SEARCH_BYTES_PER_SCORE = 8  # float32 score + tie mask + temporaries per score element


def _search_bytes_per_query(m: int, k: int) -> int:
    """Working bytes of one query's search over ``m`` candidates for the top ``k``."""
    width = _search_width(m, k)
    return width * _SEARCH_BYTES_PER_SCORE + _tie_columns(width, k) * _TIE_BYTES


def _check_search_args(
    queries: Tensor | None, keys: Tensor, K: int, m: int, include_self: bool
) -> None:
    if queries is not None and (
        keys.shape[0] != queries.shape[0] or keys.shape[2] != queries.shape[2]
    ):
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must share B and D"
        )
    need = K - 1 if include_self else K
    if K < 1 or need > m:
        raise ValueError(
            f"K={K} needs {need} candidate keys but only {m} are available "
            f"(valid range: 1 <= K <= {m + 1 if include_self else m})"
        )


def knn_search(
    queries: Tensor | None,
    keys: Tensor,
    K: int,
    magnitude_type: str,
    *,
    candidates: Tensor | None = None,
    query_positions: Tensor | None = None,
    include_self: bool = True,
    score_bias: Tensor | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """K nearest keys of every query: LongTensor (B, Nq, K) of key indices in rank order.

    Args:
        queries: (B, Nq, D) search features of the queries; ``None``: the keys at
            ``query_positions`` (prepared once with the keys, not a second time).
        keys: (B, Nk, D) search features of the keys.
        K: neighbours per query.
        magnitude_type: ``cosine``/``euclidean``/``matmul`` (or an alias).
        candidates: optional (M,) key indices shared across the batch; ``None`` = all keys.
        query_positions: (Nq,) index of each query among the keys (its "self"); ``None`` means
            the queries are the keys (Nq == Nk).
        include_self: ``True``: slot 0 is self and the K-1 best *other* candidates follow
            (if fewer than K-1 others exist among sampled candidates, self fills the gap);
            ``False``: the plain top-K among the candidates.
        score_bias: optional (Nq, Nk) or (B, Nq, Nk) values added to the scores (larger is
            better) before the selection, e.g. a relative-position bias; indexed by query and
            key (before ``candidates``), added block by block, never broadcast to the batch.
        memory_budget: bytes for one block of scores (default: :func:`memory_budget`).

    Ties break towards the lower key index and NaN scores rank last; the result equals a dense
    search exactly. Sync-free: shapes come from ``.shape``, never from tensor values.
    """
    mt = canonical_magnitude(magnitude_type)
    _check_btd("keys", keys)
    if queries is None:
        if query_positions is None:
            raise ValueError("queries=None (the keys at query_positions) needs query_positions")
        nq = query_positions.shape[0]
    else:
        _check_btd("queries", queries)
        nq = queries.shape[1]
    nk = keys.shape[1]
    m = nk if candidates is None else candidates.numel()
    _check_search_args(queries, keys, K, m, include_self)
    if query_positions is None:
        if include_self and nq != nk:
            raise ValueError(
                f"query_positions is required when queries ({nq}) are not the keys ({nk})"
            )
    elif query_positions.shape != (nq,):
        raise ValueError(
            f"query_positions must have shape ({nq},), got {tuple(query_positions.shape)}"
        )
    if score_bias is not None:
        lead = score_bias.shape[:-2]
        if score_bias.shape[-2:] != (nq, nk) or lead not in ((), (1,), (keys.shape[0],)):
            raise ValueError(
                f"score_bias must have shape ({nq}, {nk}) or (B, {nq}, {nk}), got "
                f"{tuple(score_bias.shape)}"
            )
    budget = _op_budget(keys.device, memory_budget)
    shared = queries is keys
    search = _knn_search_op if _use_custom_ops() else _knn_search_blocked
    if search is _knn_search_op:  # the op takes no autograd inputs; eager runs under no_grad
        queries = None if queries is None else queries.detach()
        keys = keys.detach()
    args = (queries, keys, K, mt, candidates, query_positions, include_self, budget, shared)
    if not torch.is_grad_enabled():  # already off: no no_grad context to enter (a few µs)
        return search(*args, score_bias)
    with torch.no_grad():  # the selection is never differentiated
        return search(*args, score_bias)


class _Plan(NamedTuple):
    """Candidate bookkeeping of one search configuration (constant while its inputs are)."""

    candidates: Tensor | None  # (m,) ascending key indices, or None = every key
    m: int  # candidate keys
    columns: int  # score columns searched (m, or m + 1 with a spare -inf self column)
    width: int  # score columns allocated: a whole number of blocks
    self_cols: Tensor  # (1, nq, j) each query's self column (then, folded, columns m..width-1)
    self_first: Tensor  # (nq, 1) each query's own key index, slot 0 with include_self
    key_rows: Tensor | None  # (width,) key rows to score (padded columns: any valid row)
    cand_cols: Tensor | None  # (width,) key index of each score column (-1 past m)
    fill: bool  # the columns past m need a -inf fill (False: ``self_cols`` covers them)


def _make_plan(
    candidates: Tensor | None, query_positions: Tensor, nk: int, k_sel: int, include_self: bool
) -> _Plan:
    """The bookkeeping behind :func:`_search_plan` (tensor ops on the device, no host sync)."""
    if candidates is not None:
        candidates = _ascending(candidates.flatten())
    m = nk if candidates is None else candidates.numel()
    self_cols = query_positions
    columns = m
    if candidates is not None and include_self:
        # each query's self among the candidates; queries without one point at column m,
        # a spare -inf column, so that one index write per row replaces a mask pass
        columns = m + 1
        at = torch.searchsorted(candidates, query_positions).clamp_(max=m - 1)
        self_cols = at.masked_fill_(candidates.index_select(0, at) != query_positions, m)
    width = _search_width(columns, k_sel)
    key_rows = cand_cols = None
    if candidates is not None:
        # padded columns score row 0 (any valid row): their scores are set to -inf
        key_rows = F.pad(candidates, (0, width - m), value=0)
        cand_cols = F.pad(candidates, (0, width - m), value=-1)
    elif width > m:
        key_rows = _padded_rows(m, width, query_positions.device)
    return _Plan(
        candidates,
        m,
        columns,
        width,
        self_cols.view(1, -1, 1),
        query_positions.view(-1, 1),
        key_rows,
        cand_cols,
        width > m,
    )


def _fold_fill(plan: _Plan) -> _Plan:
    """``plan`` with the -inf columns past m added to ``self_cols``: the self column's scatter
    then sets them too, two ops (a slice and a fill) fewer per call. Done for a reused plan of
    an include_self search, once (rebuilding it per call would cost more than it saves)."""
    nq, m, width = plan.self_cols.shape[1], plan.m, plan.width
    extra = _arange(m, width, device=plan.self_cols.device).view(1, 1, -1)
    self_cols = torch.cat([plan.self_cols, extra.expand(1, nq, -1)], dim=2)
    return plan._replace(self_cols=self_cols, fill=False)


def _padded_rows(m: int, width: int, device: torch.device) -> Tensor:
    """Key rows 0..m-1 then row 0 up to ``width``: every key, whole blocks (a cached constant)."""
    if torch.compiler.is_compiling():
        return F.pad(torch.arange(m, device=device), (0, width - m), value=0)
    return _cached_padded_rows(m, width, torch.device(device))


@functools.lru_cache(maxsize=256)
def _cached_padded_rows(m: int, width: int, device: torch.device) -> Tensor:
    return F.pad(torch.arange(m, device=device), (0, width - m), value=0)


#: Eager plans of sampled candidate sets, keyed by the candidates tensor itself (weakly).
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _search_plan(
    candidates: Tensor | None, query_positions: Tensor, nk: int, k_sel: int, include_self: bool
) -> _Plan:
    """:func:`_make_plan`, reused while ``candidates`` and ``query_positions`` are the same
    tensors, unmodified (their ``_version``): a layer's cached candidate set costs its
    bookkeeping (sort, self columns, padding) once, not per call. Rebuilt while compiling."""
    if candidates is None or torch.compiler.is_compiling():
        return _make_plan(candidates, query_positions, nk, k_sel, include_self)
    key = (
        id(query_positions),
        query_positions._version,
        candidates._version,
        nk,
        k_sel,
        include_self,
    )
    plans = _PLANS.get(candidates)
    if plans is None:
        plans = _PLANS[candidates] = {}
    entry = plans.get(key)
    if entry is None or entry[0] is not query_positions:
        if len(plans) > 16:
            plans.clear()
        plan = _make_plan(candidates, query_positions, nk, k_sel, include_self)
        entry = plans[key] = (query_positions, plan)
    elif include_self and entry[1].fill:  # reused: a constant candidate set
        entry = plans[key] = (query_positions, _fold_fill(entry[1]))
    return entry[1]


def _knn_search_blocked(
    queries: Tensor | None,
    keys: Tensor,
    K: int,
    magnitude_type: str,
    candidates: Tensor | None,
    query_positions: Tensor | None,
    include_self: bool,
    budget: int,
    shared: bool,
    score_bias: Tensor | None = None,
) -> Tensor:
    """Blocked exact search behind :func:`knn_search` (arguments already validated; ``queries``
    ``None``: the keys at ``query_positions``)."""
    mt = magnitude_type
    b, nk, _ = keys.shape
    nq = query_positions.shape[0] if queries is None else queries.shape[1]
    device = keys.device
    if budget < 0:
        budget = resolve_memory_budget(device)
    if query_positions is None:
        query_positions = _arange(nq, device=device)
    elif query_positions.device != device or query_positions.dtype != torch.long:
        query_positions = query_positions.to(device=device, dtype=torch.long)
    if candidates is not None and (candidates.device != device or candidates.dtype != torch.long):
        candidates = candidates.to(device=device, dtype=torch.long)
    k_sel = K - 1 if include_self else K
    if include_self and K == 1:
        return query_positions.view(1, nq, 1).expand(b, nq, 1).clone()
    plan = _search_plan(candidates, query_positions, nk, k_sel, include_self)
    blocks = _search_blocks(b, nq, plan.columns, k_sel, budget)
    out = None  # not needed when one block's selection is the result
    if include_self or plan.cand_cols is not None or len(blocks) > 1:
        out = torch.empty(b, nq, K, dtype=torch.long, device=device)
        if include_self:
            out[:, :, :1].copy_(plan.self_first)
    args = (queries, keys, mt, query_positions, include_self, shared, score_bias, plan, blocks)
    if _autocast_to_disable(device):
        with torch.autocast(device_type=device.type, enabled=False):
            return _search_scores(*args, k_sel, out)
    return _search_scores(*args, k_sel, out)  # no context to enter (a few µs per call)


@functools.lru_cache(maxsize=1024)
def _search_blocks(
    b: int, nq: int, columns: int, k_sel: int, budget: int
) -> tuple[tuple[int, int, int, int], ...]:
    """The search's work blocks (:func:`_chunks`), cached per shape and budget."""
    return tuple(_chunks(b, nq, _search_bytes_per_query(columns, k_sel), budget))


def _search_scores(
    queries: Tensor | None,
    keys: Tensor,
    mt: str,
    query_positions: Tensor,
    include_self: bool,
    shared: bool,
    score_bias: Tensor | None,
    plan: _Plan,
    blocks: tuple[tuple[int, int, int, int], ...],
    k_sel: int,
    out: Tensor | None,
) -> Tensor:
    """Scores and selection of :func:`_knn_search_blocked`, block by block, with autocast off:
    written into ``out`` (the self slot already set), or returned when ``out`` is ``None``."""
    m, device = plan.m, keys.device
    kp = _prepare(keys, mt, is_query=False)
    if queries is None and mt != "matmul":  # rows of the prepared keys (row-wise prep)
        qp = kp.index_select(1, query_positions)
    elif queries is None:
        qp = _prepare(keys.index_select(1, query_positions), mt, is_query=True)
    else:
        qp = kp if shared and mt != "matmul" else _prepare(queries, mt, is_query=True)
    if plan.key_rows is not None:
        kp = kp.index_select(1, plan.key_rows)
    bias = None
    if score_bias is not None:
        bias = score_bias.to(device=device, dtype=qp.dtype)
        bias = bias.unsqueeze(0) if bias.dim() == 2 else bias
        if plan.candidates is not None:
            bias = bias[..., plan.candidates]
    whole = len(blocks) == 1  # one block: no slicing
    for b0, b1, q0, q1 in blocks:
        qb, kb = (qp, kp) if whole else (qp[b0:b1, q0:q1], kp[b0:b1])
        scores = _scores_prepared(qb, kb, mt)
        if bias is not None:
            rows = slice(0, 1) if bias.shape[0] == 1 else slice(b0, b1)
            scores[..., :m] += bias[rows, q0:q1]
        if plan.fill:
            scores[:, :, m:].fill_(_const(-math.inf, qp.dtype, device))
        self_cols = None
        if include_self:
            self_cols = plan.self_cols if whole else plan.self_cols[:, q0:q1]
        sel = _ordered_topk(scores, k_sel, self_cols=self_cols)
        if out is None:
            return sel
        dst = out if whole else out[b0:b1, q0:q1]
        dst = dst[:, :, 1:] if include_self else dst
        if plan.cand_cols is None:
            dst.copy_(sel)
        else:
            torch.take(plan.cand_cols, sel, out=dst)
    return out


@torch.library.custom_op("convnn::knn_search", mutates_args=())
def _knn_search_op(
    queries: Tensor | None,
    keys: Tensor,
    K: int,
    magnitude_type: str,
    candidates: Tensor | None,
    query_positions: Tensor | None,
    include_self: bool,
    budget: int,
    shared: bool,
    score_bias: Tensor | None = None,
) -> Tensor:
    """:func:`_knn_search_blocked` as a custom op (the compiled path)."""
    register_flop_formulas()
    return _knn_search_blocked(
        queries,
        keys,
        K,
        magnitude_type,
        candidates,
        query_positions,
        include_self,
        budget,
        shared,
        score_bias,
    )


@_knn_search_op.register_fake
def _(
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
):
    register_flop_formulas()
    nq = query_positions.shape[0] if queries is None else queries.shape[1]
    return keys.new_empty(keys.shape[0], nq, K, dtype=torch.long)
