"""Weights trained with the original ConvNN-Attention code, renamed for our layers.

The original ``MultiHeadConvNNAttention`` holds ``W_q``, ``W_k``, ``W_v``, ``W_o`` (bias-free
``nn.Linear``) and ``conv`` (a bias-free ``nn.Conv1d`` over one head's channels, or for
``depthwise-separable`` an ``nn.Sequential`` of the depthwise and the pointwise ``nn.Conv1d``).
It scores its ``W_k`` projection of each token against the ``W_q`` projection of the
candidates, so its ``W_k`` is our ``q_proj`` (the query side of the search) and its ``W_q`` our
``k_proj``. Build our layer with ``attention_bias=False`` (the original has no biases), the same
``K``, ``magnitude_type``, ``convolution_type``, ``softmax_topk_val`` and ``num_heads``, and
``padding=0``; then ``layer.load_state_dict(from_convnn_attention_state_dict(sd))``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["ORIGINAL_ATTENTION_NAMES", "from_convnn_attention_state_dict"]

#: The original's projection names → ours (note the crossed query/key roles).
ORIGINAL_ATTENTION_NAMES: dict[str, str] = {
    "W_q": "k_proj",
    "W_k": "q_proj",
    "W_v": "v_proj",
    "W_o": "out_proj",
}
_CONV_NAMES: dict[str, str] = {
    "conv.weight": "weight",
    "conv.0.weight": "weight",
    "conv.1.weight": "pointwise_weight",
}


def _block_diagonal(w: Tensor, heads: int) -> Tensor:
    """(d, d, k) per-head filter shared by the heads → (h·d, h·d, k), head j on block j."""
    return torch.stack(
        [torch.block_diag(*(w[..., i] for _ in range(heads))) for i in range(w.shape[-1])], dim=-1
    )


def _layer_prefixes(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Prefixes of the ConvNN-Attention layers: a ``W_q`` with a ``conv`` beside it (the
    original's plain attention layers also have ``W_q`` … ``W_o``, but no ``conv``)."""
    return [
        key[: -len("W_q.weight")]
        for key in state_dict
        if key.endswith("W_q.weight")
        and any(key[: -len("W_q.weight")] + name in state_dict for name in _CONV_NAMES)
    ]


def from_convnn_attention_state_dict(
    state_dict: Mapping[str, Tensor], *, num_heads: int = 1
) -> dict[str, Tensor]:
    """Rename the original ConvNN-Attention layers' parameters in ``state_dict`` to ours.

    Every layer is found by its ``<prefix>W_q.weight`` and ``<prefix>conv…`` keys, whatever the
    prefix (a whole checkpoint works: ``transformer_encoder.3.attention.W_q.weight`` becomes
    ``transformer_encoder.3.attention.k_proj.weight``); other keys are returned unchanged. The
    original applies one per-head filter to every head: with ``num_heads`` h > 1 it is expanded
    to our per-channel layout (depthwise tiled h times, standard and pointwise filters
    block-diagonal). Raises ``ValueError`` for a checkpoint trained with coordinate encoding
    (its filter sees one extra channel per head, which our layer adds before the projections).
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be a positive integer")
    out = dict(state_dict)
    for prefix in _layer_prefixes(state_dict):
        width = state_dict[prefix + "W_v.weight"].shape[0]
        if width % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide the width {width} of the layer "
                f"{prefix!r}; valid choices are divisors of {width}"
            )
        d = width // num_heads
        for old, new in ORIGINAL_ATTENTION_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{old}.{kind}"
                if key in out:
                    out[f"{prefix}{new}.{kind}"] = out.pop(key)
        for old, new in _CONV_NAMES.items():
            key = prefix + old
            if key not in out:
                continue
            w = out.pop(key)
            if w.shape[1] not in (1, d) or (w.shape[1] == 1 and w.shape[0] != d):
                raise ValueError(
                    f"{key} has shape {tuple(w.shape)}, but one head has {d} channels: the "
                    f"checkpoint was trained with coordinate_encoding=True, which our layer "
                    f"implements differently (coordinates enter before the projections)"
                )
            if num_heads > 1:
                w = w.repeat(num_heads, 1, 1) if w.shape[1] == 1 else _block_diagonal(w, num_heads)
            out[prefix + new] = w
    return out
