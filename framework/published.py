"""The published numbers that experiment presets reproduce: one table, read by the report and
rendered into docs/behaviour.md (``python -m framework.published`` prints the rendered table;
a test keeps the document in step)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PUBLISHED", "Published", "markdown_table"]


@dataclass(frozen=True)
class Published:
    """One reference number: what the original work reported for a preset's configuration."""

    label: str  # how docs/behaviour.md names the run
    top1: float  # percent
    protocol: str  # how the original measured it
    metric: str = "test/acc1"  # our results.json key it is compared with


_BEST_TEST = "best test epoch of 150, single seed"

PUBLISHED: dict[str, Published] = {
    "vgg11_cifar10_conv2d": Published("VGG11 Conv2d", 80.8, _BEST_TEST),
    "vgg11_cifar10_branching": Published("VGG11 Branching (ratio 0.5)", 82.8, _BEST_TEST),
    "vgg11_cifar10_convnn": Published("VGG11 pure ConvNN", 55.3, _BEST_TEST),
    "vit_tiny_cifar10_attention": Published("ViT-Tiny Attention", 77.6, _BEST_TEST),
    "vit_tiny_cifar10_kvt": Published("ViT-Tiny KVT (k=100)", 77.1, _BEST_TEST),
    "vit_tiny_cifar10_convnn_attn_all": Published(
        "ViT-Tiny ConvNN-Attention all K=9", 74.4, _BEST_TEST
    ),
    "vit_tiny_cifar10_convnn_attn_random": Published(
        "ViT-Tiny ConvNN-Attention random K=9 M=32", 80.3, _BEST_TEST
    ),
    "convnext_mini_cifar10_lecture": Published(
        "lecture ConvNeXt-mini",
        59.7,
        "validation top-1 after 5 epochs, single seed",
        metric="val/acc1_best",
    ),
}


def markdown_table() -> str:
    """The table as it appears in docs/behaviour.md."""
    lines = [
        "| preset (`experiment=`) | run | published top-1 | measured as | compared with our |",
        "|---|---|---|---|---|",
    ]
    for preset, ref in PUBLISHED.items():
        lines.append(
            f"| `{preset}` | {ref.label} | {ref.top1} % | {ref.protocol} | `{ref.metric}` |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown_table())
