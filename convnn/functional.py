"""Shared core of every ConvNN layer: neighbour search, gather, aggregation and coordinates.

Conventions used throughout:

* tensors are **channels-last**: queries/keys/values are ``(B, N, C)``;
* scores are "larger is better" and computed in (at least) float32, autocast disabled;
* ties break towards the **lower key index**, deterministically; a NaN score ranks below every
  other score (it is never selected ahead of a finite one);
* neighbour indices ``idx`` are ``(B, Nq, K)`` LongTensors into the key/value tokens, in rank order.

The search never holds more than one block of the ``B × Nq × Nk`` score matrix; the block size
follows a per-device memory budget (:func:`memory_budget`). Aggregation recomputes its gather per
block in backward, so the ``(B, N, K, C)`` neighbour tensor is never kept alive for autograd.

No function here asks the host for a tensor value (no ``.item()``, ``nonzero`` or ``bool(t)``):
on a GPU the whole search and aggregation is queued without draining the stream. The search and
the aggregations are ``torch.library`` custom ops, so ``torch.compile`` keeps them in its graph
as opaque calls (no graph break, no recompilation per layer).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTEND_MODES",
    "CPU_MEMORY_BUDGET",
    "CUDA_MEMORY_FRACTION",
    "MAGNITUDE_ALIASES",
    "MAGNITUDE_TYPES",
    "MEMORY_BUDGET",
    "MEMORY_BUDGET_ENV",
    "aggregate_neighbors",
    "attend_neighbors",
    "canonical_magnitude",
    "coordinate_grid_1d",
    "coordinate_grid_2d",
    "gate_dropout_mask",
    "gather_neighbors",
    "knn_search",
    "pairwise_scores",
    "resolve_memory_budget",
    "selected_scores",
]

MAGNITUDE_TYPES: tuple[str, ...] = ("cosine", "euclidean", "matmul")
MAGNITUDE_ALIASES: dict[str, str] = {
    "similarity": "cosine",
    "distance": "euclidean",
    "dot": "matmul",
}

#: Working-memory budget (bytes) for one block of search scores or gathered neighbours on every
#: device; ``None`` (default) = per-device default, see :func:`memory_budget`. Read at call time
#: (``convnn.functional.MEMORY_BUDGET = 256 * 2**20`` takes effect on the next forward).
MEMORY_BUDGET: int | None = None
#: Budget on CPU (and any non-CUDA device) when nothing overrides it.
CPU_MEMORY_BUDGET: int = 16 * 2**20
#: Fraction of the free CUDA memory given to one work block when nothing overrides it.
CUDA_MEMORY_FRACTION: float = 0.25
#: Environment variable (bytes) that overrides the per-device default budget.
MEMORY_BUDGET_ENV: str = "CONVNN_MEMORY_BUDGET"

_EPS = 1e-12  # norm floor for cosine: x / max(||x||, eps)
_SEARCH_BYTES_PER_SCORE = 8  # float32 score + tie mask + temporaries per score element
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


# ----------------------------------------------------------------------------- work blocks
def resolve_memory_budget(device: torch.device | str, memory_budget: int | None = None) -> int:
    """Bytes of working memory for one work block on ``device``, resolved in this order.

    ``memory_budget`` (argument) > :data:`MEMORY_BUDGET` (module setting, if not ``None``) >
    the ``CONVNN_MEMORY_BUDGET`` environment variable (bytes) > the device default: on CUDA
    :data:`CUDA_MEMORY_FRACTION` of the free device memory (driver-free plus the caching
    allocator's unused reserve; a host query, not a stream sync), elsewhere
    :data:`CPU_MEMORY_BUDGET`. Layers call it once per forward.
    """
    if memory_budget is not None:
        return int(memory_budget)
    if MEMORY_BUDGET is not None:
        return int(MEMORY_BUDGET)
    env = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(
                f"{MEMORY_BUDGET_ENV}={env!r} must be an integer number of bytes"
            ) from None
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(CPU_MEMORY_BUDGET, int((free + cached) * CUDA_MEMORY_FRACTION))
    return CPU_MEMORY_BUDGET


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


# ----------------------------------------------------------------------------------- search
_TIE_CHUNK = 32  # columns per chunk when locating the lowest-index ties
_TIE_BYTES = 24  # per element of a gathered tie chunk (int64 columns, counts, masks)


def _tie_columns(m: int, k: int) -> int:
    """Elements per query row that :func:`_nth_true` works on besides the row itself."""
    return min(m, k * _TIE_CHUNK)


def _nth_true(mask: Tensor, nth: Tensor) -> Tensor:
    """Column of the ``nth[..., j]``-th True (1-based) in each row of ``mask`` (..., m).

    Short rows: ``searchsorted`` on the running count of True. Long rows, in two levels so that
    no full-width cumulative sum is needed: True counts per chunk of :data:`_TIE_CHUNK` columns
    (one cheap reduction), ``searchsorted`` on their running total picks the chunk, a cumulative
    sum inside the gathered chunks picks the column. Sync-free. ``nth`` must not exceed a row's
    count of True.
    """
    m, size = mask.shape[-1], _TIE_CHUNK
    if m <= nth.shape[-1] * size:
        return torch.searchsorted(mask.cumsum(-1, dtype=torch.int32), nth)
    whole = (m // size) * size
    counts = mask[..., :whole].unflatten(-1, (m // size, size)).sum(-1, dtype=torch.int32)
    if whole < m:
        rest = mask[..., whole:].sum(-1, keepdim=True, dtype=torch.int32)
        counts = torch.cat([counts, rest], dim=-1)
    total = counts.cumsum(-1, dtype=torch.int32)
    chunk = torch.searchsorted(total, nth).clamp_(max=total.shape[-1] - 1)
    before = torch.where(chunk > 0, total.gather(-1, (chunk - 1).clamp_(min=0)), 0)
    cols = chunk.unsqueeze(-1) * size + torch.arange(size, device=mask.device)
    valid = cols < m
    inside = mask.gather(-1, cols.clamp_(max=m - 1).flatten(-2)).view(cols.shape) & valid
    rank = (nth - before).unsqueeze(-1)
    return chunk * size + (inside.cumsum(-1, dtype=torch.int32) < rank).sum(-1)


#: Widest float32 row ranked by :func:`_keyed_topk`; wider rows use :func:`_repaired_topk`.
_KEYED_MAX_WIDTH = 512


def _keyed_topk(scores: Tensor, k: int) -> Tensor:
    """Exact top-k of a float32 row by (score desc, index asc) through unique int64 keys.

    The float's bits, made order-preserving as an int32 (-0.0 first folded into +0.0, which it
    equals), go to the high bits and 65535 - column to the low 16 bits: keys never tie, so one
    ``topk`` gives the exact order with no repair. Cheapest on short rows.
    """
    m = scores.shape[-1]
    bits = (scores + 0.0).view(torch.int32)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64).bitwise_left_shift_(16)
    key.bitwise_or_(65535 - torch.arange(m, device=scores.device))
    return key.topk(k, dim=-1, largest=True, sorted=True).indices


def _repaired_topk(scores: Tensor, k: int, *, ordered: bool = True) -> Tensor:
    """Exact top-k by (score desc, index asc) of any float row via one float ``topk``.

    ``torch.topk`` does not say which of several equal values it returns. Repair without the
    host: every entry above the k-th value v is in the top k; the remaining slots go to the
    lowest-index entries equal to v (:func:`_nth_true`), with no per-row branch.
    """
    vals, idx = scores.topk(k, dim=-1, largest=True, sorted=True)
    bound = vals[..., k - 1 :]
    above = (vals > bound).sum(-1, keepdim=True)  # these slots are exact already
    slot = torch.arange(k, device=scores.device)
    nth_tie = (slot - above).clamp_(min=0).add_(1).to(torch.int32)
    idx = torch.where(slot < above, idx, _nth_true(scores == bound, nth_tie))
    idx = idx.sort(dim=-1).values
    if not ordered:
        return idx
    # equal values above the boundary: lower index first
    order = scores.gather(-1, idx).sort(dim=-1, descending=True, stable=True).indices
    return idx.gather(-1, order)


def _direct_topk(scores: Tensor, k: int, *, ordered: bool = True) -> Tensor:
    """Exact top-k of prepared ``scores`` (no NaN) in one pass over the row: rank order, or
    ascending index order with ``ordered=False``."""
    if scores.dtype == torch.float32 and scores.shape[-1] <= _KEYED_MAX_WIDTH:
        idx = _keyed_topk(scores, k)
        return idx if ordered else idx.sort(dim=-1).values
    return _repaired_topk(scores, k, ordered=ordered)


#: (block width c, factor f): rows of at least f·k·c scores are searched in blocks of c columns.
_BLOCK_RULES: tuple[tuple[int, int], ...] = ((32, 2), (8, 2))


def _block_width(m: int, k: int) -> int:
    """Columns per block for :func:`_exact_topk` on rows of ``m`` scores (1: one ``topk``)."""
    for width, factor in _BLOCK_RULES:
        if m >= factor * k * width:
            return width
    return 1


def _search_bytes_per_query(m: int, k: int) -> int:
    """Working bytes of one query's search over ``m`` candidates for the top ``k``."""
    width = _search_width(m, k)
    return width * _SEARCH_BYTES_PER_SCORE + _tie_columns(width, k) * _TIE_BYTES


