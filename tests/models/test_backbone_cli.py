"""End-to-end through main.py: every experiment preset, and a sweep of every backbone × layer.

They start Python + Lightning once per preset / sweep, hence `slow`. The sweeps cover one
backbone of each family by default (every backbone × layer pair is also built and trained one
step in tests/models/test_backbones.py); set CONVNN_FULL_SWEEP=1 to sweep every backbone.

Sweep design: a Hydra sweep is a full product, so CNNs (`2d` layers) and ViTs (token mixers) are
swept separately over the layers that fit them; an incompatible pair (CNN + kvt) is run on
its own and must fail cleanly with the list of layers that fit.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.framework.helpers import run_main

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in (ROOT / "cfg" / "experiment").glob("*.yaml"))
FULL_SWEEP = os.environ.get("CONVNN_FULL_SWEEP") == "1"
CNNS = (
    ["vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "convnext_mini"]
    if FULL_SWEEP
    else ["vgg11", "resnet18", "convnext_mini"]
)
VITS = ["vit_tiny", "vit_small", "vit_base"] if FULL_SWEEP else ["vit_tiny"]
FAST = ["debug=fdr", "dataset=fake", "dataset.batch_size=4"]

pytestmark = pytest.mark.slow


def _main(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run_main(args, timeout=timeout)


@pytest.mark.parametrize("preset", PRESETS)
def test_experiment_preset_runs(preset: str, tmp_path: Path) -> None:
    # ViT presets resize to 224 with 16×16 patches; 64 keeps 16 patches + CLS (≥ K=9) and is fast.
    fast = ["dataset.resize=64"] if preset.startswith("vit") else []
    if preset.startswith("patch_knn"):  # a small dictionary: k-means of 262k patches is minutes
        fast = ["net.n_patches=2048", "net.n_clusters=64", "net.k=16", "net.kmeans_iters=3"]
    proc = _main(f"experiment={preset}", *FAST, *fast, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results.json").is_file()


def _sweep(nets: list[str], layers: list[str], extra: list[str], out: Path) -> None:
    proc = _main(
        "-m",
        f"net={','.join(nets)}",
        f"layer={','.join(layers)}",
        *FAST,
        "dataset.batch_size=2",
        *extra,
        f"hydra.sweep.dir={out}",
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [p for p in out.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(jobs) == len(nets) * len(layers)
    assert not [j.name for j in jobs if not (j / "results.json").is_file()]


def test_sweep_every_cnn_with_every_2d_layer(tmp_path: Path) -> None:
    # 64×64 keeps the deepest VGG stage at 4×4 = 16 tokens, enough for the default K=9.
    layers = ["conv", "convnn", "convnn_attn", "branching", "attention"]
    _sweep(CNNS, layers, ["dataset.resize=64"], tmp_path)


def test_sweep_every_vit_with_every_token_mixer(tmp_path: Path) -> None:
    layers = ["conv", "convnn", "convnn_attn", "attention", "kvt", "local_attention"]
    layers += ["sparse_attention", "branching", "branching_attn"]
    # `++`: Hydra checks sweep overrides against the default net (simple), which has no depth.
    _sweep(VITS, layers, ["++net.depth=2"], tmp_path)


def test_incompatible_pair_fails_cleanly(tmp_path: Path) -> None:
    proc = _main("net=simple", "layer=kvt", *FAST, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "layer=kvt" in err and "'branching'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_sweep_cnns_with_the_continuous_kernel_layers(tmp_path: Path) -> None:
    # CCNN's layers in every CNN family at CIFAR size (the default kernel_size=33 fits 32×32).
    proc = _main(
        "-m",
        "net=simple,vgg11,resnet18,ccnn",
        "layer=ckconv,flexconv",
        *FAST,
        "logger=none",
        f"hydra.sweep.dir={tmp_path}",
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(jobs) == 8
    assert not [j.name for j in jobs if not (j / "results.json").is_file()]
