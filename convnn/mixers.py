"""Token mixers for transformers ((B, N, D) → (B, N, D)) and pixel attention for CNNs.

All attention variants share one core, :class:`_SelfAttention`: a fused q/k/v projection, heads,
``F.scaled_dot_product_attention`` with an optional boolean mask (True = may attend), and an output
projection. The variants differ only in the mask they build (KVT top-K, sparse patterns) or in how
tokens are grouped (local windows), so their parameters have identical names and shapes — a state
dict from one loads into any other.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.functional import attend_neighbors, gate_dropout_mask, knn_search, selected_scores
from convnn.layers import Conv1dNN, check_floating
from convnn.recording import is_recording, note_selection

__all__ = [
    "SPARSE_PATTERNS",
    "Attention2d",
    "Conv1dMixer",
    "Conv1dNNMixer",
    "KNNAttention",
    "LocalAttention",
    "MultiHeadAttention",
    "SparseAttention",
    "sparse_pattern_mask",
]

SPARSE_PATTERNS: tuple[str, ...] = ("local", "strided")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer ≥ {low}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid; expected a bool (True or False)")
    return value


def _check_dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"attention_dropout={value!r} is invalid; expected a float in [0, 1)")
    return float(value)


class _SelfAttention(nn.Module):
    """Shared core: q/k/v projection → multi-head (masked) SDPA → output projection.

    Subclasses override :meth:`_mask` (which keys each query may see) or :meth:`_attend` (how
    heads are attended, e.g. per window). Input (B, N, in_dim) → (B, N, out_dim).
    ``attention_bias=False`` drops the biases of the q/k/v and output projections (the original
    ViT's attention layers have none).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        *,
        in_dim: int | None = None,
        out_dim: int | None = None,
        dim_name: str = "dim",
        attention_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_int(dim_name, dim, 1)
        _check_int("num_heads", num_heads, 1)
        if dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} is invalid for {dim_name}={dim}; num_heads must divide "
                f"{dim_name} (valid: divisors of {dim})"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.attention_dropout = _check_dropout(attention_dropout)
        self.attention_bias = _check_bool("attention_bias", attention_bias)
        self.qkv = nn.Linear(in_dim or dim, 3 * dim, bias=attention_bias)
        self.proj = nn.Linear(dim, out_dim or dim, bias=attention_bias)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        p = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    def _mask(self, q: Tensor, k: Tensor) -> Tensor | None:
        """Boolean (…, N, N) mask of allowed keys, or None for full attention."""
        return None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._sdpa(q, k, v, self._mask(q, k))

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, in_dim) → (B, N, out_dim)."""
        check_floating(self, x)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        out = self._attend(q, k, v).transpose(1, 2).reshape(b, n, self.dim)
        return self.proj(out)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, "
            f"attention_dropout={self.attention_dropout}, attention_bias={self.attention_bias}"
        )


class MultiHeadAttention(_SelfAttention):
    """Standard multi-head self-attention over all N tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        attention_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, attention_dropout, attention_bias=attention_bias)


class _TokenSequence(NamedTuple):
    """What :func:`convnn.recording.note_selection` reads of a plain token sequence."""

    features: Tensor
    shape: tuple[int, ...]
    query_positions: Tensor


class KNNAttention(_SelfAttention):
    """KVT k-NN attention: each query's softmax is restricted to its top-``K`` keys.

    Keys are selected per head by the scaled dot product (selection carries no gradient; the
    softmax over the kept scores does). ``K ≥ N`` is exactly full attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        K: int = 100,
        attention_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, attention_dropout, attention_bias=attention_bias)
        self.K = _check_int("K", K, 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Blocked top-K search, then softmax and sum over the K selected keys only: no
        (N, N) mask or score matrix is materialised (``K ≥ N``: plain SDPA)."""
        b, h, n, d = q.shape
        if self.K >= n:
            return self._sdpa(q, k, v, None)
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        idx = knn_search(q, k, self.K, "matmul", include_self=False)
        if is_recording():  # the selection and its softmax, only inside convnn.record_neighbors
            with torch.no_grad():
                gates = selected_scores(q, k, idx, "matmul").softmax(dim=-1)
            seq = _TokenSequence(q.new_empty(b, 0), (n,), torch.arange(n))
            note_selection(self, seq, idx, gates)
        p = self.attention_dropout
        mask = gate_dropout_mask(idx.shape, p, training=self.training, device=q.device)
        out = attend_neighbors(q, k, v, idx, "matmul", mode="sum", gate_mask=mask)
        return out.view(b, h, n, d)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, K={self.K}"