def _search_width(m: int, k: int) -> int:
    """Score columns allocated for ``m`` candidates: a whole number of blocks, so the top level
    of :func:`_exact_topk` never copies the score block to pad it."""
    width = _block_width(m, k)
    return -(-m // width) * width


def _exact_topk(scores: Tensor, k: int, *, ordered: bool = True) -> Tensor:
    """Exact top-k of prepared ``scores`` (no NaN) by (score desc, index asc), blockwise.

    Long rows are cut into blocks of c contiguous columns. A block's best entry (by score, then
    lower index) ranks above every entry of a block that loses to it, so the k best entries lie
    in the k best blocks; blocks ranked by their maximum with ties to the lower block are
    exactly blocks ranked by their best entry. Hence: block maxima (one vectorised pass), the k
    best blocks (recursively), their k·c scores (whole-block copies), the exact top-k among
    those in ascending column order (recursively). Same result as :func:`_direct_topk` at
    ~1/3 of its cost on a CPU for a 32×32 map: ``topk`` itself and the tie repair only ever
    see short rows. Columns past a row's real width must hold -inf.
    """
    m = scores.shape[-1]
    width = _block_width(m, k)
    if width == 1:
        return _direct_topk(scores, k, ordered=ordered)
    if m % width:
        scores = F.pad(scores, (0, width - m % width), value=-math.inf)
    lead = scores.shape[:-1]
    rows, nb = math.prod(lead), scores.shape[-1] // width
    blocks = scores.reshape(rows, nb, width)
    best = _exact_topk(blocks.amax(-1), k, ordered=False)  # (rows, k), ascending block ids
    flat = (best + torch.arange(rows, device=best.device).mul_(nb).unsqueeze(1)).flatten()
    cand = blocks.reshape(rows * nb, width).index_select(0, flat).view(rows, k * width)
    pos = _exact_topk(cand, k, ordered=ordered)  # candidate columns ascend with key index
    return (best.gather(-1, pos.div(width, rounding_mode="floor")) * width + pos % width).view(
        *lead, k
    )


def _ordered_topk(scores: Tensor, k: int, *, self_cols: Tensor | None = None) -> Tensor:
    """Indices of the k largest entries along the last dim, ordered by (score desc, index asc).

    Exact and sync-free (:func:`_exact_topk`). NaN ranks below every finite score; ``self_cols``
    (one column per query row) rank below that (-inf). ``scores`` is overwritten (scratch).
    """
    scores.nan_to_num_(nan=torch.finfo(scores.dtype).min, posinf=math.inf, neginf=-math.inf)
    if self_cols is not None:
        rows = torch.arange(self_cols.shape[0], device=scores.device)
        scores[:, rows, self_cols] = -math.inf
    return _exact_topk(scores, k)


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
    budget = _op_budget(queries.device, memory_budget)
    shared = queries is keys
    return torch.ops.convnn.knn_search(
        queries.detach(),
        keys.detach(),
        K,
        mt,
        candidates,
        query_positions,
        include_self,
        budget,
        shared,
    )


def _op_budget(device: torch.device, budget: int | None) -> int:
    """Budget handed to an op: resolved now in eager mode; ``-1`` (resolve at run time) while
    ``torch.compile`` traces, so that a varying free-memory figure never becomes a guard."""
    if budget is not None:
        return int(budget)
    if torch.compiler.is_compiling():
        return -1
    return resolve_memory_budget(device)


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
) -> Tensor:
    """Blocked exact search behind :func:`knn_search` (arguments already validated)."""
    mt = magnitude_type
    b, nq, _ = queries.shape
    nk = keys.shape[1]
    device = queries.device
    if budget < 0:
        budget = resolve_memory_budget(device)
    if query_positions is None:
        query_positions = torch.arange(nq, device=device)
    else:
        query_positions = query_positions.to(device=device, dtype=torch.long)
    if candidates is not None:
        candidates = torch.sort(candidates.to(device=device, dtype=torch.long).flatten()).values
    m = nk if candidates is None else candidates.numel()
    out = torch.empty(b, nq, K, dtype=torch.long, device=device)
    if include_self:
        out[..., 0] = query_positions
        if K == 1:
            return out
    with torch.autocast(device_type=device.type, enabled=False):
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
            self_cols = torch.where(candidates[at] == query_positions, at, m)
        width = _search_width(columns, k_sel)
        if width > m:  # zero keys whose scores become -inf: whole blocks for _exact_topk
            kp = F.pad(kp, (0, 0, 0, width - m))
        cand_cols = None if candidates is None else F.pad(candidates, (0, width - m), value=-1)
        for b0, b1, q0, q1 in _chunks(b, nq, _search_bytes_per_query(columns, k_sel), budget):
            scores = _scores_prepared(qp[b0:b1, q0:q1], kp[b0:b1], mt)
            if width > m:
                scores[..., m:] = -math.inf
            if include_self:
                sel = _ordered_topk(scores, K - 1, self_cols=self_cols[q0:q1])
                dst = out[b0:b1, q0:q1, 1:]
            else:
                sel = _ordered_topk(scores, K)
                dst = out[b0:b1, q0:q1]
            dst.copy_(sel if candidates is None else cand_cols[sel])
    return out


