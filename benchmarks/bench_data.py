"""Images per second of one DataLoader worker for the training pipelines.

ImageNet: JPEG decode + RandomResizedCrop(224) + flip + normalise, on generated JPEGs of
ImageNet-like sizes, two ways: the datamodule's own pipeline (its loader, ``read_rgb``:
``torchvision.io`` decode into a uint8 tensor, then its train transform, ``transforms.v2`` on
uint8 tensors) and the previous pipeline (PIL decode, as ImageFolder's default loader does, and
the same transforms on PIL images).
CIFAR: the datamodule's pipeline (random crop with padding 4 + flip + normalise) on 32×32
images. One process, one thread: the rate of one worker. Writes ``data.md`` and ``data.json``.

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --gpu-images-per-s vgg11=4000,resnet18=6000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadnote import load_note  # noqa: E402
from datamodules.cifar import CIFAR10DataModule  # noqa: E402
from datamodules.imagenet import ImageNetDataModule, read_rgb  # noqa: E402

# (width, height) of generated JPEGs: ImageNet's common shapes (mean ≈ 400×350)
SIZES = [(500, 375), (500, 333), (375, 500), (500, 400), (640, 480), (333, 500), (400, 300)]


def _jpegs(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` natural-looking JPEGs (smooth colour fields + noise, quality 90)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _rate(step: Callable[[int], Any], n: int, seconds: float) -> dict[str, float]:
    """Images per second of ``step(i)``, repeated over the ``n`` items for ``seconds``."""
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        rates.append(n / (time.perf_counter() - t0))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def _imagenet_pil(paths: list[Path]) -> Callable[[int], Any]:
    """The previous pipeline: PIL decode, transforms on PIL images, ToTensor + Normalize."""
    from torchvision import transforms as T

    dm = ImageNetDataModule(name="imagenet", augment=True)
    transform = T.Compose(
        [
            T.RandomResizedCrop(224, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(dm.mean, dm.std),
        ]
    )

    def step(i: int) -> Any:
        with open(paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")  # ImageFolder's default loader
        return transform(img)

    return step


def _imagenet_datamodule(paths: list[Path]) -> Callable[[int], Any]:
    """The datamodule's pipeline: its loader and its train transform."""
    transform = ImageNetDataModule(name="imagenet", augment=True).train_transform()
    names = [str(p) for p in paths]
    return lambda i: transform(read_rgb(names[i]))


def _cifar(n: int) -> Callable[[int], Any]:
    transform = CIFAR10DataModule(name="cifar10", augment=True).train_transform()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return lambda i: transform(images[i])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (also checked by the README tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="generated JPEGs")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing per pipeline")
    parser.add_argument(
        "--gpu-images-per-s",
        default="",
        help="measured GPU training throughput per model, e.g. vgg11=4000,resnet18=6000, "
        "to turn the per-worker rate into a worker count",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure each pipeline and write the results."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        paths = _jpegs(Path(tmp), args.images, 0)
        kib = statistics.mean(p.stat().st_size for p in paths) / 1024
        results = {
            "imagenet_pil": _rate(_imagenet_pil(paths), len(paths), args.seconds),
            "imagenet_datamodule": _rate(_imagenet_datamodule(paths), len(paths), args.seconds),
            "cifar": _rate(_cifar(256), 256, args.seconds),
        }
    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    gpu = dict(kv.split("=") for kv in args.gpu_images_per_s.split(",") if kv)
    best = max(results["imagenet_pil"]["median"], results["imagenet_datamodule"]["median"])
    names = {
        "imagenet_pil": "ImageNet, PIL decode + transforms on PIL images (the previous pipeline)",
        "imagenet_datamodule": "ImageNet, torchvision.io decode + v2 on uint8 tensors "
        "(the datamodule's pipeline)",
        "cifar": "CIFAR-10 (the datamodule's pipeline, 32×32)",
    }
    lines = [
        "# Data loading: images per second of one worker",
        "",
        f"- command: `python benchmarks/bench_data.py --images {args.images} "
        f"--seconds {args.seconds}`",
        f"- date: {started}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}; one process, one thread",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_after} "
        f"({load_note(load_before, load_after)})",
        f"- ImageNet inputs: {args.images} generated JPEGs of ImageNet-like sizes "
        f"({', '.join(f'{w}×{h}' for w, h in SIZES)}), mean {kib:.0f} KiB, quality 90; "
        "train transform RandomResizedCrop(224) + flip + normalise",
        "",
        "| pipeline | images/s per worker (median) | min–max |",
        "|---|---|---|",
    ]
    for key, r in results.items():
        lines.append(f"| {names[key]} | {r['median']:.0f} | {r['min']:.0f}–{r['max']:.0f} |")
    speedup = results["imagenet_datamodule"]["median"] / results["imagenet_pil"]["median"]
    lines += [
        "",
        f"datamodule's pipeline / previous PIL pipeline: {speedup:.2f}×.",
        "",
        "Workers one GPU needs for ImageNet = the GPU's training images/s ÷ the per-worker rate "
        f"({best:.0f} images/s with the faster path above).",
    ]
    if gpu:
        lines += ["", "| model | GPU images/s (given) | workers needed |", "|---|---|---|"]
        for model, rate in gpu.items():
            lines.append(f"| {model} | {float(rate):.0f} | {math.ceil(float(rate) / best)} |")
    else:
        lines.append(
            "No GPU throughput was given (`--gpu-images-per-s`), so no worker count is stated: "
            "measure it with `python benchmarks/bench_models.py --device cuda`."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data.md").write_text("\n".join(lines) + "\n")
    (args.out / "data.json").write_text(
        json.dumps(
            {"load_before": load_before, "load_after": load_after, "results": results}, indent=1
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
