"""Attention over the selected neighbours: differentiable scores of the selected keys and
the fused, blocked :func:`attend_neighbors` (``convnn::attend`` and its backward op)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from convnn.functional.aggregation import _block_index, gather_neighbors
from convnn.functional.budget import (
    _EPS,
    _arange,
    _cast,
    _check_btd,
    _chunks,
    _no_autocast,
    _op_budget,
    _score_dtype,
    _use_custom_ops,
    canonical_magnitude,
    resolve_memory_budget,
)
from convnn.functional.flops import register_flop_formulas

__all__ = [
    "ATTEND_MODES",
    "DISTANCE_EPS",
    "attend_neighbors",
    "attend_projected",
    "attention_gates",
    "gate_dropout_mask",
    "project_heads",
    "selected_scores",
]


def selected_scores(queries: Tensor, keys: Tensor, idx: Tensor, magnitude_type: str) -> Tensor:
    """Differentiable scores (B, Nq, K) of only the selected keys ``idx``.

    Used for attention weights: gradients reach queries and keys without the dense matrix.
    """
    mt = canonical_magnitude(magnitude_type)
    with _no_autocast(queries.device):
        q = _cast(queries, _score_dtype(queries.dtype))
        k = gather_neighbors(_cast(keys, _score_dtype(keys.dtype)), idx)  # (B, Nq, K, D)
        if mt == "euclidean":
            return -(q.unsqueeze(2) - k).pow(2).sum(-1)
        if mt == "cosine":
            q = F.normalize(q, dim=-1, eps=_EPS)
            k = F.normalize(k, dim=-1, eps=_EPS)
            return torch.einsum("bnd,bnkd->bnk", q, k)
        return torch.einsum("bnd,bnkd->bnk", q, k) / math.sqrt(q.shape[-1])


ATTEND_MODES: tuple[str, ...] = ("sum", "depthwise", "standard")


def _head_weight(weight: Tensor | None, heads: int, b0: int, b1: int, dtype: torch.dtype):
    """Per-row filter of batch rows b0:b1 (row r belongs to head r mod ``heads``)."""
    if weight is None:
        return None, None
    if heads == 1:  # one filter for every row: broadcast, no per-row copy
        return None, _cast(weight, dtype).expand(b1 - b0, *weight.shape[1:])
    which = _arange(b0, b1, device=weight.device).remainder(heads)
    return which, _cast(weight.index_select(0, which), dtype)


def _add_head_grad(grad_w: Tensor, which: Tensor | None, rows: Tensor) -> None:
    """Accumulate per-row filter gradients ``rows`` into their heads' ``grad_w``."""
    if which is None:
        grad_w.add_(rows.sum(0, keepdim=True))
    else:
        grad_w.index_add_(0, which, rows)


#: Added to the distance in the raw euclidean attention weights 1 / (‖q − k‖ + eps), as the
#: original ConvNN-Attention.
DISTANCE_EPS = 1e-8


def _gate_weights(s: Tensor, euclidean: bool, softmax: bool) -> Tensor:
    """Attention weights of the K selected keys from their scores ``s`` (−‖q − k‖² for
    euclidean): softmax(s) or s; euclidean, with d = ‖q − k‖: softmax(−d) or 1 / (d + 1e-8).
    The root is taken of max(d², tiny), so a zero distance keeps finite gradients."""
    if euclidean:
        d = s.neg().clamp_min_(torch.finfo(s.dtype).tiny).sqrt_()
        return d.neg().softmax(dim=-1) if softmax else d.add_(DISTANCE_EPS).reciprocal_()
    return s.softmax(dim=-1) if softmax else s


def _distance_score_grad(d2: Tensor, g: Tensor, grad_g: Tensor, softmax: bool) -> Tensor:
    """Gradient w.r.t. s = −d² of the euclidean weights ``g`` (:func:`_gate_weights`); zero
    where the clamp inside the root holds."""
    tiny = torch.finfo(d2.dtype).tiny
    if softmax:  # g = softmax(−d)
        grad_d = g * ((grad_g * g).sum(-1, keepdim=True) - grad_g)
    else:  # g = 1 / (d + eps): dg/dd = −g²
        grad_d = -grad_g * g * g
    # d = sqrt(−s): dd/ds = −1 / (2d)
    return torch.where(d2 > tiny, grad_d * -0.5 / d2.clamp_min(tiny).sqrt(), 0.0)


