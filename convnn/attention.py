"""ConvNN-Attention: top-K attention whose selected neighbours are aggregated by a
learned filter over their rank.

For each query token i (per head): q, k, v are 1×1 projections; the K best keys under
``magnitude_type`` are selected (no gradient through selection); ``g`` = softmax over the K
selected scores (or the raw scores; for ``euclidean`` the original's softmax(−‖q − k‖) or
1 / (‖q − k‖ + 1e-8)); the gathered values, weighted by ``g``, are aggregated by a
``standard`` (O, C, K), ``depthwise`` (C, 1, K) or ``depthwise-separable`` filter; an output
projection follows. With depthwise weights at 1 (their initial value), softmax on, ``all``
sampling and K = N, the layer is exactly multi-head softmax attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.functional import (
    attend_projected,
    attention_gates,
    gate_dropout_mask,
    knn_search,
    project_heads,
    selected_scores,
)
from convnn.layers import ConvNNBase, TokenMap, forwards_keywords
from convnn.recording import is_recording, note_selection

__all__ = [
    "CONVOLUTION_TYPES",
    "Conv1dNNAttention",
    "Conv1d_NN_Attn",
    "Conv2dNNAttention",
    "Conv2d_NN_Attn",
    "ConvNNAttention",
]

CONVOLUTION_TYPES: tuple[str, ...] = ("standard", "depthwise", "depthwise-separable")


def _check_attention_args(
    channels: int,
    num_heads: int,
    attention_dropout: float,
    convolution_type: str,
    softmax_topk_val: bool,
    coordinate_encoding: bool,
    attention_bias: bool,
) -> None:
    """Validate the attention-only keywords; every message names argument, value and choices."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be a positive integer")
    if channels % num_heads:
        raise ValueError(
            f"num_heads={num_heads} must divide the attention channels ({channels}); "
            f"valid choices are {[d for d in range(1, channels + 1) if channels % d == 0]}"
        )
    if convolution_type not in CONVOLUTION_TYPES:
        raise ValueError(
            f"convolution_type={convolution_type!r} is not supported; "
            f"choose one of {CONVOLUTION_TYPES}"
        )
    if (
        isinstance(attention_dropout, bool)
        or not isinstance(attention_dropout, (int, float))
        or not 0.0 <= float(attention_dropout) < 1.0
    ):
        raise ValueError(f"attention_dropout={attention_dropout!r} must be a float in [0, 1)")
    for name, value in (
        ("softmax_topk_val", softmax_topk_val),
        ("coordinate_encoding", coordinate_encoding),
        ("attention_bias", attention_bias),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be a bool (True or False)")


class _ConvNNAttentionBase(ConvNNBase):
    """ConvNN-Attention on the shared ConvNN pipeline; only :meth:`mix` differs from ConvNN.

    Channel sizes (C = ``token_channels``, O' = ``mix_out_channels``): ``q_proj``/``k_proj``
    (``nn.Linear``, no bias) project the search features to C, ``v_proj`` the aggregated values
    to C. Heads split C into ``num_heads`` groups of C/h channels (head j owns channels
    j·C/h … (j+1)·C/h − 1) that search and gate independently. The filter, in ``nn.Conv1d``
    layout, is ``weight`` (O', C, K) + ``bias`` for ``standard``; ``weight`` (C, 1, K) (groups=C,
    no bias) for ``depthwise``; the same then ``pointwise_weight`` (O', C, 1) +
    ``pointwise_bias`` for ``depthwise-separable``. ``out_proj`` (``nn.Linear`` with bias) maps
    the filter's channels to O'. ``attention_bias=False`` drops ``bias``, ``pointwise_bias``
    and ``out_proj``'s bias (the original has none). ``coordinate_encoding`` appends the
    coordinate channels to the q/k inputs (unless ``similarity_type`` already has them) and to
    the v input (unless ``aggregation_type="Loc_Col"`` already has them).
    """

    @forwards_keywords(ConvNNBase.__init__)
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        K: int = 9,
        *,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        convolution_type: str = "depthwise",
        softmax_topk_val: bool = True,
        coordinate_encoding: bool = False,
        attention_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, K, **kwargs)
        c = self.token_channels
        _check_attention_args(
            c,
            num_heads,
            attention_dropout,
            convolution_type,
            softmax_topk_val,
            coordinate_encoding,
            attention_bias,
        )
        self.num_heads = num_heads
        self.attention_dropout = float(attention_dropout)
        self.convolution_type = convolution_type
        self.softmax_topk_val = softmax_topk_val
        self.coordinate_encoding = coordinate_encoding
        self.attention_bias = attention_bias
        d = self.spatial_dims
        # coordinate_encoding: q/k/v also see the coordinate channels (the base then builds them).
        self._add_search_coords = coordinate_encoding and self.similarity_type == "Col"
        self._add_value_coords = coordinate_encoding and self.aggregation_type == "Col"
        # zero padding tokens have identical (zero) keys only when the search sees features alone
        self._zero_padding_keys = self.similarity_type == "Col" and not self._add_search_coords
        self.use_coords = self.use_coords or coordinate_encoding
        search_channels = {"Col": c, "Loc": d, "Loc_Col": c + d}[self.similarity_type]
        search_channels += d if self._add_search_coords else 0
        value_channels = self.value_channels + (d if self._add_value_coords else 0)

        o = self.mix_out_channels
        self.q_proj = nn.Linear(search_channels, c, bias=False)
        self.k_proj = nn.Linear(search_channels, c, bias=False)
        self.v_proj = nn.Linear(value_channels, c, bias=False)
        if convolution_type == "standard":
            self.weight = nn.Parameter(torch.empty(o, c, self.K))
        else:
            self.weight = nn.Parameter(torch.empty(c, 1, self.K))
        if convolution_type == "standard" and attention_bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(o))
        else:
            self.register_parameter("bias", None)
        if convolution_type == "depthwise-separable":
            self.pointwise_weight = nn.Parameter(torch.empty(o, c, 1))
            if attention_bias:
                self.pointwise_bias: nn.Parameter | None = nn.Parameter(torch.empty(o))
            else:
                self.register_parameter("pointwise_bias", None)
        self.out_proj = nn.Linear(
            o if convolution_type != "depthwise" else c, o, bias=attention_bias
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections as ``nn.Linear``; ``standard`` and pointwise filters as ``nn.Conv1d``;
        depthwise weights at 1 so that the fresh layer is top-K softmax attention."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters()
        if self.convolution_type == "standard":
            _conv1d_init(self.weight, self.bias)
        else:
            nn.init.ones_(self.weight)
        if self.convolution_type == "depthwise-separable":
            _conv1d_init(self.pointwise_weight, self.pointwise_bias)

    def mix(self, tokens: TokenMap) -> Tensor:
        """Per head: top-K keys of each query, then projections, scores, gates and filtered
        aggregation in one fused op (:func:`convnn.functional.attend_projected`, which keeps
        only the tokens for backward); merge heads, output projection. Returns (B, Nq, O')."""
        h, mt = self.num_heads, self.magnitude_type
        search, values = tokens.search, tokens.values
        shared = values is search and self._add_search_coords == self._add_value_coords
        if self._add_search_coords:
            search = torch.cat([search, tokens.coords], dim=-1)
        if self._add_value_coords:
            values = torch.cat([values, tokens.coords], dim=-1)
        qpos = tokens.query_positions
        qsel = None if search.shape[1] == qpos.numel() else qpos
        with torch.no_grad():  # the search's q and k; the fused op recomputes them for backward
            q = project_heads(search, self.q_proj.weight, h, qsel)
            k = project_heads(search, self.k_proj.weight, h)
        sampled, candidates = tokens.candidates is not None, tokens.candidates
        if not sampled and self.padding and self._zero_padding_keys:
            # the padding tokens' keys are all k_proj(0) = 0: at most the K first can be picked
            candidates = self._without_surplus_padding(tokens, self.K)
        idx = knn_search(
            q,
            k,
            self.K,
            mt,
            candidates=candidates,
            query_positions=qpos,
            include_self=sampled,
            memory_budget=tokens.memory_budget,
        )
        if self.similarity_type == "Loc":
            idx = idx.sort(dim=-1).values
        if is_recording():  # the gates over the K, only inside convnn.record_neighbors
            with torch.no_grad():
                scores = selected_scores(q, k, idx, mt)
                gates = attention_gates(scores, mt, softmax=self.softmax_topk_val)
            note_selection(self, tokens, idx, gates)
        mask = gate_dropout_mask(
            idx.shape, self.attention_dropout, training=self.training, device=idx.device
        )
        attend = {
            "search": search,
            "values": None if shared else values,
            "q_weight": self.q_proj.weight,
            "k_weight": self.k_proj.weight,
            "v_weight": self.v_proj.weight,
            "idx": idx,
            "magnitude_type": mt,
            "queries": q,
            "keys": k,
            "query_positions": qsel,
            "softmax": self.softmax_topk_val,
            "heads": h,
            "gate_mask": mask,
            "memory_budget": tokens.memory_budget,
        }
        return self.out_proj(self._aggregate(attend))

    def _aggregate(self, attend: dict[str, Any]) -> Tensor:
        """Gated, filtered aggregation of every head (``attend``: the arguments of
        :func:`attend_projected` but the filter) -> (B, Nq, ·)."""
        h = self.num_heads
        bh, nq, kk = attend["idx"].shape
        b, d = bh // h, self.v_proj.out_features // h
        if self.convolution_type == "standard":
            o = self.weight.shape[0]
            # (O, h·d, K) -> per head (h, K·d, O): row k·d + c of head j is W[:, j·d + c, k]
            w = self.weight.view(o, h, d, kk).permute(1, 3, 2, 0).reshape(h, kk * d, o)
            out = attend_projected(**attend, weight=w, mode="standard")
            out = out.unflatten(0, (b, h)).sum(1)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        # depthwise: out[c] = Σ_k W[c, 0, k] · g_k · v[idx_k, c], per head on its own channels
        w = self.weight.view(h, d, kk).transpose(1, 2)  # (h, K, d)
        out = attend_projected(**attend, weight=w, mode="depthwise")
        if h > 1:
            out = out.unflatten(0, (b, h)).transpose(1, 2).reshape(b, nq, h * d)
        if self.convolution_type == "depthwise-separable":
            out = F.linear(out, self.pointwise_weight.squeeze(-1), self.pointwise_bias)
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_heads={self.num_heads}, "
            f"attention_dropout={self.attention_dropout}, "
            f"convolution_type={self.convolution_type!r}, "
            f"softmax_topk_val={self.softmax_topk_val}, "
            f"coordinate_encoding={self.coordinate_encoding}, "
            f"attention_bias={self.attention_bias}"
        )