@_knn_search_op.register_fake
def _(queries, keys, K, magnitude_type, candidates, query_positions, include_self, budget, shared):
    return queries.new_empty(queries.shape[0], queries.shape[1], K, dtype=torch.long)


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


def _agg_chunks(b: int, nq: int, k: int, c: int, o: int, element_size: int, budget: int):
    """Work blocks for aggregation: the gathered block, its gradient and a gated copy fit."""
    per_query = (k * c * _AGG_BYTES_FACTOR + o) * element_size
    return _chunks(b, nq, per_query, budget)


def _block_index(idx: Tensor, nk: int, b0: int, b1: int, q0: int, q1: int) -> Tensor:
    """Flat row indices into the (B·Nk, C) view for samples b0:b1 and queries q0:q1."""
    offs = torch.arange(b0, b1, device=idx.device).mul_(nk).view(-1, 1, 1)
    return (idx[b0:b1, q0:q1] + offs).reshape(-1)


@torch.library.custom_op("convnn::aggregate", mutates_args=())
def _aggregate_op(
    values: Tensor,
    idx: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gates: Tensor | None,
    budget: int,
) -> Tensor:
    """Blocked gather + one matmul per block; see :func:`aggregate_neighbors`. ``weight`` is
    the (O, K·C) rank-major filter (row o = W[o, :, 0], W[o, :, 1], ...)."""
    b, nk, c = values.shape
    _, nq, k = idx.shape
    o = weight.shape[0]
    if budget < 0:
        budget = resolve_memory_budget(values.device)
    w2 = weight.to(values.dtype).t()  # (K·C, O) view: BLAS reads it transposed, no copy
    b2 = None if bias is None else bias.to(values.dtype)
    src = values.reshape(b * nk, c)
    # channels-first buffer returned as a (B, Nq, O) view: layers reshape it for free
    out = values.new_empty(b, o, nq)
    for b0, b1, q0, q1 in _agg_chunks(b, nq, k, c, o, values.element_size(), budget):
        g = src.index_select(0, _block_index(idx, nk, b0, b1, q0, q1)).view(-1, k, c)
        if gates is not None:
            g.mul_(gates[b0:b1, q0:q1].reshape(-1, k, 1).to(g.dtype))
        g = g.view(-1, k * c)
        res = g @ w2 if b2 is None else torch.addmm(b2, g, w2)
        out[b0:b1, :, q0:q1] = res.view(b1 - b0, q1 - q0, o).transpose(1, 2)
    return out.transpose(1, 2)


