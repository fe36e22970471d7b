"""Gather and aggregation: :func:`gather_neighbors` and the blocked, memory-efficient
:func:`aggregate_neighbors` (``convnn::aggregate`` and its backward op)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from convnn.functional.budget import (
    _cast,
    _check_btd,
    _chunks,
    _offsets,
    _op_budget,
    _use_custom_ops,
    resolve_memory_budget,
)
from convnn.functional.flops import register_flop_formulas

__all__ = [
    "aggregate_neighbors",
    "gather_neighbors",
]

_AGG_BYTES_FACTOR = 3  # gathered block + its gradient + the gated copy in backward


def _flat_index(idx: Tensor, nk: int) -> Tensor:
    """(B, Nq, K) per-sample indices -> flat indices into a (B·Nk, C) view."""
    return torch.add(idx, _offsets(0, idx.shape[0], nk, idx.device, 3)).view(-1)


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


@functools.lru_cache(maxsize=1024)
def _agg_chunks(
    b: int, nq: int, k: int, c: int, o: int, element_size: int, budget: int
) -> tuple[tuple[int, int, int, int], ...]:
    """Work blocks for aggregation: the gathered block, its gradient and a gated copy fit
    (cached per shape and budget: plain Python, but on every forward and backward)."""
    per_query = (k * c * _AGG_BYTES_FACTOR + o) * element_size
    return tuple(_chunks(b, nq, per_query, budget))


def _block_index(idx: Tensor, nk: int, b0: int, b1: int, q0: int, q1: int) -> Tensor:
    """Flat row indices into the (B·Nk, C) view for samples b0:b1 and queries q0:q1."""
    if (b1 - b0, q1 - q0) != idx.shape[:2]:
        idx = idx[b0:b1, q0:q1]
    return torch.add(idx, _offsets(b0, b1, nk, idx.device, 3)).view(-1)


def _aggregate_forward(
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
    w2 = _cast(weight, values.dtype).t()  # (K·C, O) view: BLAS reads it transposed, no copy
    b2 = None if bias is None else _cast(bias, values.dtype)
    src = values.view(b * nk, c)
    # channels-first buffer returned as a (B, Nq, O) view: layers reshape it for free
    out = values.new_empty(b, o, nq)
    blocks = _agg_chunks(b, nq, k, c, o, values.element_size(), budget)
    for b0, b1, q0, q1 in blocks:
        g = src.index_select(0, _block_index(idx, nk, b0, b1, q0, q1)).view(-1, k, c)
        if gates is not None:
            g.mul_(_cast(gates[b0:b1, q0:q1].reshape(-1, k, 1), g.dtype))
        g = g.view(-1, k * c)
        res = g @ w2 if b2 is None else torch.addmm(b2, g, w2)
        dst = out if len(blocks) == 1 else out[b0:b1, :, q0:q1]
        dst.copy_(res.view(b1 - b0, q1 - q0, o).transpose(1, 2))
    return out.transpose(1, 2)


def _aggregate_grads(
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
    """Gradients (values, weight, gates) of :func:`_aggregate_forward`, re-gathering per block;
    ``None`` for a gradient that is not needed."""
    b, nk, c = values.shape
    _, nq, k = idx.shape
    o = weight.shape[0]
    if budget < 0:
        budget = resolve_memory_budget(values.device)
    grad_out = _cast(grad_out, values.dtype)
    w = _cast(weight, values.dtype)  # (O, K·C)
    src = values.view(b * nk, c)
    grad_v = torch.zeros_like(src) if need_v else None
    grad_w = None
    grad_g = values.new_empty(b, nq, k) if need_g else None
    for b0, b1, q0, q1 in _agg_chunks(b, nq, k, c, o, values.element_size(), budget):
        flat = _block_index(idx, nk, b0, b1, q0, q1)
        go = grad_out if (b1 - b0, q1 - q0) == (b, nq) else grad_out[b0:b1, q0:q1]
        go = go.reshape(-1, o)
        gate = None
        if gates is not None:
            gate = _cast(gates[b0:b1, q0:q1].reshape(-1, k, 1), values.dtype)
        gathered = None
        if need_w or need_g:
            gathered = src.index_select(0, flat).view(-1, k, c)
        if need_w:
            x = (gathered if gate is None else gathered * gate).view(-1, k * c)
            go_t = go.transpose(0, 1)
            if grad_w is None:
                grad_w = torch.mm(go_t, x)
            else:
                torch.addmm(grad_w, go_t, x, out=grad_w)  # counted as a matmul
        if need_v or need_g:
            gx = torch.mm(go, w).view(-1, k, c)
            if need_g:
                grad_g[b0:b1, q0:q1] = (gx * gathered).sum(-1).view(b1 - b0, q1 - q0, k)
            if need_v:
                if gate is not None:
                    gx = gx * gate
                grad_v.index_add_(0, flat, gx.view(-1, c))
    return (
        grad_v.view(b, nk, c) if need_v else None,
        _cast(grad_w, weight.dtype) if need_w else None,
        _cast(grad_g, gates.dtype) if need_g else None,
    )


@torch.library.custom_op("convnn::aggregate", mutates_args=())
def _aggregate_op(
    values: Tensor,
    idx: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gates: Tensor | None,
    budget: int,
) -> Tensor:
    """:func:`_aggregate_forward` as a custom op (the compiled path)."""
    register_flop_formulas()
    return _aggregate_forward(values, idx, weight, bias, gates, budget)


@_aggregate_op.register_fake
def _(values, idx, weight, bias, gates, budget):
    register_flop_formulas()
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
    """:func:`_aggregate_grads` as a custom op (the compiled path; an empty tensor stands for a
    gradient that is not needed)."""
    register_flop_formulas()
    grads = _aggregate_grads(grad_out, values, idx, weight, gates, budget, need_v, need_w, need_g)
    empty = values.new_empty(0)
    return tuple(empty.clone() if g is None else g for g in grads)


@_aggregate_backward_op.register_fake
def _(grad_out, values, idx, weight, gates, budget, need_v, need_w, need_g):
    register_flop_formulas()
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


def _aggregate_backward(ctx, grad_out, kernel=_aggregate_backward_op):
    values, idx, weight, gates = ctx.saved_tensors
    need_v, _, need_w, need_b, need_g, _ = ctx.needs_input_grad
    grad_v, grad_w, grad_g = kernel(
        grad_out, values, idx, weight, gates, ctx.budget, need_v, need_w, need_g
    )
    grad_b = _cast(grad_out.sum((0, 1)), ctx.bias_dtype) if need_b else None
    return (
        grad_v if need_v else None,
        None,
        grad_w if need_w else None,
        grad_b,
        grad_g if need_g else None,
        None,
    )


_aggregate_op.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)


def _rank_major(weight: Tensor) -> Tensor:
    """(O, C, K) -> rank-major (O, K·C): one cheap copy per call, shared by the forward and
    backward matmuls; no transposed copy of the whole filter."""
    o, c, k = weight.shape
    return weight.new_empty(o, k, c).copy_(weight.transpose(1, 2)).view(o, k * c)


class _Aggregate(torch.autograd.Function):
    """The eager path: the custom op's kernels and autograd formula without its dispatch.

    Takes the (O, C, K) filter and makes the rank-major copy inside, so the copy adds no
    autograd nodes (its backward is a view of the filter gradient). ``forward`` takes ``ctx``
    (no separate ``setup_context``): ``Function.apply`` then skips the ``inspect.signature``
    binding it does per call for the other style."""

    @staticmethod
    def forward(ctx, values, idx, weight, bias, gates, budget):
        rows = _rank_major(weight)
        out = _aggregate_forward(values, idx, rows, bias, gates, budget)
        _aggregate_setup(ctx, (values, idx, rows, bias, gates, budget), out)
        ctx.k = idx.shape[2]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_v, _, grad_w, *rest = _aggregate_backward(ctx, grad_out, _aggregate_grads)
        if grad_w is not None:  # (O, K·C) -> the (O, C, K) filter's layout, a view
            grad_w = grad_w.view(grad_w.shape[0], ctx.k, -1).transpose(1, 2)
        return grad_v, None, grad_w, *rest


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
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        # like nn.Conv1d under autocast: the matmuls run in the autocast dtype
        low = torch.get_autocast_dtype(device_type)
        values, weight = values.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
        gates = None if gates is None else gates.to(low)
    values, idx = values.contiguous(), _cast(idx, torch.long)
    if _use_custom_ops():
        return _aggregate_op(values, idx, _rank_major(weight), bias, gates, budget)
    if torch.is_grad_enabled() and (
        values.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or (gates is not None and gates.requires_grad)
    ):
        return _Aggregate.apply(values, idx, weight, bias, gates, budget)
    # no gradient: the same kernel without the autograd.Function's call overhead
    return _aggregate_forward(values, idx, _rank_major(weight), bias, gates, budget)