def attention_gates(scores: Tensor, magnitude_type: str, *, softmax: bool = True) -> Tensor:
    """The weights ConvNN-Attention gives its K selected keys, from :func:`selected_scores`:
    softmax over them or the raw scores; for ``euclidean`` softmax(−‖q − k‖) or
    1 / (‖q − k‖ + 1e-8), the original's weights (the squared distance only ranks)."""
    euclidean = canonical_magnitude(magnitude_type) == "euclidean"
    return _gate_weights(scores, euclidean, softmax)


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x / max(‖x‖, eps), ‖x‖) row-wise: the cosine search's normalisation, same arithmetic."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(_EPS), norm


def _unit_grad(unit: Tensor, norm: Tensor, grad: Tensor) -> Tensor:
    """Gradient w.r.t. x of y = x / max(‖x‖, eps) (:func:`_unit`) given dL/dy: (g − y⟨y, g⟩)
    / ‖x‖ where ‖x‖ > eps, g / eps where the floor holds (y is then linear in x). Computed in
    ``grad``'s memory (no full-size temporary)."""
    along = torch.linalg.vecdot(unit, grad, dim=-1).unsqueeze_(-1).mul_(norm > _EPS)
    return grad.addcmul_(unit, along, value=-1).div_(norm.clamp_min(_EPS))


def _rowvec_times(x: Tensor, rows: Tensor) -> Tensor:
    """⟨x[..., :], rows[..., j, :]⟩ for every j: (..., D) × (..., K, D) -> (..., K), as a batch
    of row-vector × matrix products (BLAS runs a batch of matrix × column-vector products
    several times slower on a CPU)."""
    return (x.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)


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
        s = _rowvec_times(qb, kg)
    else:
        s = (qb.unsqueeze(2) - kg).pow_(2).sum(-1).neg_()
    g = _gate_weights(s, metric == "dist", softmax)
    gm = g if mask is None else g * mask[b0:b1, q0:q1]
    vg = v.reshape(-1, v.shape[-1]).index_select(0, flat).view(nb, nq, kk, v.shape[-1])
    which, w = _head_weight(weight, heads, b0, b1, v.dtype)
    return flat, qb, kg, g, gm, vg, which, w


def _attend_forward(
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
    out: Tensor | None = None,
) -> Tensor:
    """Blocked forward of :func:`attend_neighbors` (``metric="cos"``: dot products of the
    normalised q and k, normalised here rather than saved for backward), written into ``out``
    if given."""
    if metric == "cos":
        q, k, metric = _unit(q)[0], _unit(k)[0], "dot"
    bh, nq, kk = idx.shape
    dv = v.shape[-1]
    o = weight.shape[-1] if mode == "standard" else dv
    if budget < 0:
        budget = resolve_memory_budget(v.device)
    if out is None:
        out = v.new_empty(bh, nq, o)
    per_query = (kk * (q.shape[-1] * q.element_size() + 2 * dv * v.element_size()) + o * 4) * 2
    for blk in _chunks(bh, nq, per_query, budget):
        b0, b1, q0, q1 = blk
        _, _, _, _, gm, vg, _, w = _attend_block(
            q, k, v, idx, mask, weight, heads, metric, softmax, blk
        )
        gv = _cast(gm, v.dtype).unsqueeze(-2)  # (nb, nq, 1, K)
        if mode == "sum":
            res = (gv @ vg).squeeze(-2)
        elif mode == "depthwise":
            res = (gv @ vg.mul_(w.unsqueeze(1))).squeeze(-2)
        else:
            x = vg.mul_(gv.transpose(-1, -2)).view(b1 - b0, q1 - q0, kk * dv)
            res = torch.bmm(x, w)
        out[b0:b1, q0:q1] = res
    return out