def _conv1d_init(weight: Tensor, bias: Tensor | None) -> None:
    """``nn.Conv1d``'s default initialisation of a (O, C, K) weight and its bias (if any)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(weight.shape[1] * weight.shape[2])
        nn.init.uniform_(bias, -bound, bound)


class Conv1dNNAttention(_ConvNNAttentionBase):
    """ConvNN-Attention over a sequence (B, C, T) → (B, O, T').

    Shares every keyword of :class:`convnn.Conv1dNN`, plus ``num_heads`` (independent searches
    on C/h channel groups), ``attention_dropout`` (on the gates), ``convolution_type``
    (``standard`` | ``depthwise`` | ``depthwise-separable``), ``softmax_topk_val`` (softmax
    over the K selected scores, else the raw scores are the gates; ``euclidean`` gates are
    softmax(−‖q − k‖) or 1 / (‖q − k‖ + 1e-8)), ``coordinate_encoding`` (q/k/v also see the
    coordinate channel) and ``attention_bias`` (biases of the output projection and filter).
    In ``all`` mode the K best keys are taken as they are (self is not forced); in sampled modes
    self is slot 0 with its own score as logit.
    """

    spatial_dims = 1


class Conv2dNNAttention(_ConvNNAttentionBase):
    """ConvNN-Attention over an image (B, C, H, W) → (B, O, H', W').

    Same keywords as :class:`Conv1dNNAttention`; tokens are the pixels in raster order and
    ``coordinate_encoding`` adds the two coordinate channels (x = columns, y = rows).
    """

    spatial_dims = 2


class ConvNNAttention(Conv1dNNAttention):
    """Transformer token mixer (B, N, D) → (B, N, D): :class:`Conv1dNNAttention` over the token
    sequence (a CLS token is an ordinary token). Takes every keyword of that class."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, dim, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ConvNNAttention expects tokens (B, N, D) with D={self.in_channels}, "
                f"got shape {tuple(x.shape)}"
            )
        return super().forward(x.transpose(1, 2)).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.in_channels}, " + super().extra_repr().split(", ", 2)[2]


Conv1d_NN_Attn = Conv1dNNAttention
Conv2d_NN_Attn = Conv2dNNAttention
