"""Straightforward dense ConvNN, written the way the original code does it, for comparisons.

Full score matrix → (stable) top-K → expand the input K times → gather → stride-K ``Conv1d``.
Taken from the library: the candidate draw (an input, not the computation) and the score
formula ``pairwise_scores`` used by :func:`dense_knn`, so that numerically tied scores (padded
tokens, symmetric coordinates) rank the same; :func:`dense_scores` checks that formula itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convnn.functional import pairwise_scores


def dense_scores(q: Tensor, k: Tensor, magnitude_type: str) -> Tensor:
    """(B, Nq, Nk) larger-is-better scores, computed the plain way in float64."""
    q, k = q.double(), k.double()
    if magnitude_type in ("cosine", "similarity"):
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return qn @ kn.transpose(1, 2)
    if magnitude_type in ("euclidean", "distance"):
        # channel by channel, so equal keys give bit-identical distances (exact ties)
        d2 = torch.zeros(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
        for c in range(q.shape[-1]):
            d2 += (q[..., c].unsqueeze(2) - k[..., c].unsqueeze(1)) ** 2
        return -d2
    return q @ k.transpose(1, 2) / q.shape[-1] ** 0.5


def dense_knn(
    q: Tensor,
    k: Tensor,
    K: int,
    magnitude_type: str,
    query_positions: Tensor,
    candidates: Tensor | None = None,
) -> Tensor:
    """Self at slot 0, then the K-1 best other candidates; ties → lower key index."""
    scores = pairwise_scores(q, k, magnitude_type)
    b, nq, nk = scores.shape
    allowed = torch.zeros(nk, dtype=torch.bool)
    allowed[candidates if candidates is not None else slice(None)] = True
    mask = allowed.view(1, 1, nk).expand(b, nq, nk).clone()
    mask[:, torch.arange(nq), query_positions] = False  # self is never a candidate
    scores = scores.masked_fill(~mask, float("-inf"))
    order = torch.argsort(-scores, dim=-1, stable=True)[..., : K - 1]
    selfs = query_positions.view(1, nq, 1).expand(b, nq, 1)
    # fewer than K-1 other candidates (K-1 == M with self among them): self fills the gap
    order = torch.where(scores.gather(-1, order) == float("-inf"), selfs, order)
    return torch.cat([selfs, order], dim=-1)


def reference_forward(layer, x: Tensor, candidates: Tensor | None = None) -> Tensor:
    """Output of a :class:`convnn.Conv1dNN`/:class:`convnn.Conv2dNN` computed densely.

    ``candidates`` must be the layer's draw for this call (None for ``all``).
    """
    d = layer.spatial_dims
    s = layer.shuffle_scale
    if layer.shuffle_pattern in ("B", "BA"):
        if d == 2:
            x = F.pixel_unshuffle(x, s)
        else:
            b, c, t = x.shape
            x = x.reshape(b, c, t // s, s).permute(0, 1, 3, 2).reshape(b, c * s, t // s)
    b, _, *shape = x.shape
    p = layer.padding
    xp = F.pad(x, (p, p) * d)
    padded = xp.shape[2:]
    feats = xp.flatten(2)  # (B, C, Np)
    if d == 2:
        hp, wp = padded
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, hp, dtype=x.dtype),
            torch.linspace(-1, 1, wp, dtype=x.dtype),
            indexing="ij",
        )
        coords = torch.stack([xs, ys]).flatten(1)
        rows = torch.arange(shape[0]) + p
        cols = torch.arange(shape[1]) + p
        qpos = (rows[:, None] * wp + cols[None, :]).flatten()
    else:
        coords = torch.linspace(-1, 1, padded[0], dtype=x.dtype).view(1, -1)
        qpos = torch.arange(shape[0]) + p
    coords = coords.unsqueeze(0).expand(b, -1, -1)
    if layer.similarity_type == "Col":
        search = feats
    elif layer.similarity_type == "Loc":
        search = coords
    else:
        # reduce in token-major order like the library, so tied scores round identically
        std = feats.transpose(1, 2).reshape(b, -1).std(dim=1).view(b, 1, 1)
        lam = layer.lambda_param
        search = torch.cat([lam * feats / (std + 1e-6), (1 - lam) * coords], dim=1)
    values = feats if layer.aggregation_type == "Col" else torch.cat([feats, coords], dim=1)
    st = search.transpose(1, 2).contiguous()  # same memory layout as the library → same rounding
    with torch.no_grad():
        idx = dense_knn(st[:, qpos], st, layer.K, layer.magnitude_type, qpos, candidates)
    if layer.similarity_type == "Loc":
        idx = idx.sort(dim=-1).values
    c = values.shape[1]
    nq, kk = idx.shape[1], idx.shape[2]
    flat_idx = idx.reshape(b, 1, nq * kk).expand(b, c, nq * kk)  # K-fold index, as the original
    gathered = torch.gather(values, 2, flat_idx)  # (B, C, Nq·K)
    out = F.conv1d(gathered, layer.weight, layer.bias, stride=kk)
    out = out.reshape(b, -1, *shape)
    if layer.shuffle_pattern in ("A", "BA"):
        if d == 2:
            out = F.pixel_shuffle(out, s)
        else:
            b, c, t = out.shape
            out = out.reshape(b, c // s, s, t).permute(0, 1, 3, 2).reshape(b, c // s, t * s)
    return out
