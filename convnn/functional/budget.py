"""Scores and work blocks: the metrics, the float32 score computation and the per-device
memory budget that sizes every work block of the search, aggregation and attention ops."""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch import Tensor

__all__ = [
    "CPU_MEMORY_BUDGET",
    "CUDA_MEMORY_FRACTION",
    "MAGNITUDE_ALIASES",
    "MAGNITUDE_TYPES",
    "MEMORY_BUDGET",
    "MEMORY_BUDGET_ENV",
    "canonical_magnitude",
    "pairwise_scores",
    "resolve_memory_budget",
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
    """Scores are at least float32 (bf16/fp16 change which neighbours win): float64 stays, every
    other dtype scores in float32 (a Python check: ``torch.promote_types`` is a dispatched op)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(x: Tensor, magnitude_type: str, *, is_query: bool) -> Tensor:
    """Per-token preprocessing shared by the dense and the blocked score computation.

    Contiguous output: one memory layout, hence one matmul kernel and one rounding, however the
    caller built ``x`` (expanded coordinates, transposed views, ...).
    """
    x = _cast(x, _score_dtype(x.dtype)).contiguous()
    if magnitude_type == "cosine":
        # F.normalize's arithmetic (x / max(||x||, eps)) in 3 ops instead of 7
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(_EPS)
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
    with _no_autocast(queries.device):
        q = _prepare(queries, mt, is_query=True)
        return _scores_prepared(q, _prepare(keys, mt, is_query=False), mt)


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


def _op_budget(device: torch.device, budget: int | None) -> int:
    """Budget handed to an op: resolved now in eager mode; ``-1`` (resolve at run time) while
    ``torch.compile`` traces, so that a varying free-memory figure never becomes a guard."""
    if budget is not None:
        return int(budget)
    if torch.compiler.is_compiling():
        return -1
    return resolve_memory_budget(device)


#: Eager calls take the ``torch.library`` custom ops too when ``True`` (tests compare the paths).
_FORCE_CUSTOM_OPS: bool = False


def _use_custom_ops() -> bool:
    """Whether the search/aggregation/attention go through their ``torch.library`` custom ops.

    Only while ``torch.compile`` traces (the ops keep the graph whole, with fake kernels and
    FLOP formulas); eager calls run the same kernels as plain functions and
    ``autograd.Function`` s, which skip the custom-op dispatch (~0.4 ms per call) and the
    ``torch._dynamo`` import that the first custom-op call pays (~1 s, ~150 MiB).
    """
    return _FORCE_CUSTOM_OPS or torch.compiler.is_compiling()


def _arange(start: int, end: int | None = None, *, device: torch.device, scale: int = 1) -> Tensor:
    """``torch.arange(start, end) * scale`` (int64) on ``device``.

    Eager: one shared constant per (range, device), built once (no per-call allocation and
    launch); never modify it in place. While compiling: a fresh arange, a constant of the graph.
    """
    if end is None:
        start, end = 0, start
    if torch.compiler.is_compiling():
        return torch.arange(start * scale, end * scale, scale, device=device)
    return _cached_arange(start * scale, end * scale, scale, torch.device(device))


@functools.lru_cache(maxsize=1024)
def _cached_arange(start: int, end: int, step: int, device: torch.device) -> Tensor:
    return torch.arange(start, end, step, device=device)


def _offsets(start: int, end: int, scale: int, device: torch.device, dims: int) -> Tensor:
    """:func:`_arange` (``start``..``end`` times ``scale``) shaped (n, 1, ...) with ``dims``
    dimensions, for broadcasting over the trailing ones (a cached view in eager mode)."""
    shape = (end - start,) + (1,) * (dims - 1)
    if torch.compiler.is_compiling():
        return _arange(start, end, device=device, scale=scale).view(shape)
    return _cached_offsets(start, end, scale, torch.device(device), shape)


@functools.lru_cache(maxsize=1024)
def _cached_offsets(
    start: int, end: int, scale: int, device: torch.device, shape: tuple[int, ...]
) -> Tensor:
    return _cached_arange(start * scale, end * scale, scale, device).view(shape)


def _const(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim ``value`` of ``dtype`` on ``device``: an operand that ATen does not wrap and cast
    per call as it does a Python scalar (each wrap is a ``to``/``copy`` chain of 4 ops).

    Eager: one shared constant per (value, dtype, device); never modify it in place. While
    compiling: a fresh tensor, a constant of the graph.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(value, dtype=dtype, device=device)
    return _cached_const(value, dtype, torch.device(device))


@functools.lru_cache(maxsize=256)
def _cached_const(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the (no-op) dispatch when it already has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)


_NO_CONTEXT = contextlib.nullcontext()  # stateless and reentrant: one shared instance


def _autocast_to_disable(device: torch.device) -> bool:
    """Whether :func:`_no_autocast` enters ``torch.autocast(enabled=False)`` on ``device``
    (callers on a hot path test this and skip the ``with`` statement altogether)."""
    return device.type != "meta" and (
        torch.compiler.is_compiling() or torch.is_autocast_enabled(device.type)
    )


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``; a no-op on ``meta`` (no autocast there: shape-only runs,
    such as the check that a step creates no host tensor, go through the same code) and, in
    eager mode, where autocast is off already (entering ``torch.autocast`` costs a few µs)."""
    if not _autocast_to_disable(device):
        return _NO_CONTEXT
    return torch.autocast(device_type=device.type, enabled=False)
