"""ConvNN layers with hard neighbour selection: :class:`Conv1dNN`, :class:`Conv2dNN`.

Both are built on :class:`ConvNNBase`, which owns everything that is not the "mix" step
(argument validation, shuffles, padding, coordinates, search features, candidate sampling,
reshaping). ConvNN-Attention layers reuse the same base and replace only :meth:`ConvNNBase.mix`.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.functional import (
    _op_budget,
    aggregate_neighbors,
    canonical_magnitude,
    coordinate_grid_1d,
    coordinate_grid_2d,
    knn_search,
)
from convnn.recording import note_selection
from convnn.sampling import CandidateSampler, device_indices
from convnn.shuffle import check_scale, pixel_shuffle_1d, pixel_unshuffle_1d

__all__ = [
    "AGGREGATION_TYPES",
    "SHUFFLE_PATTERNS",
    "SIMILARITY_TYPES",
    "Conv1dNN",
    "Conv1d_NN",
    "Conv2dNN",
    "Conv2d_NN",
    "ConvNNBase",
    "TokenMap",
    "check_floating",
    "forwards_keywords",
]

SIMILARITY_TYPES: tuple[str, ...] = ("Col", "Loc", "Loc_Col")
AGGREGATION_TYPES: tuple[str, ...] = ("Col", "Loc_Col")
SHUFFLE_PATTERNS: tuple[str, ...] = ("NA", "B", "A", "BA")
_STD_EPS = 1e-6
_Init = TypeVar("_Init", bound=Callable[..., Any])


def forwards_keywords(target: Callable[..., Any]) -> Callable[[_Init], _Init]:
    """Decorator for an ``__init__`` that passes ``**kwargs`` on to ``target``.

    The decorated function's signature and type hints become its own parameters followed by
    ``target``'s defaulted ones (keyword-only), so ``help()``, IDEs and the config schemas
    (``inspect.signature``, ``typing.get_type_hints``) see every keyword, each declared once.
    """

    def decorate(init: _Init) -> _Init:
        own = inspect.signature(init)
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in own.parameters.values()}
        extra = [
            p.replace(kind=p.KEYWORD_ONLY)
            for p in inspect.signature(target).parameters.values()
            if p.name not in names
            and p.default is not p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        params += extra
        hints = {**typing.get_type_hints(target), **typing.get_type_hints(init)}
        kept = {p.name for p in params} | {"return"}
        init.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        init.__annotations__ = {k: v for k, v in hints.items() if k in kept}
        return init

    return decorate


class TokenMap(NamedTuple):
    """One call's prepared inputs, handed to :meth:`ConvNNBase.mix` (channels-last).

    ``features`` (B, Np, C') are the padded map's tokens (after unshuffle), ``coords``
    (B, Np, d) their coordinates or ``None`` when unused, ``search`` (B, Np, Ds) the search
    features, ``values`` (B, Np, Cv) the features to aggregate, ``query_positions`` (Nq,) the
    original (unpadded) positions among the Np tokens, ``candidates`` (M,) or ``None`` (all),
    ``shape`` the unpadded spatial shape after unshuffle, ``memory_budget`` the work-block
    budget of this call (resolved once per forward; ``-1`` = resolve inside the ops).
    """

    features: Tensor
    coords: Tensor | None
    search: Tensor
    values: Tensor
    query_positions: Tensor
    candidates: Tensor | None
    shape: tuple[int, ...]
    memory_budget: int | None = None


def check_floating(module: nn.Module, x: Tensor) -> None:
    """Raise ``TypeError`` for a non-floating input: weights would be silently cast to it."""
    if not x.is_floating_point():
        raise TypeError(
            f"{type(module).__name__} expects a floating-point input, got dtype {x.dtype}"
        )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")
    return str(value)


class ConvNNBase(nn.Module):
    """Shared pipeline of ConvNN-style layers over 1-D (B, C, T) or 2-D (B, C, H, W) inputs.

    ``forward``: PixelUnshuffle (pattern B/BA) → zero padding p → coordinate channels → search
    features (Col / Loc / Loc_Col) and aggregated values (Col / Loc_Col) → :meth:`mix` →
    outputs at the original positions only → PixelShuffle (pattern A/BA).

    Extension point: a subclass implements ``mix(tokens: TokenMap) -> Tensor`` returning
    (B, Nq, ``mix_out_channels``) for the queries ``tokens.query_positions`` (raster order of
    the unpadded map). Everything it needs is in :class:`TokenMap`; :meth:`select_neighbors`
    is the standard search (self at slot 0, raster re-sort for ``Loc``). Sizes prepared for the
    subclass: ``token_channels`` (C·s^d with pattern B/BA), ``value_channels`` (+ d coordinate
    channels with ``aggregation_type="Loc_Col"``), ``mix_out_channels`` (O·s^d with A/BA).
    The module keeps no per-call state.
    """

    spatial_dims: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        K: int = 9,
        *,
        sampling_type: str = "all",
        num_samples: int = -1,
        sample_padding: int = 0,
        magnitude_type: str = "cosine",
        padding: int = 0,
        shuffle_pattern: str = "NA",
        shuffle_scale: int = 1,
        similarity_type: str = "Col",
        aggregation_type: str = "Col",
        lambda_param: float = 0.5,
        eval_sampling: str = "fixed",
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.sampler = CandidateSampler(sampling_type, num_samples, sample_padding, eval_sampling)
        self.sampler.check_k(K)
        self.K = int(K)
        self.magnitude_type = canonical_magnitude(magnitude_type)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding={padding!r} must be an integer >= 0")
        self.padding = padding
        self.shuffle_pattern = _choice("shuffle_pattern", shuffle_pattern, SHUFFLE_PATTERNS)
        self.shuffle_scale = check_scale("shuffle_scale", shuffle_scale)
        self.similarity_type = _choice("similarity_type", similarity_type, SIMILARITY_TYPES)
        self.aggregation_type = _choice("aggregation_type", aggregation_type, AGGREGATION_TYPES)
        if (
            isinstance(lambda_param, bool)
            or not isinstance(lambda_param, (int, float))
            or not 0.0 <= float(lambda_param) <= 1.0
        ):
            raise ValueError(f"lambda_param={lambda_param!r} must be a number in [0, 1]")
        self.lambda_param = float(lambda_param)

        d = self.spatial_dims
        s = self.shuffle_scale
        self.unshuffle_before = self.shuffle_pattern in ("B", "BA")
        self.shuffle_after = self.shuffle_pattern in ("A", "BA")
        self.token_channels = in_channels * (s**d if self.unshuffle_before else 1)
        self.use_coords = self.similarity_type != "Col" or self.aggregation_type == "Loc_Col"
        self.value_channels = self.token_channels + (d if self.aggregation_type == "Loc_Col" else 0)
        self.mix_out_channels = out_channels * (s**d if self.shuffle_after else 1)

    # -------------------------------------------------------------------------------- API
    @property
    def sampling_type(self) -> str:
        return self.sampler.sampling_type

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    @property
    def sample_padding(self) -> int:
        return self.sampler.sample_padding

    @property
    def eval_sampling(self) -> str:
        return self.sampler.eval_sampling

    def mix(self, tokens: TokenMap) -> Tensor:
        """Map the prepared tokens to (B, Nq, ``mix_out_channels``); subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement mix()")

    def select_neighbors(self, tokens: TokenMap) -> Tensor:
        """Standard hard selection (B, Nq, K): self at slot 0, then the K-1 best candidates;
        with ``similarity_type="Loc"`` the indices are re-sorted into raster order."""
        search = tokens.search
        # the queries are the search features at the query positions (None: taken inside the
        # search from the prepared keys, so they are not normalised a second time)
        queries = search if search.shape[1] == tokens.query_positions.shape[0] else None
        candidates = tokens.candidates
        if candidates is None and self.padding and self.similarity_type == "Col":
            candidates = self._without_surplus_padding(tokens)
        idx = knn_search(
            queries,
            search,
            self.K,
            self.magnitude_type,
            candidates=candidates,
            query_positions=tokens.query_positions,
            include_self=True,
            memory_budget=tokens.memory_budget,
        )
        if self.similarity_type == "Loc":
            idx = idx.sort(dim=-1).values
        note_selection(self, tokens, idx, None)  # no-op unless convnn.record_neighbors is active
        return idx

    def forward(self, x: Tensor) -> Tensor:
        d = self.spatial_dims
        if x.dim() != d + 2 or x.shape[1] != self.in_channels:
            layout = "(B, C, T)" if d == 1 else "(B, C, H, W)"
            raise ValueError(
                f"{type(self).__name__} expects input {layout} with C={self.in_channels}, "
                f"got shape {tuple(x.shape)}"
            )
        check_floating(self, x)
        if self.unshuffle_before:
            self._check_divisible(tuple(x.shape[2:]))
            s = self.shuffle_scale
            x = pixel_unshuffle_1d(x, s) if d == 1 else F.pixel_unshuffle(x, s)
        tokens = self.prepare_tokens(x)
        out = self.mix(tokens)  # (B, Nq, O')
        out = out.transpose(1, 2)  # contiguous when mix returns a channels-first buffer's view
        shape = (x.shape[0], self.mix_out_channels, *tokens.shape)
        out = out.view(shape) if out.is_contiguous() else out.reshape(shape)
        if self.shuffle_after:
            s = self.shuffle_scale
            out = pixel_shuffle_1d(out, s) if d == 1 else F.pixel_shuffle(out, s)
        return out

    def prepare_tokens(self, x: Tensor) -> TokenMap:
        """Pad, add coordinates and build search features/values of a (B, C', *shape) map."""
        b = x.shape[0]
        shape = tuple(x.shape[2:])
        p = self.padding
        padded = tuple(n + 2 * p for n in shape)
        # channels-last once: shared by the search and the gather (no further copies)
        if p and torch.is_grad_enabled() and x.requires_grad:
            # zero padding written straight into the channels-last buffer (fewer ops)
            feats = _PadChannelsLast.apply(x, p)  # (B, Np, C')
        elif p:  # no gradient: the same kernel without the autograd.Function's call overhead
            feats = _pad_channels_last(x, p)
        else:
            feats = x.flatten(2).transpose(1, 2).contiguous()  # (B, N, C')
        coords = None
        if self.use_coords:
            if self.spatial_dims == 1:
                grid = coordinate_grid_1d(padded[0], device=x.device, dtype=x.dtype)
            else:
                grid = coordinate_grid_2d(*padded, device=x.device, dtype=x.dtype)
            coords = grid.flatten(1).t().unsqueeze(0).expand(b, -1, -1)
        if self.similarity_type == "Col":
            search = feats
        elif self.similarity_type == "Loc":
            search = coords
        else:
            std = feats.reshape(b, -1).std(dim=1).view(b, 1, 1)
            lam = self.lambda_param
            search = torch.cat([lam * feats / (std + _STD_EPS), (1.0 - lam) * coords], dim=-1)
        values = feats if self.aggregation_type == "Col" else torch.cat([feats, coords], dim=-1)
        qpos = self._query_positions(shape, x.device)
        cand = self.sampler.candidates(shape, p, K=self.K, training=self.training, device=x.device)
        budget = _op_budget(x.device, None)
        return TokenMap(feats, coords, search, values, qpos, cand, shape, budget)

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}, K={self.K}",
            f"sampling_type={self.sampling_type!r}",
        ]
        if self.sampling_type != "all":
            parts.append(f"num_samples={self.num_samples}")
        if self.sampling_type == "spatial":
            parts.append(f"sample_padding={self.sample_padding}")
        if self.sampling_type == "random":
            parts.append(f"eval_sampling={self.eval_sampling!r}")
        parts += [f"magnitude_type={self.magnitude_type!r}", f"padding={self.padding}"]
        if self.shuffle_pattern != "NA":
            parts.append(f"shuffle_pattern={self.shuffle_pattern!r}")
            parts.append(f"shuffle_scale={self.shuffle_scale}")
        parts.append(f"similarity_type={self.similarity_type!r}")
        parts.append(f"aggregation_type={self.aggregation_type!r}")
        if self.similarity_type == "Loc_Col":
            parts.append(f"lambda_param={self.lambda_param}")
        return ", ".join(parts)

    # ---------------------------------------------------------------------------- helpers
    def _without_surplus_padding(self, tokens: TokenMap, count: int | None = None) -> Tensor | None:
        """Every real token and only the ``count`` (default K - 1) lowest-index padding tokens,
        or ``None``.

        Zero padding tokens are identical search features, so they all get the same score and
        ties go to the lower index: a query searching for ``count`` neighbours besides itself
        can only ever pick the ``count`` first of them. Searching over the others is wasted work
        (11 % of a padded 32×32 map, 28 % of an 8×8 one); the result is the same as searching
        all tokens.
        """
        device = tokens.query_positions.device
        count = self.K - 1 if count is None else count
        if torch.compiler.is_compiling():
            return _search_candidates(tokens.shape, self.padding, count, device)
        # one shared constant per configuration: the search caches its bookkeeping on it
        return _cached_search_candidates(tokens.shape, self.padding, count, device)

    def _check_divisible(self, shape: tuple[int, ...]) -> None:
        s = self.shuffle_scale
        if any(n % s for n in shape):
            raise ValueError(
                f"input spatial shape {shape} is not divisible by shuffle_scale={s} "
                f"(shuffle_pattern={self.shuffle_pattern!r})"
            )

    def _query_positions(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Flat indices of the unpadded positions inside the padded map, in raster order: a
        shared constant per (shape, padding, device) in eager mode (do not modify it)."""
        if torch.compiler.is_compiling():
            return _query_positions(shape, self.padding, device)
        return _cached_query_positions(shape, self.padding, torch.device(device))


def _query_positions(shape: tuple[int, ...], p: int, device: torch.device) -> Tensor:
    if len(shape) == 1:
        return torch.arange(shape[0], device=device) + p
    h, w = shape
    rows = torch.arange(h, device=device) + p
    cols = torch.arange(w, device=device) + p
    return (rows.view(-1, 1) * (w + 2 * p) + cols.view(1, -1)).reshape(-1)


_cached_query_positions = functools.lru_cache(maxsize=256)(_query_positions)


def _search_candidates(
    shape: tuple[int, ...], p: int, count: int, device: torch.device
) -> Tensor | None:
    """The real tokens, then the first ``count`` padding tokens (``None``: every token)."""
    pads = _first_padding_positions(shape, p, count)
    if pads is None:
        return None
    return torch.cat([_query_positions(shape, p, device), device_indices(pads, device)])


_cached_search_candidates = functools.lru_cache(maxsize=256)(_search_candidates)


def _first_padding_positions(shape: tuple[int, ...], p: int, count: int) -> tuple[int, ...] | None:
    """Raster indices of the first ``count`` padding tokens of a map of unpadded ``shape``
    padded by ``p``; ``None`` when the map has no more than ``count`` padding tokens. Plain
    Python on shapes (stops after ``count`` finds, usually within the first padded row)."""
    padded = [n + 2 * p for n in shape]
    if math.prod(padded) - math.prod(shape) <= count:
        return None
    found: list[int] = []
    for flat in range(math.prod(padded)):
        if len(found) == count:
            break
        rest, inside = flat, True
        for size, n in zip(reversed(padded), reversed(shape), strict=True):
            rest, pos = divmod(rest, size)
            inside = inside and p <= pos < n + p
        if not inside:
            found.append(flat)
    return tuple(found)


def _interior(t: Tensor, p: int, padded: tuple[int, ...]) -> Tensor:
    """(B, C, *shape) view of the unpadded part of contiguous channels-last tokens (B, Np, C)
    of a map padded by ``p`` to ``padded``: one ``as_strided`` instead of slices and a permute."""
    b, _, c = t.shape
    if torch.compiler.is_compiling():  # dynamo cannot trace storage_offset(): plain views
        grid = t.view(b, *padded, c)
        return (grid[:, p:-p] if len(padded) == 1 else grid[:, p:-p, p:-p]).movedim(-1, 1)
    shape, strides, offset = _interior_layout(b, c, p, padded, t.stride(0))
    return t.as_strided(shape, strides, t.storage_offset() + offset)


@functools.lru_cache(maxsize=256)
def _interior_layout(
    b: int, c: int, p: int, padded: tuple[int, ...], batch_stride: int
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Shape, strides and storage offset of :func:`_interior`'s view (plain Python, cached)."""
    spatial = [c]  # strides of the padded spatial dims, last first
    for n in reversed(padded[1:]):
        spatial.insert(0, spatial[0] * n)
    offset = p * sum(spatial)  # the token at (p, p, ...)
    shape = (b, c, *(n - 2 * p for n in padded))
    return shape, (batch_stride, 1, *spatial), offset


def _pad_channels_last(x: Tensor, p: int) -> Tensor:
    """(B, C, *shape) -> zero-padded channels-last tokens (B, Np, C): one buffer, one copy."""
    b, c = x.shape[:2]
    padded = tuple(n + 2 * p for n in x.shape[2:])
    feats = torch.zeros(b, math.prod(padded), c, dtype=x.dtype, device=x.device)
    _interior(feats, p, padded).copy_(x)
    return feats


class _PadChannelsLast(torch.autograd.Function):
    """:func:`_pad_channels_last` with a backward that is a view of the incoming gradient's
    interior (no autograd copy nodes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: int) -> Tensor:
        ctx.p, ctx.padded = p, tuple(n + 2 * p for n in x.shape[2:])
        return _pad_channels_last(x, p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _interior(grad.contiguous(), ctx.p, ctx.padded), None


class _ConvNNHard(ConvNNBase):
    """Hard selection (g = 1) aggregated by a Conv1d-layout filter ``weight`` (O', Cv, K)."""

    @forwards_keywords(ConvNNBase.__init__)
    def __init__(self, in_channels: int, out_channels: int, K: int = 9, **kwargs: Any) -> None:
        super().__init__(in_channels, out_channels, K, **kwargs)
        self.weight = nn.Parameter(torch.empty(self.mix_out_channels, self.value_channels, self.K))
        self.bias = nn.Parameter(torch.empty(self.mix_out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv1d``'s default initialisation (fan-in = Cv · K)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.value_channels * self.K)
        nn.init.uniform_(self.bias, -bound, bound)

    def mix(self, tokens: TokenMap) -> Tensor:
        idx = self.select_neighbors(tokens)
        return aggregate_neighbors(
            tokens.values, idx, self.weight, self.bias, memory_budget=tokens.memory_budget
        )


class Conv1dNN(_ConvNNHard):
    """ConvNN over a sequence (B, C, T) → (B, O, T'): each token's K nearest tokens in feature
    space, aggregated by a learned (O, C, K) filter over their rank."""

    spatial_dims = 1


class Conv2dNN(_ConvNNHard):
    """ConvNN over an image (B, C, H, W) → (B, O, H', W'): each pixel's K nearest pixels in
    feature space, aggregated by a learned (O, C, K) filter over their rank."""

    spatial_dims = 2


Conv1d_NN = Conv1dNN
Conv2d_NN = Conv2dNN
