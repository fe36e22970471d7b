"""Exact, sync-free top-K by (score desc, index asc): keyed, repaired and blockwise paths."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from convnn.functional.budget import _arange, _const, _offsets

__all__: list[str] = []  # private helpers only; the search and the layers use them

_TIE_CHUNK = 32  # columns per chunk when locating the lowest-index ties
_TIE_BYTES = 24  # per element of a gathered tie chunk (int64 columns, counts, masks)


def _ascending(idx: Tensor) -> Tensor:
    """``idx.sort(dim=-1).values`` as one ``topk`` (1 op instead of the sort's 8)."""
    return idx.topk(idx.shape[-1], dim=-1, largest=False, sorted=True).values


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
    cols = chunk.unsqueeze(-1) * size + _arange(size, device=mask.device)
    valid = cols < m
    inside = mask.gather(-1, cols.clamp_(max=m - 1).flatten(-2)).view(cols.shape) & valid
    rank = (nth - before).unsqueeze(-1)
    return chunk * size + (inside.cumsum(-1, dtype=torch.int32) < rank).sum(-1)


#: Widest float32 row ranked by :func:`_keyed_topk`; wider rows use :func:`_repaired_topk`.
_KEYED_MAX_WIDTH = 512


def _keyed_topk(scores: Tensor, k: int) -> Tensor:
    """Exact top-k of a float32 row by (score desc, index asc) through unique int64 keys.

    The float's bits, made order-preserving (non-negative floats keep them, negative ones map to
    minus their magnitude bits, so -0.0 and +0.0 both give 0), go to the high bits and
    65535 - column to the low 16 bits: keys never tie, so one ``topk`` gives the exact order
    with no repair. Cheapest on short rows; constant operands are cached tensors. The sign fix
    runs in int32 as bit operations (``signbit``/``where`` on bool masks cost 2-3 times as
    much), then one copy widens to int64 and one multiply-add makes the keys (9 ops).
    """
    m, device = scores.shape[-1], scores.device
    # a negative float has int32 bits b = magnitude - 2**31: with s = b >> 31 (-1 there, else
    # 0), (magnitude ^ s) - s is -magnitude there and b elsewhere
    bits = scores.view(torch.int32)
    sign = torch.bitwise_right_shift(bits, _const(31, torch.int32, device))
    mag = torch.bitwise_and(bits, _const(0x7FFFFFFF, torch.int32, device))
    mono = mag.bitwise_xor_(sign).sub_(sign)
    # (65535 - col) + 65536 * mono in int64; an explicit copy widens it (a mixed-dtype add
    # would make the same copy with two more profiler events)
    key = torch.empty(scores.shape, dtype=torch.int64, device=device)
    key.copy_(mono)
    torch.add(_arange(-65535, m - 65535, device=device, scale=-1), key, alpha=65536, out=key)
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
    slot = _arange(k, device=scores.device)
    nth_tie = (slot - above).clamp_(min=0).add_(1).to(torch.int32)
    idx = torch.where(slot < above, idx, _nth_true(scores == bound, nth_tie))
    idx = _ascending(idx)
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
        return idx if ordered else _ascending(idx)
    return _repaired_topk(scores, k, ordered=ordered)


#: (block width c, factor f): rows of at least f·k·c scores are searched in blocks of c columns.
_BLOCK_RULES: tuple[tuple[int, int], ...] = ((32, 2), (8, 2))


def _block_width(m: int, k: int) -> int:
    """Columns per block for :func:`_exact_topk` on rows of ``m`` scores (1: one ``topk``)."""
    for width, factor in _BLOCK_RULES:
        if m >= factor * k * width:
            return width
    return 1


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
    blocks = (
        scores.view(rows, nb, width) if scores.is_contiguous() else scores.reshape(rows, nb, width)
    )
    best = _exact_topk(blocks.amax(-1), k, ordered=False)  # (rows, k), ascending block ids
    flat = torch.add(best, _offsets(0, rows, nb, best.device, 2)).view(-1)
    cand = blocks.view(rows * nb, width).index_select(0, flat).view(rows, k * width)
    pos = _exact_topk(cand, k, ordered=ordered)  # candidate columns ascend with key index
    return torch.add(
        pos % width, best.gather(-1, pos.div(width, rounding_mode="floor")), alpha=width
    ).view(*lead, k)


def _ordered_topk(scores: Tensor, k: int, *, self_cols: Tensor | None = None) -> Tensor:
    """Indices of the k largest entries along the last dim, ordered by (score desc, index asc).

    Exact and sync-free (:func:`_exact_topk`). NaN ranks below every finite score; ``self_cols``
    ((1, Nq, j): j columns per query row) rank below that (-inf). ``scores`` is overwritten.
    """
    scores.nan_to_num_(nan=torch.finfo(scores.dtype).min, posinf=math.inf, neginf=-math.inf)
    if self_cols is not None:
        scores.scatter_(2, self_cols.expand(scores.shape[0], -1, -1), -math.inf)
    return _exact_topk(scores, k)
