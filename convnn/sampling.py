"""Candidate sampling shared by every ConvNN layer ``all``, ``random``, ``spatial``.

A :class:`CandidateSampler` turns a (padded) token map into the candidate key indices that the
search may choose from, shared across the batch, or ``None`` for "every token". It holds only
its hyper-parameters: nothing about a call is stored, so one layer serves any input size.
Candidates are made on the layer's device (``random`` from the device's generator, ``spatial``
grids copied once per grid and device), so a forward never waits on a host-to-device copy.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "EVAL_SAMPLING",
    "EVAL_SEED",
    "SAMPLING_TYPES",
    "CandidateSampler",
    "device_indices",
    "grid_positions",
    "hashed_permutation",
]

SAMPLING_TYPES: tuple[str, ...] = ("all", "random", "spatial")
EVAL_SAMPLING: tuple[str, ...] = ("fixed", "random")
#: Seed of the fixed ``random`` candidates in eval (``eval_sampling="fixed"``).
EVAL_SEED: int = 0
_MASK32 = 0xFFFFFFFF


def hashed_permutation(n: int, seed: int, device: torch.device | str | None = None) -> Tensor:
    """A seeded pseudo-random permutation of ``range(n)`` made of tensor ops only.

    Tokens are ordered by a 32-bit integer hash of (index, seed) (two xor-shift-multiply
    rounds; ties by index). No ``torch.Generator`` and no global RNG: the same on every device,
    built on ``device`` directly, and traceable by ``torch.compile`` without a graph break.
    """
    x = torch.arange(n, dtype=torch.int64, device=device)
    x = (x + ((seed * 0x9E3779B1) & _MASK32)) & _MASK32
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = (x >> 16) ^ x
    return torch.argsort(x, stable=True)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def grid_positions(start: int, end: int, n: int) -> list[int]:
    """Sorted distinct ``int(x)`` of ``torch.linspace(start, end, n, dtype=float64)``, in plain
    Python (same formula as the kernel), so that the grid is a constant under ``torch.compile``."""
    if n == 1:
        return [int(float(start))]
    step = (end - start) / (n - 1)
    half = n // 2
    vals = [start + step * i if i < half else end - step * (n - 1 - i) for i in range(n)]
    return sorted({int(v) for v in vals})


class CandidateSampler:
    """Validated candidate policy; call :meth:`candidates` once per forward.

    Args:
        sampling_type: ``all`` (every token), ``random`` (M distinct tokens drawn uniformly per
            call) or ``spatial`` (an n×n grid, n points in 1-D, on the unpadded map).
        num_samples: M for ``random``, n for ``spatial``; ignored by ``all``.
        sample_padding: q, margin of the spatial grid (``linspace(q, H-1-q, n)``).
        eval_sampling: in eval mode ``fixed`` takes ``random`` candidates from
            :func:`hashed_permutation` seeded with ``eval_seed`` (reproducible, the same every
            call and on every device), ``random`` draws fresh ones each call.
        eval_seed: seed for ``eval_sampling="fixed"``.

    Training draws use the global torch RNG (CPU), so seeded runs and resumed runs reproduce.
    """

    def __init__(
        self,
        sampling_type: str = "all",
        num_samples: int = -1,
        sample_padding: int = 0,
        eval_sampling: str = "fixed",
        *,
        eval_seed: int = EVAL_SEED,
    ) -> None:
        if sampling_type not in SAMPLING_TYPES:
            raise ValueError(
                f"sampling_type={sampling_type!r} is not supported; choose one of {SAMPLING_TYPES}"
            )
        if sampling_type != "all" and (not _is_int(num_samples) or num_samples < 1):
            what = "M sampled tokens" if sampling_type == "random" else "n grid points per axis"
            raise ValueError(
                f"num_samples={num_samples!r} must be an integer >= 1 ({what}) "
                f"for sampling_type={sampling_type!r}"
            )
        if not _is_int(sample_padding) or sample_padding < 0:
            raise ValueError(f"sample_padding={sample_padding!r} must be an integer >= 0")
        if eval_sampling not in EVAL_SAMPLING:
            raise ValueError(
                f"eval_sampling={eval_sampling!r} is not supported; choose one of {EVAL_SAMPLING}"
            )
        if not _is_int(eval_seed):
            raise ValueError(f"eval_seed={eval_seed!r} must be an integer")
        self.sampling_type = sampling_type
        self.num_samples = int(num_samples)
        self.sample_padding = int(sample_padding)
        self.eval_sampling = eval_sampling
        self.eval_seed = int(eval_seed)

    @property
    def max_candidates(self) -> int | None:
        """Upper bound on the number of sampled candidates (``None`` for ``all``)."""
        if self.sampling_type == "random":
            return self.num_samples
        if self.sampling_type == "spatial":
            return self.num_samples**2
        return None

    def check_k(self, K: int, *, include_self: bool = True) -> None:
        """Construction-time check that K neighbours can come from the candidates."""
        if not _is_int(K) or K < 1:
            raise ValueError(f"K={K!r} must be an integer >= 1")
        m = self.max_candidates
        if m is not None and (K - 1 if include_self else K) > m:
            bound = m + 1 if include_self else m
            raise ValueError(
                f"K={K} is too large for sampling_type={self.sampling_type!r} with "
                f"num_samples={self.num_samples} ({m} candidates); valid range: 1 <= K <= {bound}"
            )

    def __repr__(self) -> str:
        return (
            f"CandidateSampler({self.sampling_type!r}, num_samples={self.num_samples}, "
            f"sample_padding={self.sample_padding}, eval_sampling={self.eval_sampling!r})"
        )

    def candidates(
        self,
        spatial_shape: tuple[int, ...],
        padding: int = 0,
        *,
        K: int | None = None,
        training: bool = True,
        include_self: bool = True,
        device: torch.device | str | None = None,
    ) -> Tensor | None:
        """Sorted candidate indices (M,) into the padded, flattened map, or ``None`` for all.

        ``spatial_shape`` is the unpadded (H, W) or (T,); ``padding`` p pads every side. When
        ``K`` is given it is checked against the tokens/candidates of this call (errors name the
        shapes). A ``spatial`` grid is shared between calls: do not modify it in place.
        """
        if self.sampling_type == "all" and _all_fit(spatial_shape, padding, K, include_self):
            return None  # every token, K checked already for this shape
        shape = tuple(int(s) for s in spatial_shape)
        padded = tuple(s + 2 * padding for s in shape)
        n_tokens = 1
        for s in padded:
            n_tokens *= s
        cand = self._draw(shape, padded, padding, n_tokens, training, device)
        if K is not None:
            m = n_tokens if cand is None else cand.numel()
            limit = _neighbour_limit(n_tokens, None if cand is None else m, include_self)
            if (K - 1 if include_self else K) > limit:
                bound = limit + 1 if include_self else limit
                raise ValueError(
                    f"K={K} is too large for an input map of spatial shape {shape} with "
                    f"padding={padding} ({n_tokens} tokens, {m} candidates under "
                    f"sampling_type={self.sampling_type!r}); valid range: 1 <= K <= {bound}"
                )
        return None if cand is None else cand.to(device)

    def _draw(
        self,
        shape: tuple[int, ...],
        padded: tuple[int, ...],
        padding: int,
        n_tokens: int,
        training: bool,
        device: torch.device | str | None = None,
    ) -> Tensor | None:
        if self.sampling_type == "random":
            if self.num_samples >= n_tokens:
                return None
            if not training and self.eval_sampling == "fixed":
                perm = hashed_permutation(n_tokens, self.eval_seed, device=device)
            else:
                perm = torch.randperm(n_tokens, device=device)
            return torch.sort(perm[: self.num_samples]).values
        if self.sampling_type == "spatial":
            n, q = self.num_samples, self.sample_padding
            if n >= min(shape):
                return None
            axes = []
            for size in shape:
                if 2 * q > size - 1:
                    raise ValueError(
                        f"sample_padding={q} leaves no grid on an input map of spatial shape "
                        f"{shape}; valid range: 0 <= sample_padding <= {(min(shape) - 1) // 2}"
                    )
                axes.append([p + padding for p in grid_positions(q, size - 1 - q, n)])
            if len(axes) == 1:
                return device_indices(tuple(axes[0]), device)
            rows, cols = axes
            return device_indices(tuple(r * padded[1] + c for r in rows for c in cols), device)
        return None


def _all_fit(
    spatial_shape: tuple[int, ...], padding: int, K: int | None, include_self: bool
) -> bool:
    """Whether ``all`` sampling passes :meth:`CandidateSampler.candidates`' K check for this
    shape: a cached answer in eager mode (``False`` sends the call through the full check,
    which raises the error)."""
    if K is None:
        return True
    if torch.compiler.is_compiling():
        return False
    return _cached_all_fit(tuple(spatial_shape), padding, K, include_self)


@functools.lru_cache(maxsize=256)
def _cached_all_fit(shape: tuple[int, ...], padding: int, K: int, include_self: bool) -> bool:
    n_tokens = math.prod(int(s) + 2 * padding for s in shape)
    return (K - 1 if include_self else K) <= _neighbour_limit(n_tokens, None, include_self)


def _neighbour_limit(n_tokens: int, m: int | None, include_self: bool) -> int:
    """How many neighbours besides a forced self (or in all, without one) a query can get
    from ``m`` sampled candidates, or from all ``n_tokens`` (``None``), its self excluded."""
    if m is None:
        return n_tokens - 1 if include_self else n_tokens
    return m


def device_indices(flat: tuple[int, ...], device: torch.device | str | None) -> Tensor:
    """Constant indices (a spatial grid, padding positions) as a tensor on ``device``, copied
    from the host once per (indices, device) and reused: a blocking host-to-device copy per
    forward waits for the whole GPU stream. The tensor is shared: do not modify it in place."""
    if torch.compiler.is_compiling():
        return torch.tensor(flat, device=device)  # a constant of the compiled graph
    return _cached_indices(flat, torch.device("cpu") if device is None else torch.device(device))


@functools.lru_cache(maxsize=256)
def _cached_indices(flat: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(flat, device=device)