def _attend_grads(
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
    """Gradients (q, k, v, weight) of :func:`_attend_forward`; gathers are recomputed per block
    (and, for ``metric="cos"``, the normalisation of q and k). An empty tensor stands for the
    weight gradient when there is no weight."""
    if metric == "cos":
        (q, q_norm), (k, k_norm) = _unit(q), _unit(k)
        grad_q, grad_k, grad_v, grad_w = _attend_grads(
            grad_out, q, k, v, idx, mask, weight, heads, "dot", softmax, mode, budget
        )
        return _unit_grad(q, q_norm, grad_q), _unit_grad(k, k_norm, grad_k), grad_v, grad_w
    bh, nq, kk = idx.shape
    d, dv = q.shape[-1], v.shape[-1]
    o = grad_out.shape[-1]
    if budget < 0:
        budget = resolve_memory_budget(v.device)
    grad_out = _cast(grad_out, v.dtype)
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
        gv = _cast(gm, v.dtype)
        if mode == "sum":
            grad_gm = _rowvec_times(go, vg)
            grad_vg = gv.unsqueeze(-1) * go.unsqueeze(2)
        elif mode == "depthwise":
            t = gv.unsqueeze(-1) * go.unsqueeze(2)  # (nb, nq, K, dv)
            _add_head_grad(grad_w, which, (t * vg).sum(1))
            grad_gm = _rowvec_times(go, vg.mul_(w.unsqueeze(1)))
            grad_vg = t.mul_(w.unsqueeze(1))
        else:
            x = (vg * gv.unsqueeze(-1)).view(nb, nqb, kk * dv)
            _add_head_grad(grad_w, which, torch.bmm(x.transpose(1, 2), go))
            gx = torch.bmm(go, w.transpose(1, 2)).view(nb, nqb, kk, dv)
            grad_gm = (gx * vg).sum(-1)
            grad_vg = gx.mul_(gv.unsqueeze(-1))
        grad_v.index_add_(0, flat, grad_vg.reshape(-1, dv))
        grad_g = _cast(grad_gm, g.dtype)
        if mask is not None:
            grad_g = grad_g * mask[b0:b1, q0:q1]
        if metric == "dot":
            if softmax:
                grad_s = g * (grad_g - (grad_g * g).sum(-1, keepdim=True))
            else:
                grad_s = grad_g
            grad_q[b0:b1, q0:q1] = (grad_s.unsqueeze(-2) @ kg).squeeze(-2)
            grad_kg = grad_s.unsqueeze(-1) * qb.unsqueeze(2)
        else:
            diff = qb.unsqueeze(2) - kg  # s = -‖diff‖²: ds/dq = -2·diff, ds/dk = 2·diff
            grad_s = _distance_score_grad(diff.pow(2).sum(-1), g, grad_g, softmax)
            grad_kg = diff.mul_(grad_s.unsqueeze(-1) * 2.0)
            grad_q[b0:b1, q0:q1] = grad_kg.sum(2).neg_()
        grad_k.index_add_(0, flat, grad_kg.reshape(-1, d))
    grad_w = v.new_empty(0) if grad_w is None else _cast(grad_w, weight.dtype)
    return grad_q, grad_k.view(k.shape), grad_v.view(v.shape), grad_w


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
    """:func:`_attend_forward` as a custom op (the compiled path)."""
    register_flop_formulas()
    return _attend_forward(q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget)


@_attend_op.register_fake
def _(q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget):
    register_flop_formulas()
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
    """:func:`_attend_grads` as a custom op (the compiled path)."""
    register_flop_formulas()
    return _attend_grads(grad_out, q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget)


@_attend_backward_op.register_fake
def _(grad_out, q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget):
    register_flop_formulas()
    grad_w = v.new_empty(0) if weight is None else weight.new_empty(weight.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_w


def _attend_setup(ctx, inputs, output) -> None:
    q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget = inputs
    ctx.save_for_backward(q, k, v, idx, mask, weight)
    ctx.args = (heads, metric, softmax, mode, budget)


def _attend_backward(ctx, grad_out, kernel=_attend_backward_op):
    q, k, v, idx, mask, weight = ctx.saved_tensors
    grads = kernel(grad_out, q, k, v, idx, mask, weight, *ctx.args)
    need = ctx.needs_input_grad
    gq, gk, gv, gw = (g if need[i] else None for i, g in zip((0, 1, 2, 5), grads, strict=True))
    return gq, gk, gv, None, None, gw, None, None, None, None, None


_attend_op.register_autograd(_attend_backward, setup_context=_attend_setup)


class _Attend(torch.autograd.Function):
    """The eager path: the custom op's kernels and autograd formula without its dispatch
    (``forward`` takes ``ctx``: no per-call ``inspect.signature`` binding in ``apply``)."""

    @staticmethod
    def forward(ctx, q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget):
        args = (q, k, v, idx, mask, weight, heads, metric, softmax, mode, budget)
        out = _attend_forward(*args)
        _attend_setup(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _attend_backward(ctx, grad_out, _attend_grads)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, C) -> (B·h, N, C/h): each head becomes an independent batch entry."""
    if heads == 1:  # already that shape: no view ops (nor their autograd nodes)
        return t
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2).reshape(b * heads, n, c // heads)


def _merge_heads(t: Tensor, heads: int) -> Tensor:
    """(B·h, N, C/h) -> (B, N, C): the inverse of :func:`_split_heads`."""
    if heads == 1:
        return t
    bh, n, d = t.shape
    return t.view(bh // heads, heads, n, d).transpose(1, 2).reshape(bh // heads, n, heads * d)


def project_heads(
    tokens: Tensor, weight: Tensor, heads: int = 1, positions: Tensor | None = None
) -> Tensor:
    """Bias-free ``nn.Linear`` projection of tokens (B, N, Cin) by ``weight`` (C, Cin), only at
    ``positions`` along N if given, split into heads: (B·h, N', C/h). Autocast applies as to
    ``nn.Linear``; the q/k/v of :func:`attend_projected`."""
    if positions is not None:
        tokens = tokens.index_select(1, positions)
    return _split_heads(F.linear(tokens, weight), heads)


def _score_inputs(q: Tensor, k: Tensor, qscale: float) -> tuple[Tensor, Tensor]:
    """Queries and keys as the attention op scores them: float32 at least, q / ``qscale``
    (√d for ``matmul``, else 1), contiguous."""
    q = _cast(q, _score_dtype(q.dtype))
    if qscale != 1.0:
        q = q / qscale
    return q.contiguous(), _cast(k, _score_dtype(k.dtype)).contiguous()


def _rows(t: Tensor | None, r0: int, r1: int) -> Tensor | None:
    """Rows r0:r1 of ``t`` (``None`` stays ``None``), without a slice op when that is all."""
    if t is None or (r0 == 0 and r1 == t.shape[0]):
        return t
    return t[r0:r1]


def _sample_block(x: Tensor, nq: int, c: int, budget: int) -> int:
    """Samples per block of :func:`attend_projected`: about four copies of its q, k and v
    (normalised copies, gradients) within ``budget``. At B32 C64 32×32 on the CPU budget that is
    4 samples: a 58 MiB peak (114 MiB when the layer saved q, k, v) for ~3 % more time; 2
    samples gave 55 MiB for ~9 %, 9 samples 76 MiB."""
    per_sample = 4 * (nq + 2 * x.shape[1]) * c * max(4, x.element_size())
    return max(1, min(x.shape[0], budget // per_sample))


def _attend_projected_forward(
    x: Tensor,
    xv: Tensor | None,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    qpos: Tensor | None,
    q: Tensor,
    k: Tensor,
    idx: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    heads: int,
    metric: str,
    softmax: bool,
    mode: str,
    budget: int,
    qscale: float,
) -> Tensor:
    """Forward of :func:`attend_projected`, one block of whole samples at a time: v is
    projected here (after the search, never whole), q and k are the search's (``wq``, ``wk``
    and ``qpos`` are for backward). Also the kernel of ``convnn::attend_projected``."""
    if budget < 0:
        budget = resolve_memory_budget(x.device)
    dtype, xv = q.dtype, x if xv is None else xv
    wv = _cast(wv, dtype)
    b, bh, nq = x.shape[0], idx.shape[0], idx.shape[1]
    o = weight.shape[-1] if mode == "standard" else wv.shape[0] // heads
    out = q.new_empty(bh, nq, o)
    nb = _sample_block(x, nq, wv.shape[0], budget)
    for s0 in range(0, b, nb):
        r0, r1 = s0 * heads, min(b, s0 + nb) * heads
        xb = _cast(_rows(xv, s0, s0 + nb), dtype)
        v = _split_heads(xb.view(-1, xb.shape[-1]).mm(wv.t()).view(*xb.shape[:2], -1), heads)
        qb, kb = _score_inputs(_rows(q, r0, r1), _rows(k, r0, r1), qscale)
        _attend_forward(
            qb, kb, v, _rows(idx, r0, r1), _rows(mask, r0, r1), weight, heads, metric, softmax,
            mode, budget, _rows(out, r0, r1),
        )  # fmt: skip
    return out


def _accumulate_mm(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """acc + a @ b, in ``acc``'s memory and dtype (the first product is the accumulator;
    ``addmm(out=)``, not ``addmm_``, so that the flop counter sees it)."""
    if acc is None:
        return a @ b
    if a.dtype == acc.dtype:
        return torch.addmm(acc, a, b, out=acc)
    return acc.add_(a @ b)


def _filled(full: Tensor | None, like: Tensor, s0: int, s1: int, block: Tensor) -> Tensor:
    """``full`` (allocated like ``like`` on the first block) with rows s0:s1 set to ``block``."""
    if full is None:
        full = torch.empty_like(like)
    full[s0:s1] = block
    return full


def _attend_projected_grads(
    grad_out: Tensor,
    x: Tensor,
    xv: Tensor | None,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    qpos: Tensor | None,
    idx: Tensor,
    mask: Tensor | None,
    weight: Tensor | None,
    heads: int,
    metric: str,
    softmax: bool,
    mode: str,
    budget: int,
    qscale: float,
    dtype: torch.dtype,
    need_x: bool,
    need_xv: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, xv, wq, wk, wv, weight) of :func:`_attend_projected_forward`, one block of
    whole samples at a time: q, k, v are recomputed from the tokens (in ``dtype``, the
    forward's projection dtype), so no full-size q/k/v or gradient of them is ever alive. An
    empty tensor stands for a gradient that is not needed. Also the kernel of
    ``convnn::attend_projected_backward``."""
    (b, nk, cin), (nq, c) = x.shape, (idx.shape[1], wq.shape[0])
    if budget < 0:
        budget = resolve_memory_budget(x.device)
    nb = _sample_block(x, nq, c, budget)
    wq_, wk_, wv_ = (_cast(w, dtype) for w in (wq, wk, wv))
    grad_x = grad_xv = None
    gwq = gwk = gwv = grad_w = None
    for s0 in range(0, b, nb):
        s1, r0, r1 = min(b, s0 + nb), s0 * heads, min(b, s0 + nb) * heads
        xb = _cast(_rows(x, s0, s1), dtype)
        x2 = xb.view(-1, cin)  # 2-D products: no matmul/reshape wrappers (ops per step)
        xq = x2 if qpos is None else xb.index_select(1, qpos).view(-1, cin)
        xv2 = x2 if xv is None else _cast(_rows(xv, s0, s1), dtype).view(-1, xv.shape[-1])
        q, k = _score_inputs(
            _split_heads(xq.mm(wq_.t()).view(s1 - s0, nq, c), heads),
            _split_heads(x2.mm(wk_.t()).view(s1 - s0, nk, c), heads),
            qscale,
        )
        v = _split_heads(xv2.mm(wv_.t()).view(s1 - s0, nk, c), heads)
        gq, gk, gv, gw = _attend_grads(
            _rows(grad_out, r0, r1),
            q,
            k,
            v,
            _rows(idx, r0, r1),
            _rows(mask, r0, r1),
            weight,
            heads,
            metric,
            softmax,
            mode,
            budget,
        )
        del q, k, v
        if weight is not None:
            grad_w = gw if grad_w is None else grad_w.add_(gw)
        if qscale != 1.0:
            gq = gq / qscale
        gq, gk, gv = (_merge_heads(_cast(g, dtype), heads).view(-1, c) for g in (gq, gk, gv))
        if need_w:
            gwq = _accumulate_mm(gwq, gq.t(), xq)
            gwk = _accumulate_mm(gwk, gk.t(), x2)
            gwv = _accumulate_mm(gwv, gv.t(), xv2)
        if need_x:
            gx = gk.mm(wk_)
            if xv is None:
                _accumulate_mm(gx, gv, wv_)
            if qpos is None:
                _accumulate_mm(gx, gq, wq_)
            else:
                gx.view(s1 - s0, nk, cin).index_add_(1, qpos, gq.mm(wq_).view(s1 - s0, nq, cin))
            gx = gx.view(s1 - s0, nk, cin)
            grad_x = _cast(gx, x.dtype) if nb >= b else _filled(grad_x, x, s0, s1, gx)
        if need_xv and xv is not None:
            gxv = gv.mm(wv_).view(s1 - s0, nk, xv.shape[-1])
            grad_xv = _cast(gxv, xv.dtype) if nb >= b else _filled(grad_xv, xv, s0, s1, gxv)
    empty = x.new_empty(0)
    return (
        empty if grad_x is None else grad_x,
        empty if grad_xv is None else grad_xv,
        *(empty if g is None else _cast(g, w.dtype) for g, w in ((gwq, wq), (gwk, wk), (gwv, wv))),
        empty if grad_w is None else grad_w,
    )


# The compiled path: the same kernels as custom ops (their annotated signatures are the schemas).
_attend_projected_op = torch.library.custom_op(
    "convnn::attend_projected", _attend_projected_forward, mutates_args=()
)
_attend_projected_backward_op = torch.library.custom_op(
    "convnn::attend_projected_backward", _attend_projected_grads, mutates_args=()
)


@_attend_projected_op.register_fake
def _(x, xv, wq, wk, wv, qpos, q, k, idx, mask, weight, heads, metric, softmax, mode, budget, qs):
    register_flop_formulas()
    o = weight.shape[-1] if mode == "standard" else wv.shape[0] // heads
    return q.new_empty(idx.shape[0], idx.shape[1], o)


@_attend_projected_backward_op.register_fake
def _(grad_out, x, xv, wq, wk, wv, qpos, idx, mask, weight, *args):
    register_flop_formulas()
    need_x, need_xv, need_w = args[-3:]
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_x else empty,
        xv.new_empty(xv.shape) if need_xv and xv is not None else empty,
        *(w.new_empty(w.shape) if need_w else empty for w in (wq, wk, wv)),
        empty if weight is None else weight.new_empty(weight.shape),
    )


