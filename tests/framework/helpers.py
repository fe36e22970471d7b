"""Helpers for the framework tests: composing configs, running main.py, writing tiny data."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from framework.schemas import register_configs

register_configs()
ROOT = Path(__file__).resolve().parents[2]
CFG_DIR = str(ROOT / "cfg")

# A tiny, fast model and run on the bundled digits.
TINY = [
    "dataset=digits",
    "layer=conv",
    "net.num_layers=2",
    "net.channels=[8,16]",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_model_summary=false",
    "dataset.batch_size=32",
    "logger=none",
]


def compose_cfg(overrides: Sequence[str], out: Path | None = None) -> DictConfig:
    """Compose cfg/config.yaml like main.py does; ``out`` becomes the run directory."""
    paths = [] if out is None else [f"paths.output_dir={out}", f"paths.root_dir={ROOT}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CFG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *paths])


def main_cmd(*args: str) -> list[str]:
    """Command line of main.py with the test interpreter."""
    return [sys.executable, str(ROOT / "main.py"), *args]


def run_main(
    args: Sequence[str],
    timeout: float = 240,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run main.py in a subprocess, from the repository root unless ``cwd`` is given."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        main_cmd(*args),
        cwd=ROOT if cwd is None else cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def write_tiny_cifar(root: Path, n_train: int = 60, n_test: int = 20, classes: int = 10) -> Path:
    """Write CIFAR-10 files in the real ``cifar-10-batches-py`` pickle format."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = n_train // 5
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, per_batch)]
        with (base / f"data_batch_{i}").open("wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": "x"}, f)
    test = {
        "data": rng.integers(0, 256, (n_test, 3 * 32 * 32), dtype=np.uint8),
        "labels": [int(x) for x in rng.integers(0, classes, n_test)],
    }
    with (base / "test_batch").open("wb") as f:
        pickle.dump(test, f)
    with (base / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(classes)]}, f)
    return base


def write_tiny_imagefolder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """Write ``root/{train,val}/<class>/*.png`` with random 40×48 RGB images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested checkpoint contents (tensors, dicts, lists, values)."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
