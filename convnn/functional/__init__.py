"""Shared core of every ConvNN layer: neighbour search, gather, aggregation and coordinates.

One concept per module, the way ``torch.nn.functional`` keeps one family per file:
:mod:`~convnn.functional.budget` (metrics, scores and the per-device memory budget),
:mod:`~convnn.functional.topk` (exact top-K), :mod:`~convnn.functional.search` (the search op),
:mod:`~convnn.functional.aggregation` (gather and the aggregation op),
:mod:`~convnn.functional.attention` (the attention op) and
:mod:`~convnn.functional.coordinates`. Every public name is re-exported here.

Conventions used throughout:

* tensors are **channels-last**: queries/keys/values are ``(B, N, C)``;
* scores are "larger is better" and computed in (at least) float32, autocast disabled;
* ties break towards the **lower key index**, deterministically; a NaN score ranks below every
  other score (it is never selected ahead of a finite one);
* neighbour indices ``idx`` are ``(B, Nq, K)`` LongTensors into the key/value tokens, in rank order.

The search never holds more than one block of the ``B × Nq × Nk`` score matrix; the block size
follows a per-device memory budget (:func:`resolve_memory_budget`). Aggregation recomputes its
gather per block in backward, so the ``(B, N, K, C)`` neighbour tensor is never kept alive for
autograd.

No function here asks the host for a tensor value (no ``.item()``, ``nonzero`` or ``bool(t)``):
on a GPU the whole search and aggregation is queued without draining the stream. While
``torch.compile`` traces, the search, aggregation and attention are ``torch.library`` custom ops
(opaque calls in its graph: no graph break, no recompilation per layer, FLOP formulas in
:mod:`~convnn.functional.flops`); eager calls run the same kernels as plain functions and
``autograd.Function`` s, without the custom-op dispatch and its ``torch._dynamo`` import.

The budget settings (:data:`MEMORY_BUDGET`, :data:`CPU_MEMORY_BUDGET`,
:data:`CUDA_MEMORY_FRACTION`) live in :mod:`~convnn.functional.budget`; reading or assigning
them here (``convnn.functional.MEMORY_BUDGET = 256 * 2**20``) reads or sets that one copy.
"""

from __future__ import annotations

import sys
import types
from typing import Any

# ``_x as _x``: private helpers other modules and tests use, re-exported under their old names
from convnn.functional import budget as _budget
from convnn.functional.aggregation import _agg_chunks as _agg_chunks
from convnn.functional.aggregation import aggregate_neighbors, gather_neighbors
from convnn.functional.attention import (
    ATTEND_MODES,
    DISTANCE_EPS,
    attend_neighbors,
    attend_projected,
    attention_gates,
    gate_dropout_mask,
    project_heads,
    selected_scores,
)
from convnn.functional.budget import (
    MAGNITUDE_ALIASES,
    MAGNITUDE_TYPES,
    MEMORY_BUDGET_ENV,
    canonical_magnitude,
    pairwise_scores,
    resolve_memory_budget,
)
from convnn.functional.budget import _chunks as _chunks
from convnn.functional.budget import _op_budget as _op_budget
from convnn.functional.coordinates import coordinate_grid_1d, coordinate_grid_2d
from convnn.functional.search import _search_bytes_per_query as _search_bytes_per_query
from convnn.functional.search import knn_search
from convnn.functional.topk import _block_width as _block_width
from convnn.functional.topk import _exact_topk as _exact_topk
from convnn.functional.topk import _keyed_topk as _keyed_topk
from convnn.functional.topk import _repaired_topk as _repaired_topk
from convnn.functional.topk import _search_width as _search_width

__all__ = [
    "ATTEND_MODES",
    "CPU_MEMORY_BUDGET",
    "CUDA_MEMORY_FRACTION",
    "DISTANCE_EPS",
    "MAGNITUDE_ALIASES",
    "MAGNITUDE_TYPES",
    "MEMORY_BUDGET",
    "MEMORY_BUDGET_ENV",
    "aggregate_neighbors",
    "attend_neighbors",
    "attend_projected",
    "attention_gates",
    "canonical_magnitude",
    "coordinate_grid_1d",
    "coordinate_grid_2d",
    "gate_dropout_mask",
    "gather_neighbors",
    "knn_search",
    "pairwise_scores",
    "project_heads",
    "resolve_memory_budget",
    "selected_scores",
]


def _setting(name: str, doc: str) -> property:
    """A package attribute that reads and writes ``budget.<name>``, the one copy that
    :func:`resolve_memory_budget` reads at call time."""

    def get(module: types.ModuleType) -> Any:
        return getattr(_budget, name)

    def set_(module: types.ModuleType, value: Any) -> None:
        setattr(_budget, name, value)

    return property(get, set_, doc=doc)


class _Package(types.ModuleType):
    """This package's module type: the budget settings are properties forwarding to ``budget``
    (so ``convnn.functional.MEMORY_BUDGET = n`` and ``monkeypatch.setattr`` keep working)."""

    MEMORY_BUDGET = _setting("MEMORY_BUDGET", "Bytes per work block on every device, or None.")
    CPU_MEMORY_BUDGET = _setting("CPU_MEMORY_BUDGET", "Default budget off CUDA (bytes).")
    CUDA_MEMORY_FRACTION = _setting("CUDA_MEMORY_FRACTION", "Share of free CUDA memory.")

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_SETTINGS})


_SETTINGS = ("MEMORY_BUDGET", "CPU_MEMORY_BUDGET", "CUDA_MEMORY_FRACTION")
sys.modules[__name__].__class__ = _Package
