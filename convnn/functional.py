"""Shared core of every ConvNN layer: neighbour search, gather, aggregation and coordinates.

Conventions used throughout (SPEC §1):

* tensors are **channels-last**: queries/keys/values are ``(B, N, C)``;
* scores are "larger is better" and computed in (at least) float32, autocast disabled;
* ties break towards the **lower key index**, deterministically;
* neighbour indices ``idx`` are ``(B, Nq, K)`` LongTensors into the key/value tokens, in rank order.

The search never holds more than one block of the ``B × Nq × Nk`` score matrix; the block size
follows a memory budget (``MEMORY_BUDGET`` bytes by default, change it at module level or pass
``memory_budget=``). Aggregation recomputes its gather per block in backward, so the
``(B, N, K, C)`` neighbour tensor is never kept alive for autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "MAGNITUDE_ALIASES",
    "MAGNITUDE_TYPES",
    "MEMORY_BUDGET",
    "aggregate_neighbors",
    "canonical_magnitude",
    "coordinate_grid_1d",
    "coordinate_grid_2d",
    "gather_neighbors",
    "knn_search",
    "pairwise_scores",
    "selected_scores",
]

MAGNITUDE_TYPES: tuple[str, ...] = ("cosine", "euclidean", "matmul")
MAGNITUDE_ALIASES: dict[str, str] = {
    "similarity": "cosine",
    "distance": "euclidean",
    "dot": "matmul",
}

#: Default working-memory budget (bytes) for one block of search scores or gathered neighbours.
#: Users may change it (``convnn.functional.MEMORY_BUDGET = 256 * 2**20``); read at call time.
MEMORY_BUDGET: int = 16 * 2**20

_EPS = 1e-12  # norm floor for cosine: x / max(||x||, eps)
_SEARCH_BYTES_PER_SCORE = 8  # float32 score + temporaries (topk, masks) per score element
_AGG_BYTES_FACTOR = 3  # gathered block + its gradient + the gated copy in backward


# ------------------------------------------------------------------------------- magnitude
def canonical_magnitude(magnitude_type: str) -> str:
    """Return the canonical metric name for ``magnitude_type`` (aliases accepted)."""
    if isinstance(magnitude_type, str):
        name = MAGNITUDE_ALIASES.get(magnitude_type, magnitude_type)
        if name in MAGNITUDE_TYPES:
            return name
    choices = MAGNITUDE_TYPES + tuple(MAGNITUDE_ALIASES)
    raise ValueError(f"magnitude_type={magnitude_type!r} is not supported; choose one of {choices}")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are at least float32 (bf16/fp16 change which neighbours win)."""
    return torch.promote_types(dtype, torch.float32)


def _prepare(x: Tensor, magnitude_type: str, *, is_query: bool) -> Tensor:
    """Per-token preprocessing shared by the dense and the blocked score computation.

    Contiguous output: one memory layout, hence one matmul kernel and one rounding, however the
    caller built ``x`` (expanded coordinates, transposed views, ...).
    """
    x = x.to(_score_dtype(x.dtype)).contiguous()
    if magnitude_type == "cosine":
        return F.normalize(x, dim=-1, eps=_EPS)
    if magnitude_type == "matmul" and is_query:
        return x / math.sqrt(x.shape[-1])
    return x


def _scores_prepared(q: Tensor, k: Tensor, magnitude_type: str) -> Tensor:
    """Scores between prepared queries (B, nq, D) and prepared keys (B, nk, D)."""
    if magnitude_type == "euclidean":
        qq = q.pow(2).sum(-1, keepdim=True)
        kk = k.pow(2).sum(-1).unsqueeze(1)
        d2 = torch.baddbmm(kk, q, k.transpose(1, 2), alpha=-2.0).add_(qq)
        return d2.clamp_min_(0.0).neg_()
    return torch.bmm(q, k.transpose(1, 2))


def _check_btd(name: str, t: Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B, N, D), got shape {tuple(t.shape)}")


def pairwise_scores(queries: Tensor, keys: Tensor, magnitude_type: str) -> Tensor:
    """Dense larger-is-better scores (B, Nq, Nk) in float32 (float64 stays float64).

    cosine = <x̂_i, x̂_j>, euclidean = -max(||q - k||², 0), matmul = <q, k> / sqrt(D).
    """
    mt = canonical_magnitude(magnitude_type)
    _check_btd("queries", queries)
    _check_btd("keys", keys)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q = _prepare(queries, mt, is_query=True)
        return _scores_prepared(q, _prepare(keys, mt, is_query=False), mt)