@_aggregate_op.register_fake
def _(values, idx, weight, bias, gates, budget):
    return values.new_empty(values.shape[0], weight.shape[0], idx.shape[1]).transpose(1, 2)


@torch.library.custom_op("convnn::aggregate_backward", mutates_args=())
def _aggregate_backward_op(
    grad_out: Tensor,
    values: Tensor,
    idx: Tensor,
    weight: Tensor,
    gates: Tensor | None,
    budget: int,
    need_v: bool,
    need_w: bool,
    need_g: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (values, weight, gates) of :func:`_aggregate_op`, re-gathering per block;
    an empty tensor stands for a gradient that is not needed."""
    b, nk, c = values.shape
    _, nq, k = idx.shape
    o = weight.shape[0]
    if budget < 0:
        budget = resolve_memory_budget(values.device)
    grad_out = grad_out.to(values.dtype)
    w = weight.to(values.dtype)  # (O, K·C)
    src = values.reshape(b * nk, c)
    grad_v = torch.zeros_like(src) if need_v else None
    grad_w = values.new_zeros(o, k * c) if need_w else None
    grad_g = values.new_empty(b, nq, k) if need_g else None
    for b0, b1, q0, q1 in _agg_chunks(b, nq, k, c, o, values.element_size(), budget):
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
            grad_w.addmm_(go.t(), x.view(-1, k * c))
        if need_v or need_g:
            gx = (go @ w).view(-1, k, c)
            if need_g:
                grad_g[b0:b1, q0:q1] = (gx * gathered).sum(-1).view(b1 - b0, q1 - q0, k)
            if need_v:
                if gate is not None:
                    gx = gx * gate
                grad_v.index_add_(0, flat, gx.view(-1, c))
    empty = values.new_empty(0)
    return (
        grad_v.view(b, nk, c) if need_v else empty,
        grad_w.to(weight.dtype) if need_w else empty.clone(),
        grad_g.to(gates.dtype) if need_g else empty.clone(),
    )


@_aggregate_backward_op.register_fake
def _(grad_out, values, idx, weight, gates, budget, need_v, need_w, need_g):
    empty = values.new_empty(0)
    return (
        values.new_empty(values.shape) if need_v else empty,
        weight.new_empty(weight.shape) if need_w else empty.clone(),
        gates.new_empty(gates.shape) if need_g else empty.clone(),
    )


def _aggregate_setup(ctx, inputs, output) -> None:
    values, idx, weight, bias, gates, budget = inputs
    ctx.save_for_backward(values, idx, weight, gates)
    ctx.budget = budget
    ctx.bias_dtype = None if bias is None else bias.dtype


def _aggregate_backward(ctx, grad_out):
    values, idx, weight, gates = ctx.saved_tensors
    need_v, _, need_w, need_b, need_g, _ = ctx.needs_input_grad
    grad_v, grad_w, grad_g = _aggregate_backward_op(
        grad_out, values, idx, weight, gates, ctx.budget, need_v, need_w, need_g
    )
    grad_b = grad_out.sum((0, 1)).to(ctx.bias_dtype) if need_b else None
    return (
        grad_v if need_v else None,
        None,
        grad_w if need_w else None,
        grad_b,
        grad_g if need_g else None,
        None,
    )


_aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


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
    Under autocast the inputs are cast to the autocast dtype first (as ``nn.Conv1d`` would be).
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
    budget = _op_budget(values.device, memory_budget)
    device_type = values.device.type
    if torch.is_autocast_enabled(device_type):
        # like nn.Conv1d under autocast: the matmuls run in the autocast dtype
        low = torch.get_autocast_dtype(device_type)
        values, weight = values.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
        gates = None if gates is None else gates.to(low)
    # (O, C, K) -> rank-major (O, K·C): one cheap copy per call (its backward is another),
    # shared by the forward and backward matmuls; no transposed copy of the whole filter.
    rows = weight.transpose(1, 2).reshape(weight.shape[0], k * weight.shape[1])
    return _aggregate_op(values.contiguous(), idx.long(), rows, bias, gates, budget)


# ------------------------------------------------------------------------ attention gating
ATTEND_MODES: tuple[str, ...] = ("sum", "depthwise", "standard")


def _head_weight(weight: Tensor | None, heads: int, b0: int, b1: int, dtype: torch.dtype):
    """Per-row filter of batch rows b0:b1 (row r belongs to head r mod ``heads``)."""
    if weight is None:
        return None, None
    which = torch.arange(b0, b1, device=weight.device).remainder_(heads)
    return which, weight.index_select(0, which).to(dtype)


def _attend_block(q, k, v, idx, mask, weight, heads, metric, softmax, blk):
    """Recomputed forward of one block: (scores' inputs, gates, gathered values, head rows)."""
    b0, b1, q0, q1 = blk
    _, nk, d = k.shape
    kk = idx.shape[-1]
    flat = _block_index(idx, nk, b0, b1, q0, q1)
    nb, nq = b1 - b0, q1 - q0
    qb = q[b0:b1, q0:q1]
    kg = k.reshape(-1, d).index_select(0, flat).view(nb, nq, kk, d)
    if metric == "dot":
        s = (kg @ qb.unsqueeze(-1)).squeeze(-1)
    else:
        s = (qb.unsqueeze(2) - kg).pow_(2).sum(-1).neg_()
    g = s.softmax(dim=-1) if softmax else s
    gm = g if mask is None else g * mask[b0:b1, q0:q1]
    vg = v.reshape(-1, v.shape[-1]).index_select(0, flat).view(nb, nq, kk, v.shape[-1])
    which, w = _head_weight(weight, heads, b0, b1, v.dtype)
    return flat, qb, kg, g, gm, vg, which, w


@torch.library.custom_op("convnn::attend", mutates_args=())
def _attend_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    heads: int,
    metric: str,
    softmax: bool,
    mode: str,
    budget: int,
) -> Tensor:
    """Blocked forward of :func:`attend_neighbors`."""
    bh, nq, kk = idx.shape
    dv = v.shape[-1]
    o = weight.shape[-1] if mode == "standard" else dv
    if budget < 0:
        budget = resolve_memory_budget(v.device)
    out = v.new_empty(bh, nq, o)
    per_query = (kk * (q.shape[-1] * q.element_size() + 2 * dv * v.element_size()) + o * 4) * 2
    for blk in _chunks(bh, nq, per_query, budget):
        b0, b1, q0, q1 = blk
        _, _, _, _, gm, vg, _, w = _attend_block(
            q, k, v, idx, mask, weight, heads, metric, softmax, blk
        )
        gv = gm.to(v.dtype).unsqueeze(-2)  # (nb, nq, 1, K)
        if mode == "sum":
            res = (gv @ vg).squeeze(-2)
        elif mode == "depthwise":
            res = (gv @ vg.mul_(w.unsqueeze(1))).squeeze(-2)
        else:
            x = vg.mul_(gv.transpose(-1, -2)).view(b1 - b0, q1 - q0, kk * dv)
            res = torch.bmm(x, w)
        out[b0:b1, q0:q1] = res
    return out


@_attend_op.register_fake
def _(q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget):
    o = weight.shape[-1] if mode == "standard" else v.shape[-1]
    return v.new_empty(idx.shape[0], idx.shape[1], o)


@torch.library.custom_op("convnn::attend_backward", mutates_args=())
def _attend_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    heads: int,
    metric: str,
    softmax: bool,
    mode: str,
    budget: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (q, k, v, weight) of :func:`_attend_op`; gathers are recomputed per block.
    An empty tensor stands for the weight gradient when there is no weight."""
    bh, nq, kk = idx.shape
    d, dv = q.shape[-1], v.shape[-1]
    o = grad_out.shape[-1]
    if budget < 0:
        budget = resolve_memory_budget(v.device)
    grad_out = grad_out.to(v.dtype)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros(k.shape[0] * k.shape[1], d, dtype=k.dtype, device=k.device)
    grad_v = torch.zeros(v.shape[0] * v.shape[1], dv, dtype=v.dtype, device=v.device)
    grad_w = None if weight is None else torch.zeros(weight.shape, dtype=v.dtype, device=v.device)
    per_query = (kk * (2 * d * q.element_size() + 3 * dv * v.element_size()) + o * 4) * 2
    for blk in _chunks(bh, nq, per_query, budget):
        b0, b1, q0, q1 = blk
        nb, nqb = b1 - b0, q1 - q0
        flat, qb, kg, g, gm, vg, which, w = _attend_block(
            q, k, v, idx, mask, weight, heads, metric, softmax, blk
        )
        go = grad_out[b0:b1, q0:q1]
        gv = gm.to(v.dtype)
        if mode == "sum":
            grad_gm = (vg @ go.unsqueeze(-1)).squeeze(-1)
            grad_vg = gv.unsqueeze(-1) * go.unsqueeze(2)
        elif mode == "depthwise":
            t = gv.unsqueeze(-1) * go.unsqueeze(2)  # (nb, nq, K, dv)
            grad_w.index_add_(0, which, (t * vg).sum(1))
            grad_gm = (vg.mul_(w.unsqueeze(1)) @ go.unsqueeze(-1)).squeeze(-1)
            grad_vg = t.mul_(w.unsqueeze(1))
        else:
            x = (vg * gv.unsqueeze(-1)).view(nb, nqb, kk * dv)
            grad_w.index_add_(0, which, torch.bmm(x.transpose(1, 2), go))
            gx = torch.bmm(go, w.transpose(1, 2)).view(nb, nqb, kk, dv)
            grad_gm = (gx * vg).sum(-1)
            grad_vg = gx.mul_(gv.unsqueeze(-1))
        grad_v.index_add_(0, flat, grad_vg.reshape(-1, dv))
        grad_g = grad_gm.to(g.dtype)
        if mask is not None:
            grad_g = grad_g * mask[b0:b1, q0:q1]
        if softmax:
            grad_s = g * (grad_g - (grad_g * g).sum(-1, keepdim=True))
        else:
            grad_s = grad_g
        if metric == "dot":
            grad_q[b0:b1, q0:q1] = (grad_s.unsqueeze(-2) @ kg).squeeze(-2)
            grad_kg = grad_s.unsqueeze(-1) * qb.unsqueeze(2)
        else:
            diff = qb.unsqueeze(2) - kg  # ds/dq = -2·diff, ds/dk = 2·diff
            grad_kg = diff.mul_(grad_s.unsqueeze(-1) * 2.0)
            grad_q[b0:b1, q0:q1] = grad_kg.sum(2).neg_()
        grad_k.index_add_(0, flat, grad_kg.reshape(-1, d))
    grad_w = v.new_empty(0) if grad_w is None else grad_w.to(weight.dtype)
    return grad_q, grad_k.view(k.shape), grad_v.view(v.shape), grad_w


@_attend_backward_op.register_fake
def _(grad_out, q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget):
    grad_w = v.new_empty(0) if weight is None else weight.new_empty(weight.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_w


def _attend_setup(ctx, inputs, output) -> None:
    q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget = inputs
    ctx.save_for_backward(q, k, v, idx, mask, weight)
    ctx.args = (heads, metric, softmax, mode, budget)


def _attend_backward(ctx, grad_out):
    q, k, v, idx, mask, weight = ctx.saved_tensors
    grads = _attend_backward_op(grad_out, q, k, v, idx, mask, weight, *ctx.args)
    need = ctx.needs_input_grad
    gq, gk, gv, gw = (g if need[i] else None for i, g in zip((0, 1, 2, 5), grads, strict=True))
    return gq, gk, gv, None, None, gw, None, None, None, None, None


_attend_op.register_autograd(_attend_backward, setup_context=_attend_setup)


def gate_dropout_mask(
    shape: torch.Size | tuple[int, ...], p: float, *, training: bool, device: torch.device
) -> Tensor | None:
    """Inverted-dropout multipliers (0 or 1/(1-p)) for (B, Nq, K) attention gates, or ``None``
    when dropout is inactive (eval, or p = 0)."""
    if not training or p <= 0.0:
        return None
    keep = 1.0 - p
    return torch.empty(shape, device=device).bernoulli_(keep).div_(keep)


def attend_neighbors(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    idx: Tensor,
    magnitude_type: str,
    *,
    softmax: bool = True,
    weight: Tensor | None = None,
    mode: str = "sum",
    heads: int = 1,
    gate_mask: Tensor | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """Attention over the selected keys, with the scores and the gated aggregation fused.

    Per query n of batch row r: s_k = score(q_n, key[idx_k]) under ``magnitude_type`` (float32
    at least, as :func:`selected_scores`), g = softmax(s) (or s), times ``gate_mask`` (B, Nq, K)
    if given (dropout); then ``mode``: ``sum`` → Σ_k g_k v_k (C); ``depthwise`` →
    Σ_k g_k W[h, k, c] v_k[c] with ``weight`` (heads, K, C); ``standard`` →
    Σ_{k,c} g_k v_k[c] W[h, k·C + c, o] with ``weight`` (heads, K·C, O). Row r uses head
    h = r mod ``heads``. Blocked; backward recomputes the gathers, so no (B, Nq, K, ·) tensor
    is kept for autograd. Gradients reach queries, keys, values and weight.
    """
    mt = canonical_magnitude(magnitude_type)
    for name, t in (("queries", queries), ("keys", keys), ("values", values)):
        _check_btd(name, t)
    if mode not in ATTEND_MODES:
        raise ValueError(f"mode={mode!r} is not supported; choose one of {ATTEND_MODES}")
    if (weight is None) != (mode == "sum"):
        raise ValueError(f"mode={mode!r} {'takes no' if mode == 'sum' else 'needs a'} weight")
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q = queries.to(_score_dtype(queries.dtype))
        k = keys.to(_score_dtype(keys.dtype))
        if mt == "cosine":
            q, k = F.normalize(q, dim=-1, eps=_EPS), F.normalize(k, dim=-1, eps=_EPS)
        elif mt == "matmul":
            q = q / math.sqrt(q.shape[-1])
        if gate_mask is not None:
            gate_mask = gate_mask.to(q.dtype)
        budget = _op_budget(values.device, memory_budget)
        metric = "neg_sqdist" if mt == "euclidean" else "dot"
        return _attend_op(
            q.contiguous(),
            k.contiguous(),
            values.contiguous(),
            idx.long(),
            gate_mask,
            weight,
            heads,
            metric,
            softmax,
            mode,
            budget,
        )


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
