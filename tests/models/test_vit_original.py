"""The original ConvNN-Attention code's ViT: `net.variant=original`, its checkpoints loaded by
`from_original_vit_state_dict` (same outputs as the network transcribed here from its `vit.py`),
and the presets that quote its numbers (its parameter counts)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from models.layer_factory import LayerFactory
from models.vit import ViT, from_original_vit_state_dict
from tests.convnn.test_original_attention import (
    OriginalAttention,
    OriginalConvNNAttention,
    _randomised,
)
from tests.framework.helpers import compose_cfg

# Counted on the original ViT (224/16, 192 dim, 12 blocks, MLP 768, 1 head, K 9) for its
# `--layer Attention / KvtAttention / ConvNNAttention` (depthwise aggregation).
ORIGINAL_COUNTS = {
    "vit_tiny_cifar10_attention": 5_479_306,
    "vit_tiny_cifar10_kvt": 5_479_306,
    "vit_tiny_cifar10_convnn_attn_all": 5_500_042,
    "vit_tiny_cifar10_convnn_attn_random": 5_500_042,
}


@pytest.mark.parametrize("preset", sorted(ORIGINAL_COUNTS))
def test_vit_preset_builds_the_original(preset: str) -> None:
    """Catches projection biases left on (+9,216 for attention, +2,304 for ConvNN-Attention),
    the standard ViT, or ConvNN-Attention searching padded tokens."""
    cfg = compose_cfg([f"experiment={preset}"])
    assert cfg.net.variant == "original"
    assert cfg.layer.attention_dropout == 0.1
    assert cfg.layer.attention_bias is False
    if cfg.layer.name == "convnn_attn":
        assert cfg.layer.padding == 0  # the original searches the tokens only
    net = instantiate(cfg.net)(
        layer=instantiate(cfg.layer), in_channels=3, num_classes=10, image_size=cfg.dataset.resize
    )
    assert sum(p.numel() for p in net.parameters()) == ORIGINAL_COUNTS[preset]


# ----------------------------------------------------------- the original ViT, transcribed
class _Namespace(nn.Module):
    """A parameter holder, so that state-dict keys read as in the original."""


class _OriginalBlock(nn.Module):
    """The original ``TransformerEncoder``: x + attention(norm1(x)), x + mlp(norm2(x))."""

    def __init__(self, attention: nn.Module, d: int, d_mlp: int) -> None:
        super().__init__()
        self.attention = attention
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, d_mlp), nn.GELU(), nn.Dropout(0.1), nn.Linear(d_mlp, d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _OriginalViT(nn.Module):
    """The original ``ViT``: patch conv → LayerNorm → [CLS] + sinusoidal table → blocks →
    classifier on CLS (no final LayerNorm)."""

    def __init__(
        self, make_attention, d: int = 8, depth: int = 2, img: int = 8, patch: int = 4
    ) -> None:
        super().__init__()
        self.patch_embedding = _Namespace()
        self.patch_embedding.linear_projection = nn.Conv2d(3, d, patch, stride=patch)
        self.patch_embedding.norm = nn.LayerNorm(d)
        self.positional_encoding = _Namespace()
        self.positional_encoding.cls_tokens = nn.Parameter(torch.randn(1, 1, d))
        n = (img // patch) ** 2 + 1
        pe = torch.zeros(n, d)
        position = torch.arange(0, n, dtype=torch.float).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.positional_encoding.register_buffer("pe", pe.unsqueeze(0))
        self.transformer_encoder = nn.Sequential(
            *(_OriginalBlock(make_attention(), d, 2 * d) for _ in range(depth))
        )
        self.classifier = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.patch_embedding
        x = emb.norm(emb.linear_projection(x).flatten(2).transpose(1, 2))
        cls = self.positional_encoding.cls_tokens.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_encoding.pe[:, : x.shape[1]]
        return self.classifier(self.transformer_encoder(x)[:, 0])


MIXERS = {
    "attention": (lambda: OriginalAttention(8, 2), {"num_heads": 2}),
    "convnn_attn": (
        lambda: OriginalConvNNAttention(
            8, K=3, magnitude_type="euclidean", convolution_type="standard", softmax_topk_val=False
        ),
        {
            "K": 3,
            "magnitude_type": "euclidean",
            "convolution_type": "standard",
            "softmax_topk_val": False,
            "padding": 0,
        },
    ),
}


@pytest.mark.parametrize("layer", sorted(MIXERS))
def test_original_checkpoint_loads_and_gives_the_same_output(layer: str) -> None:
    """Catches a renamed/missing key (strict load), the standard variant's final LayerNorm or
    missing patch LayerNorm, and a mixer whose loaded weights compute something else."""
    torch.manual_seed(0)
    make, options = MIXERS[layer]
    ref = _randomised(_OriginalViT(make).double(), 1).eval()
    ours = (
        ViT(
            LayerFactory(layer, attention_bias=False, **options),
            image_size=8,
            patch_size=4,
            dim=8,
            depth=2,
            mlp_dim=16,
            variant="original",
        )
        .double()
        .eval()
    )
    ours.load_state_dict(from_original_vit_state_dict(ref.state_dict()))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_variants_have_the_same_count_and_reject_unknown_names() -> None:
    """The original moves the LayerNorm, it does not add one. Catches a stray module."""
    kwargs = {"image_size": 8, "patch_size": 4, "dim": 8, "depth": 1, "mlp_dim": 16}
    standard = ViT(LayerFactory("attention"), **kwargs)
    original = ViT(LayerFactory("attention"), variant="original", **kwargs)
    assert sum(p.numel() for p in standard.parameters()) == sum(
        p.numel() for p in original.parameters()
    )
    assert isinstance(original.patch_norm, nn.LayerNorm) and isinstance(original.norm, nn.Identity)
    with pytest.raises(ValueError, match=r"variant='timm' is invalid; choose one of "):
        ViT(LayerFactory("attention"), variant="timm", **kwargs)