def selected_scores(queries: Tensor, keys: Tensor, idx: Tensor, magnitude_type: str) -> Tensor:
    """Differentiable scores (B, Nq, K) of only the selected keys ``idx``.

    Used for attention weights: gradients reach queries and keys without the dense matrix.
    """
    mt = canonical_magnitude(magnitude_type)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q = queries.to(_score_dtype(queries.dtype))
        k = gather_neighbors(keys.to(_score_dtype(keys.dtype)), idx)  # (B, Nq, K, D)
        if mt == "euclidean":
            return -(q.unsqueeze(2) - k).pow(2).sum(-1)
        if mt == "cosine":
            q = F.normalize(q, dim=-1, eps=_EPS)
            k = F.normalize(k, dim=-1, eps=_EPS)
            return torch.einsum("bnd,bnkd->bnk", q, k)
        return torch.einsum("bnd,bnkd->bnk", q, k) / math.sqrt(q.shape[-1])


# ----------------------------------------------------------------------------------- search
def _ordered_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries along the last dim, ordered by (score desc, index asc).

    ``torch.topk`` does not specify which of several equal values it returns; rows whose k-th
    and (k+1)-th values tie are resolved exactly by taking the lowest indices among the tie.
    """
    m = scores.shape[-1]
    if k == m:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices
    vals, idx = scores.topk(k + 1, dim=-1, largest=True, sorted=True)
    if not bool((vals[..., 1:] == vals[..., :-1]).any()):
        return idx[..., :k]  # strictly decreasing: the set and its order are unique
    boundary = vals[..., k - 1]
    idx = idx[..., :k]
    tie = vals[..., k] == boundary
    if bool(tie.any()):
        rows = tie.nonzero(as_tuple=True)
        sub = scores[rows]
        thresh = boundary[rows].unsqueeze(-1)
        above = sub > thresh
        equal = sub == thresh
        need = k - above.sum(-1, keepdim=True)
        keep = above | (equal & (equal.cumsum(-1) <= need))
        idx[rows] = keep.nonzero()[:, -1].view(-1, k)
    idx = idx.sort(dim=-1).values
    order = scores.gather(-1, idx).sort(dim=-1, descending=True, stable=True).indices
    return idx.gather(-1, order)


def _chunks(batch: int, nq: int, per_query: int, budget: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, q0, q1) work blocks of at most ``budget`` bytes at ``per_query`` bytes per
    (sample, query): whole samples when one fits (contiguous slices, few large ops), else
    query blocks inside one sample."""
    per_sample = max(1, nq * per_query)
    if per_sample <= budget:
        bb = budget // per_sample
        return [(b0, min(batch, b0 + bb), 0, nq) for b0 in range(0, batch, bb)]
    qb = max(1, budget // max(1, per_query))
    return [(b0, b0 + 1, q0, min(nq, q0 + qb)) for b0 in range(batch) for q0 in range(0, nq, qb)]


@torch.compiler.disable  # data-dependent blocking and tie repair: run eagerly inside compiled code
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
        memory_budget: bytes for one block of scores (default :data:`MEMORY_BUDGET`).

    Ties break towards the lower key index; the result equals a dense search exactly.
    """
    mt = canonical_magnitude(magnitude_type)
    _check_btd("queries", queries)
    _check_btd("keys", keys)
    b, nq, _ = queries.shape
    nk = keys.shape[1]
    if keys.shape[0] != b or keys.shape[2] != queries.shape[2]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must share B and D"
        )
    device = queries.device
    if query_positions is None:
        if include_self and nq != nk:
            raise ValueError(
                f"query_positions is required when queries ({nq}) are not the keys ({nk})"
            )
        query_positions = torch.arange(nq, device=device)
    else:
        query_positions = query_positions.to(device=device, dtype=torch.long)
        if query_positions.shape != (nq,):
            raise ValueError(
                f"query_positions must have shape ({nq},), got {tuple(query_positions.shape)}"
            )
    if candidates is not None:
        candidates = torch.sort(candidates.to(device=device, dtype=torch.long).flatten()).values
    m = nk if candidates is None else candidates.numel()
    need = K - 1 if include_self else K
    if K < 1 or need > m:
        raise ValueError(
            f"K={K} needs {need} candidate keys but only {m} are available "
            f"(valid range: 1 <= K <= {m + 1 if include_self else m})"
        )
    budget = MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    out = torch.empty(b, nq, K, dtype=torch.long, device=device)
    if include_self:
        out[..., 0] = query_positions
        if K == 1:
            return out
    with torch.autocast(device_type=device.type, enabled=False):
        kp = _prepare(keys, mt, is_query=False)
        shared = queries is keys and mt != "matmul"
        qp = kp if shared else _prepare(queries, mt, is_query=True)
        if candidates is not None:
            kp = kp[:, candidates]
        for b0, b1, q0, q1 in _chunks(b, nq, m * _SEARCH_BYTES_PER_SCORE, budget):
            scores = _scores_prepared(qp[b0:b1, q0:q1], kp[b0:b1], mt)
            if include_self:
                self_pos = query_positions[q0:q1]
                if candidates is None:
                    rows = torch.arange(q1 - q0, device=device)
                    scores[:, rows, self_pos] = -math.inf
                else:
                    is_self = self_pos.unsqueeze(1) == candidates.unsqueeze(0)
                    scores.masked_fill_(is_self, -math.inf)
                sel = _ordered_topk(scores, K - 1)
                dst = out[b0:b1, q0:q1, 1:]
            else:
                sel = _ordered_topk(scores, K)
                dst = out[b0:b1, q0:q1]
            dst.copy_(sel if candidates is None else candidates[sel])
    return out


# --------------------------------------------------------------------- gather and aggregate
def _flat_index(idx: Tensor, nk: int) -> Tensor:
    """(B, Nq, K) per-sample indices -> flat indices into a (B·Nk, C) view."""
    offs = torch.arange(idx.shape[0], device=idx.device).mul_(nk).view(-1, 1, 1)
    return (idx + offs).reshape(-1)


def gather_neighbors(values: Tensor, idx: Tensor) -> Tensor:
    """Neighbour features (B, Nq, K, C) of channels-last ``values`` (B, Nk, C) at ``idx``.

    One ``index_select`` on a flat view: no K-fold copy of the input before gathering.
    """
    _check_btd("values", values)
    b, nk, c = values.shape
    bq, nq, k = idx.shape
    if bq != b:
        raise ValueError(f"idx {tuple(idx.shape)} and values {tuple(values.shape)} differ in B")
    flat = values.reshape(b * nk, c).index_select(0, _flat_index(idx, nk))
    return flat.view(b, nq, k, c)


def _agg_chunks(values: Tensor, idx: Tensor, o: int, budget: int):
    """Work blocks for aggregation: the gathered block, its gradient and a gated copy fit."""
    b, _, c = values.shape
    _, nq, k = idx.shape
    per_query = (k * c * _AGG_BYTES_FACTOR + o) * values.element_size()
    return _chunks(b, nq, per_query, budget)


def _block_index(idx: Tensor, nk: int, b0: int, b1: int, q0: int, q1: int) -> Tensor:
    """Flat row indices into the (B·Nk, C) view for samples b0:b1 and queries q0:q1."""
    offs = torch.arange(b0, b1, device=idx.device).mul_(nk).view(-1, 1, 1)
    return (idx[b0:b1, q0:q1] + offs).reshape(-1)


class _Aggregate(torch.autograd.Function):
    """Blocked gather + one matmul; backward recomputes the gather instead of storing it."""

    @staticmethod
    def forward(ctx, values, idx, weight, bias, gates, budget):  # type: ignore[override]
        b, nk, c = values.shape
        _, nq, k = idx.shape
        o = weight.shape[0]
        w2 = weight.to(values.dtype).permute(2, 1, 0).reshape(k * c, o)  # [k·C + c, o]
        b2 = None if bias is None else bias.to(values.dtype)
        src = values.reshape(b * nk, c)
        # channels-first buffer returned as a (B, Nq, O) view: layers reshape it for free
        out = values.new_empty(b, o, nq)
        for b0, b1, q0, q1 in _agg_chunks(values, idx, o, budget):
            g = src.index_select(0, _block_index(idx, nk, b0, b1, q0, q1)).view(-1, k, c)
            if gates is not None:
                g.mul_(gates[b0:b1, q0:q1].reshape(-1, k, 1).to(g.dtype))
            g = g.view(-1, k * c)
            res = g @ w2 if b2 is None else torch.addmm(b2, g, w2)
            out[b0:b1, :, q0:q1] = res.view(b1 - b0, q1 - q0, o).transpose(1, 2)
        ctx.save_for_backward(values, idx, weight, gates)
        ctx.budget = budget
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        values, idx, weight, gates = ctx.saved_tensors
        b, nk, c = values.shape
        _, nq, k = idx.shape
        o = weight.shape[0]
        need_v, _, need_w, need_b, need_g, _ = ctx.needs_input_grad
        grad_out = grad_out.to(values.dtype)
        w2 = weight.to(values.dtype).permute(2, 1, 0).reshape(k * c, o)
        src = values.reshape(b * nk, c)
        grad_v = torch.zeros_like(src) if need_v else None
        grad_w2 = values.new_zeros(k * c, o) if need_w else None
        grad_g = values.new_empty(b, nq, k) if need_g else None
        for b0, b1, q0, q1 in _agg_chunks(values, idx, o, ctx.budget):
            flat = _block_index(idx, nk, b0, b1, q0, q1)
            go = grad_out[b0:b1, q0:q1].reshape(-1, o)
            gate = None
            if gates is not None:
                gate = gates[b0:b1, q0:q1].reshape(-1, k, 1).to(values.dtype)
            gathered = None
            if need_w or need_g:
                gathered = src.index_select(0, flat).view(-1, k, c)
            if need_w:
                x = gathered if gate is None else gathered * gate
                grad_w2.addmm_(x.view(-1, k * c).t(), go)
            if need_v or need_g:
                gx = (go @ w2.t()).view(-1, k, c)
                if need_g:
                    grad_g[b0:b1, q0:q1] = (gx * gathered).sum(-1).view(b1 - b0, q1 - q0, k)
                if need_v:
                    if gate is not None:
                        gx = gx * gate
                    grad_v.index_add_(0, flat, gx.view(-1, c))
        grad_values = grad_v.view(b, nk, c) if need_v else None
        grad_weight = None
        if need_w:
            grad_weight = grad_w2.view(k, c, o).permute(2, 1, 0).to(weight.dtype)
        grad_bias = grad_out.sum((0, 1)).to(ctx.bias_dtype) if need_b else None
        grad_gates = grad_g.to(gates.dtype) if need_g else None
        return grad_values, None, grad_weight, grad_bias, grad_gates, None


@torch.compiler.disable  # shape-dependent block loop; the eager kernels are the fast path
def aggregate_neighbors(
    values: Tensor,
    idx: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    gates: Tensor | None = None,
    *,
    memory_budget: int | None = None,
) -> Tensor:
    """out[b, n, o] = bias[o] + Σ_k Σ_c W[o, c, k] · g[b, n, k] · v[b, idx[b, n, k], c].

    ``values`` (B, Nk, C) channels-last, ``idx`` (B, Nq, K), ``weight`` (O, C, K) in
    ``nn.Conv1d(C, O, K, stride=K)`` layout, ``gates`` optional (B, Nq, K). Returns (B, Nq, O).
    Memory-efficient: per query block one gather and one matmul; nothing K-fold is stored for
    backward (the gather is recomputed; gradients reach values, weight, bias and gates).
    """
    _check_btd("values", values)
    if idx.dim() != 3 or idx.shape[0] != values.shape[0]:
        raise ValueError(f"idx must be (B, Nq, K) with B={values.shape[0]}, got {tuple(idx.shape)}")
    k = idx.shape[2]
    if weight.dim() != 3 or weight.shape[1] != values.shape[2] or weight.shape[2] != k:
        raise ValueError(
            f"weight must be (O, C={values.shape[2]}, K={k}), got {tuple(weight.shape)}"
        )
    if gates is not None and gates.shape != idx.shape:
        raise ValueError(
            f"gates must have idx's shape {tuple(idx.shape)}, got {tuple(gates.shape)}"
        )
    budget = MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    return _Aggregate.apply(values.contiguous(), idx.long(), weight, bias, gates, budget)


# ------------------------------------------------------------------------------ coordinates
def coordinate_grid_2d(
    H: int, W: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """(2, H, W) coordinates: channel 0 = x (columns, linspace(-1, 1, W)), 1 = y (rows)."""
    xs = torch.linspace(-1.0, 1.0, W, device=device, dtype=dtype)
    ys = torch.linspace(-1.0, 1.0, H, device=device, dtype=dtype)
    return torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W)])


def coordinate_grid_1d(
    T: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """(1, T) coordinates linspace(-1, 1, T) along the sequence."""
    return torch.linspace(-1.0, 1.0, T, device=device, dtype=dtype).view(1, T)