class LocalAttention(_SelfAttention):
    """Attention within non-overlapping windows of ``window_size`` consecutive tokens.

    N is padded up to a multiple of the window; padded keys are masked out, so a token in the
    last (partial) window attends only to the real tokens of that window. ``window_size ≥ N``
    is full attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        window_size: int = 16,
        attention_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, attention_dropout, attention_bias=attention_bias)
        self.window_size = _check_int("window_size", window_size, 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, h, n, d = q.shape
        w = self.window_size
        if w >= n:
            return self._sdpa(q, k, v, None)
        pad = (-n) % w
        nw = (n + pad) // w
        q, k, v = (F.pad(t, (0, 0, 0, pad)).reshape(b, h, nw, w, d) for t in (q, k, v))
        mask = None
        if pad:
            valid = torch.arange(n + pad, device=q.device) < n
            mask = valid.reshape(nw, 1, w)  # (windows, query, key) broadcast over queries
        out = self._sdpa(q, k, v, mask)
        return out.reshape(b, h, n + pad, d)[:, :, :n]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}"


def sparse_pattern_mask(n: int, pattern: str, stride: int, device: Any = None) -> Tensor:
    """Bidirectional Sparse-Transformer pattern as an (N, N) boolean mask (True = attend).

    ``local``: |i − j| < stride. ``strided``: local, or (i − j) divisible by stride — every token
    then reaches every other in two hops.
    """
    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]
    mask = diff.abs() < stride
    if pattern == "strided":
        mask |= diff.remainder(stride) == 0
    return mask


def _pattern_is_dense(n: int, pattern: str, stride: int) -> bool:
    """Whether :func:`sparse_pattern_mask` is all True, decided on the host (asking the device
    would wait for the stream): every |i − j| ≤ n − 1 is within the band, or a multiple of the
    stride."""
    return stride >= n or (pattern == "strided" and (stride == 1 or stride == n - 1))


class SparseAttention(_SelfAttention):
    """Fixed sparse attention patterns from Sparse Transformers (bidirectional).

    ``pattern="local"`` attends within a band of width ``stride`` (|i − j| < stride);
    ``pattern="strided"`` adds every ``stride``-th token (j ≡ i mod stride), so two layers connect
    every pair of tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        pattern: str = "strided",
        stride: int = 8,
        attention_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, attention_dropout, attention_bias=attention_bias)
        if pattern not in SPARSE_PATTERNS:
            raise ValueError(f"pattern={pattern!r} is invalid; choose one of {SPARSE_PATTERNS}")
        self.pattern = pattern
        self.stride = _check_int("stride", stride, 1)

    def _mask(self, q: Tensor, k: Tensor) -> Tensor | None:
        n = k.shape[-2]
        if _pattern_is_dense(n, self.pattern, self.stride):
            return None
        return sparse_pattern_mask(n, self.pattern, self.stride, k.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}, stride={self.stride}"


class Attention2d(nn.Module):
    """Multi-head self-attention over the H·W pixels of a map, for CNN backbones.

    1×1 projections (implemented as linear maps on the flattened pixels, which is the same
    operation) take ``in_channels`` to q/k/v of ``out_channels``; SDPA over all pixels; a 1×1 output
    projection. (B, in, H, W) → (B, out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        attention_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.attn = _SelfAttention(
            out_channels,
            num_heads,
            attention_dropout,
            in_dim=in_channels,
            dim_name="out_channels",
            attention_bias=attention_bias,
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) → (B, out, H, W)."""
        b, _, h, w = x.shape
        y = self.attn(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, self.out_channels, h, w)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, num_heads={self.attn.num_heads}, "
            f"attention_dropout={self.attn.attention_dropout}, "
            f"attention_bias={self.attn.attention_bias}"
        )


class Conv1dMixer(nn.Module):
    """Depthwise Conv1d along the tokens (``kernel_size``, same length) then a pointwise Conv1d."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        _check_int("dim", dim, 1)
        _check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size={kernel_size} is invalid; expected an odd integer ≥ 1 so that the "
                "number of tokens is kept"
            )
        self.dim = dim
        self.kernel_size = kernel_size
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.pointwise = nn.Conv1d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) → (B, N, D)."""
        return self.pointwise(self.depthwise(x.transpose(1, 2))).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"


class Conv1dNNMixer(nn.Module):
    """``convnn.Conv1dNN(dim, dim, **convnn_kwargs)`` over the token axis: (B, N, D) → (B, N, D)."""

    def __init__(self, dim: int, **convnn_kwargs: Any) -> None:
        super().__init__()
        _check_int("dim", dim, 1)
        self.dim = dim
        self.layer = Conv1dNN(dim, dim, **convnn_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) → (B, N, D)."""
        return self.layer(x.transpose(1, 2)).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