def _attend_projected_setup(ctx, inputs, output) -> None:
    x, xv, wq, wk, wv, qpos, q, _, idx, mask, weight, *args = inputs
    ctx.save_for_backward(x, xv, wq, wk, wv, qpos, idx, mask, weight)
    ctx.args = (*args, q.dtype)


def _attend_projected_backward(ctx, grad_out, kernel=_attend_projected_backward_op):
    need = ctx.needs_input_grad
    need_w = need[2] or need[3] or need[4]
    grads = kernel(grad_out, *ctx.saved_tensors, *ctx.args, need[0], need[1], need_w)
    gx, gxv, gwq, gwk, gwv, gw = (
        g if need[i] else None for i, g in zip((0, 1, 2, 3, 4, 10), grads, strict=True)
    )
    return gx, gxv, gwq, gwk, gwv, None, None, None, None, None, gw, *(None,) * 6


_attend_projected_op.register_autograd(
    _attend_projected_backward, setup_context=_attend_projected_setup
)


class _AttendProjected(torch.autograd.Function):
    """The eager path of ``convnn::attend_projected`` (see :class:`_Attend`)."""

    @staticmethod
    def forward(ctx, *args):
        out = _attend_projected_forward(*args)
        _attend_projected_setup(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _attend_projected_backward(ctx, grad_out, _attend_projected_grads)


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
    at least, as :func:`selected_scores`), g = :func:`attention_gates` of s (softmax(s) or s;
    euclidean: softmax(−‖q − k‖) or 1 / (‖q − k‖ + 1e-8)), times ``gate_mask`` (B, Nq, K)
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
    with _no_autocast(queries.device):
        q = _cast(queries, _score_dtype(queries.dtype))
        k = _cast(keys, _score_dtype(keys.dtype))
        if mt == "matmul":
            q = q / math.sqrt(q.shape[-1])
        if gate_mask is not None:
            gate_mask = _cast(gate_mask, q.dtype)
        budget = _op_budget(values.device, memory_budget)
        # cosine: the op normalises q and k itself (nothing normalised is saved for backward)
        metric = {"euclidean": "dist", "cosine": "cos"}.get(mt, "dot")
        attend = _attend_op if _use_custom_ops() else _Attend.apply
        return attend(
            q.contiguous(),
            k.contiguous(),
            values.contiguous(),
            _cast(idx, torch.long),
            gate_mask,
            weight,
            heads,
            metric,
            softmax,
            mode,
            budget,
        )


