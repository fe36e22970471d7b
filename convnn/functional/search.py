"""The exact neighbour search: :func:`knn_search` and its ``convnn::knn_search`` custom op."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from convnn.functional.budget import (
    _arange,
    _check_btd,
    _chunks,
    _no_autocast,
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


def _check_search_args(queries: Tensor, keys: Tensor, K: int, m: int, include_self: bool) -> None:
    if keys.shape[0] != queries.shape[0] or keys.shape[2] != queries.shape[2]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must share B and D"
        )
    need = K - 1 if include_self else K
    if K < 1 or need > m:
        raise ValueError(
            f"K={K} needs {need} candidate keys but only {m} are available "
            f"(valid range: 1 <= K <= {m + 1 if include_self else m})"
        )


@torch.no_grad()
def knn_search(
    queries: Tensor,
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
        queries: (B, Nq, D) search features of the queries.
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
    _check_btd("queries", queries)
    _check_btd("keys", keys)
    nq, nk = queries.shape[1], keys.shape[1]
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
        if score_bias.shape[-2:] != (nq, nk) or lead not in ((), (1,), (queries.shape[0],)):
            raise ValueError(
                f"score_bias must have shape ({nq}, {nk}) or (B, {nq}, {nk}), got "
                f"{tuple(score_bias.shape)}"
            )
    budget = _op_budget(queries.device, memory_budget)
    shared = queries is keys
    search = _knn_search_op if _use_custom_ops() else _knn_search_blocked
    return search(
        queries.detach(),
        keys.detach(),
        K,
        mt,
        candidates,
        query_positions,
        include_self,
        budget,
        shared,
        score_bias,
    )


def _knn_search_blocked(
    queries: Tensor,
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
    """Blocked exact search behind :func:`knn_search` (arguments already validated)."""
    mt = magnitude_type
    b, nq, _ = queries.shape
    nk = keys.shape[1]
    device = queries.device
    if budget < 0:
        budget = resolve_memory_budget(device)
    if query_positions is None:
        query_positions = _arange(nq, device=device)
    else:
        if query_positions.device != device or query_positions.dtype != torch.long:
            query_positions = query_positions.to(device=device, dtype=torch.long)
    if candidates is not None:
        if candidates.device != device or candidates.dtype != torch.long:
            candidates = candidates.to(device=device, dtype=torch.long)
        candidates = _ascending(candidates.flatten())
    m = nk if candidates is None else candidates.numel()
    out = torch.empty(b, nq, K, dtype=torch.long, device=device)
    if include_self:
        out[..., 0] = query_positions
        if K == 1:
            return out
    with _no_autocast(device):
        kp = _prepare(keys, mt, is_query=False)
        qp = kp if shared and mt != "matmul" else _prepare(queries, mt, is_query=True)
        if candidates is not None:
            kp = kp[:, candidates]
        k_sel = K - 1 if include_self else K
        self_cols = query_positions
        columns = m
        if candidates is not None and include_self:
            # each query's self among the candidates; queries without one point at column m,
            # a spare -inf column, so that one index write per row replaces a mask pass
            columns = m + 1
            at = torch.searchsorted(candidates, query_positions).clamp_(max=m - 1)
            self_cols = at.masked_fill_(candidates.index_select(0, at) != query_positions, m)
        width = _search_width(columns, k_sel)
        if width > m:  # zero keys whose scores become -inf: whole blocks for _exact_topk
            kp = F.pad(kp, (0, 0, 0, width - m))
        cand_cols = None if candidates is None else F.pad(candidates, (0, width - m), value=-1)
        bias = None
        if score_bias is not None:
            bias = score_bias.to(device=device, dtype=qp.dtype)
            bias = bias.unsqueeze(0) if bias.dim() == 2 else bias
            if candidates is not None:
                bias = bias[..., candidates]
        for b0, b1, q0, q1 in _chunks(b, nq, _search_bytes_per_query(columns, k_sel), budget):
            scores = _scores_prepared(qp[b0:b1, q0:q1], kp[b0:b1], mt)
            if bias is not None:
                rows = slice(0, 1) if bias.shape[0] == 1 else slice(b0, b1)
                scores[..., :m] += bias[rows, q0:q1]
            if width > m:
                scores[..., m:] = -math.inf
            if include_self:
                sel = _ordered_topk(scores, K - 1, self_cols=self_cols[q0:q1])
                dst = out[b0:b1, q0:q1, 1:]
            else:
                sel = _ordered_topk(scores, K)
                dst = out[b0:b1, q0:q1]
            dst.copy_(sel if candidates is None else cand_cols.take(sel))
    return out


@torch.library.custom_op("convnn::knn_search", mutates_args=())
def _knn_search_op(
    queries: Tensor,
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
    return queries.new_empty(queries.shape[0], queries.shape[1], K, dtype=torch.long)
