"""Vision Transformer whose token mixer is the layer option (attention, KVT, ConvNN, …).

Patch embedding (a patch×patch / patch convolution) → CLS token + positions (sinusoidal or
learned) → pre-norm blocks [LN → mixer → residual, LN → MLP → residual] → final LN → linear head
on the CLS token. The CLS token is an ordinary token for every mixer (it takes part in KVT's
top-K, local windows — it sits in the first — and ConvNN neighbour search).

``variant="original"`` is the original ConvNN-Attention code's ViT: a LayerNorm on the patch
embeddings instead of the final LayerNorm, and no dropout on the embeddings (same parameter
count); :func:`from_original_vit_state_dict` loads its checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from convnn import from_convnn_attention_state_dict
from models.layer_factory import LayerFactory
from models.registry import register_backbone

__all__ = [
    "MLP",
    "POS_EMBEDDINGS",
    "VIT_VARIANTS",
    "TransformerBlock",
    "ViT",
    "from_original_vit_state_dict",
    "sinusoidal_positions",
]

POS_EMBEDDINGS: tuple[str, ...] = ("sinusoidal", "learned")
#: ``standard``: final LayerNorm, embedding dropout; ``original``: the original code's ViT.
VIT_VARIANTS: tuple[str, ...] = ("standard", "original")


def sinusoidal_positions(num_tokens: int, dim: int) -> Tensor:
    """Fixed 1-D sine/cosine table (Vaswani et al.), shape (num_tokens, dim); dim must be even."""
    pos = torch.arange(num_tokens, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_tokens, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class MLP(nn.Sequential):
    """Linear → GELU → dropout → linear → dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class TransformerBlock(nn.Module):
    """Pre-norm block: x + mixer(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, mixer: nn.Module, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) → (B, N, D)."""
        x = x + self.drop(self.mixer(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


@register_backbone
class ViT(nn.Module):
    """Vision Transformer with ``layer.token_mixer(dim)`` in every block.

    Args:
        layer: the layer factory (token role); ``layer.num_heads`` sets the heads of attention
            mixers.
        in_channels, num_classes, image_size: data shape; image_size must be divisible by
            patch_size.
        patch_size: side of the square patches (4 at 32×32 → 64 tokens + CLS).
        dim, depth, mlp_dim: width, number of blocks, MLP hidden size.
        pos_embedding: ``sinusoidal`` (fixed) or ``learned``.
        dropout: dropout after the embedding (``standard`` only), the mixer and in the MLP.
        variant: ``standard`` (final LayerNorm before the head) or ``original`` (the original
            code's ViT: LayerNorm on the patch embeddings, no final one, no embedding dropout).
    """

    LAYER_ROLE = "tokens"

    def __init__(
        self,
        layer: LayerFactory,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        mlp_dim: int = 768,
        pos_embedding: str = "sinusoidal",
        dropout: float = 0.0,
        variant: str = "standard",
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}; choose a "
                f"patch_size that divides {image_size} (or resize the images)"
            )
        if pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(
                f"pos_embedding={pos_embedding!r} is invalid; choose one of {POS_EMBEDDINGS}"
            )
        for key, value in (("dim", dim), ("depth", depth), ("mlp_dim", mlp_dim)):
            if value < 1:
                raise ValueError(f"{key}={value} is invalid; expected an integer ≥ 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is invalid; expected a number in [0, 1)")
        if pos_embedding == "sinusoidal" and dim % 2:
            raise ValueError(f"dim={dim} must be even for sinusoidal positions")
        if variant not in VIT_VARIANTS:
            raise ValueError(f"variant={variant!r} is invalid; choose one of {VIT_VARIANTS}")
        original = variant == "original"
        self.variant = variant
        self.patch_size = patch_size
        self.image_size = image_size
        num_tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(dim) if original else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embedding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer(
                "pos_embed", sinusoidal_positions(num_tokens, dim)[None], persistent=False
            )
        self.drop = nn.Identity() if original else nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(TransformerBlock(layer.token_mixer(dim), dim, mlp_dim, dropout) for _ in range(depth))
        )
        self.norm = nn.Identity() if original else nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, num_classes) logits; H = W = image_size."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT was built for {self.image_size}×{self.image_size} images, got "
                f"{tuple(x.shape[-2:])}"
            )
        tokens = self.patch_norm(self.patch_embed(x).flatten(2).transpose(1, 2))  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def _attention_from_original(sd: dict[str, Tensor], prefix: str) -> None:
    """The original's bias-free ``W_q``/``W_k``/``W_v``/``W_o`` attention at ``prefix`` as our
    fused ``qkv`` and ``proj`` (in place)."""
    qkv = [sd.pop(f"{prefix}W_{n}.weight") for n in ("q", "k", "v")]
    sd[prefix + "qkv.weight"] = torch.cat(qkv)
    sd[prefix + "proj.weight"] = sd.pop(prefix + "W_o.weight")


def from_original_vit_state_dict(
    state_dict: Mapping[str, Tensor], *, num_heads: int = 1
) -> dict[str, Tensor]:
    """An original ViT checkpoint (``patch_embedding``, ``positional_encoding``,
    ``transformer_encoder.<i>.attention``, ``classifier``) under the names of
    ``ViT(..., variant="original")`` whose layer is the one it was trained with, built with
    ``attention_bias=False`` (and ``padding=0`` for ConvNN-Attention). Its attention layers:
    ``MultiHeadAttention`` → our fused ``qkv``/``proj``; ``MultiHeadConvNNAttention`` →
    :func:`convnn.from_convnn_attention_state_dict`; KVT's ``qkv``/``proj`` already match. The
    fixed position table ``pe`` is dropped (ours is rebuilt, with the same formula)."""
    sd = from_convnn_attention_state_dict(state_dict, num_heads=num_heads)
    renames = (
        ("patch_embedding.linear_projection.", "patch_embed."),
        ("patch_embedding.norm.", "patch_norm."),
        ("positional_encoding.cls_tokens", "cls_token"),
        ("transformer_encoder.", "blocks."),
        ("classifier.", "head."),
    )
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "positional_encoding.pe":
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key.replace(".attention.", ".mixer.")] = value
    for key in [k for k in out if k.endswith(".mixer.W_q.weight")]:
        _attention_from_original(out, key[: -len("W_q.weight")])
    return out
