"""The ViT presets that quote the original's numbers build its attention layers: no projection
biases, attention dropout 0.1, no padded tokens — parameter counts equal the original ViT's."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

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
def test_vit_preset_builds_the_original_parameter_count(preset: str) -> None:
    """Catches projection biases left on (+9,216 for attention, +2,304 for ConvNN-Attention)."""
    cfg = compose_cfg([f"experiment={preset}"])
    assert cfg.layer.attention_dropout == 0.1
    assert cfg.layer.attention_bias is False
    if cfg.layer.name == "convnn_attn":
        assert cfg.layer.padding == 0  # the original searches the tokens only
    net = instantiate(cfg.net)(
        layer=instantiate(cfg.layer), in_channels=3, num_classes=10, image_size=cfg.dataset.resize
    )
    assert sum(p.numel() for p in net.parameters()) == ORIGINAL_COUNTS[preset]
