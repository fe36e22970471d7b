"""Opt-in recording of the neighbours that ConvNN-family layers select.

``with convnn.record_neighbors(model) as records: model(x)`` fills ``records`` with one
:class:`NeighborRecord` per call of every ConvNN layer (:class:`~convnn.Conv1dNN`,
:class:`~convnn.Conv2dNN`, ConvNN-Attention, and the mixers and Branching blocks built on them),
keyed by the module path. Outside the context nothing is recorded and the layers keep no state:
the only cost is one context-variable lookup per layer call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NeighborRecord", "is_recording", "note_selection", "record_neighbors"]


@dataclass(frozen=True)
class NeighborRecord:
    """One layer call's selection, on the CPU.

    ``indices`` (B, heads, Nq, K): each query's K neighbours as flat raster indices into the
    padded token map of shape ``grid`` (after pixel-unshuffle); ``weights`` (B, heads, Nq, K)
    the gates over the K for attention layers (``None`` for hard ConvNN); ``query_positions``
    (Nq,) each query's own index in that map. ``shape`` is the unpadded map, ``padding`` the
    zero padding on every side, ``shuffle_scale`` how many input positions one token spans per
    axis (1 without unshuffle), ``input_shape`` the spatial shape of the layer's input and
    ``normalized_weights`` whether ``weights`` are a softmax (a distribution over the K).
    """

    indices: Tensor
    weights: Tensor | None
    query_positions: Tensor
    grid: tuple[int, ...]
    shape: tuple[int, ...]
    padding: int
    shuffle_scale: int
    input_shape: tuple[int, ...]
    normalized_weights: bool
    layer_type: str

    @property
    def spatial_dims(self) -> int:
        """1 for sequences, 2 for images."""
        return len(self.grid)

    def coordinates(self) -> Tensor:
        """(Np, d) integer coordinates of every padded-map token in the unpadded frame
        (padding tokens have coordinates < 0 or ≥ ``shape``)."""
        flat = torch.arange(int(torch.tensor(self.grid).prod()))
        if self.spatial_dims == 1:
            return (flat - self.padding).unsqueeze(1)
        w = self.grid[1]
        return torch.stack([flat // w, flat % w], dim=1) - self.padding

    def is_padding(self) -> Tensor:
        """(Np,) True for the zero-padding tokens."""
        xy = self.coordinates()
        inside = (xy >= 0) & (xy < torch.tensor(self.shape))
        return ~inside.all(dim=1)


class _Recorder:
    """Collects records for the modules of one model (path by module identity)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.records: dict[str, NeighborRecord] = {}

    def add(self, module: Any, tokens: Any, idx: Tensor, weights: Tensor | None) -> None:
        path = self.names.get(id(module), type(module).__name__)
        key, n = path, 1
        while key in self.records:
            key, n = f"{path}#{n}", n + 1
        b = tokens.features.shape[0]
        heads = idx.shape[0] // b
        p = int(getattr(module, "padding", 0))
        s = int(module.shuffle_scale) if getattr(module, "unshuffle_before", False) else 1
        shape = tuple(int(v) for v in tokens.shape)
        gates = None
        if weights is not None:
            gates = weights.detach().float().reshape(b, heads, *weights.shape[1:]).cpu()
        self.records[key] = NeighborRecord(
            indices=idx.detach().reshape(b, heads, *idx.shape[1:]).cpu(),
            weights=gates,
            query_positions=tokens.query_positions.detach().cpu(),
            grid=tuple(side + 2 * p for side in shape),
            shape=shape,
            padding=p,
            shuffle_scale=s,
            input_shape=tuple(n * s for n in shape),
            normalized_weights=bool(getattr(module, "softmax_topk_val", True)),
            layer_type=type(module).__name__,
        )


_ACTIVE: ContextVar[_Recorder | None] = ContextVar("convnn_neighbor_recorder", default=None)


def is_recording() -> bool:
    """Whether a :func:`record_neighbors` block is active (layers skip recording work otherwise)."""
    return _ACTIVE.get() is not None


def note_selection(module: nn.Module, tokens: Any, idx: Tensor, weights: Tensor | None) -> None:
    """Called by the layers where neighbours are selected; records only inside
    :func:`record_neighbors`."""
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.add(module, tokens, idx, weights)


@contextmanager
def record_neighbors(model: nn.Module) -> Iterator[dict[str, NeighborRecord]]:
    """Record the selections of every ConvNN layer of ``model`` run inside the block.

    Yields a dict filled as the model runs: module path → :class:`NeighborRecord` (a module
    called twice gets ``path#1`` for its second call).
    """
    recorder = _Recorder({id(m): name for name, m in model.named_modules()})
    token = _ACTIVE.set(recorder)
    try:
        yield recorder.records
    finally:
        _ACTIVE.reset(token)