def attend_projected(
    search: Tensor,
    values: Tensor | None,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    idx: Tensor,
    magnitude_type: str,
    *,
    queries: Tensor,
    keys: Tensor,
    query_positions: Tensor | None = None,
    softmax: bool = True,
    weight: Tensor | None = None,
    mode: str = "sum",
    heads: int = 1,
    gate_mask: Tensor | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """:func:`attend_neighbors` of the projections q = :func:`project_heads` (``search``,
    ``q_weight``, ``heads``, ``query_positions``), k (``search``, ``k_weight``) and v
    (``values``, or ``search`` when ``None``, ``v_weight``), with the projections inside the op.

    ``queries`` and ``keys`` are q and k as computed for the search (without gradient): the
    forward reuses them and keeps none of them, and backward recomputes q, k and v per block of
    whole samples. Autograd then holds only the tokens, the indices and the weights — never a
    full-size q, k, v or their gradients (ConvNN-Attention's memory). Gradients reach the
    tokens, the three projection weights and ``weight``.
    """
    mt = canonical_magnitude(magnitude_type)
    for name, t in (("search", search), ("values", values), ("queries", queries), ("keys", keys)):
        if t is not None:
            _check_btd(name, t)
    if mode not in ATTEND_MODES:
        raise ValueError(f"mode={mode!r} is not supported; choose one of {ATTEND_MODES}")
    if (weight is None) != (mode == "sum"):
        raise ValueError(f"mode={mode!r} {'takes no' if mode == 'sum' else 'needs a'} weight")
    with _no_autocast(search.device):
        if gate_mask is not None:
            gate_mask = _cast(gate_mask, _score_dtype(queries.dtype))
        budget = _op_budget(search.device, memory_budget)
        metric = {"euclidean": "dist", "cosine": "cos"}.get(mt, "dot")
        qscale = math.sqrt(queries.shape[-1]) if mt == "matmul" else 1.0
        attend = _attend_projected_op if _use_custom_ops() else _AttendProjected.apply
        return attend(
            search.contiguous(),
            None if values is None else values.contiguous(),
            q_weight,
            k_weight,
            v_weight,
            query_positions,
            queries,
            keys,
            _cast(idx, torch.long),
            gate_mask,
            weight,
            heads,
            metric,
            softmax,
            mode,
            budget,
            qscale,
        )
