"""The kNN peers end to end through main.py (slow: Python + Lightning per run).

ViG's Grapher as the layer of CNNs and ViTs, ViG-Ti, and the patch-dictionary network on the
bundled digits, with a resume that must not recompute the dictionary.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.framework.helpers import run_main

ROOT = Path(__file__).resolve().parents[2]
FAST = ["dataset=fake", "dataset.batch_size=4", "debug=fdr", "logger=none"]
# a small dictionary: digits have 8×8 images, 16 patches of 5×5 each
SMALL_DICT = ["net=patch_knn", "net.n_clusters=32", "net.k=8", "net.n_patches=4096",
              "net.kmeans_iters=5"]  # fmt: skip

pytestmark = pytest.mark.slow


def _main(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run_main(args, timeout=timeout)


def test_vig_layer_in_cnns_and_vig_ti(tmp_path: Path) -> None:
    """Catches: a Grapher that does not fit a CNN stage or the ViG-Ti token grid."""
    proc = _main("-m", "net=simple,resnet18,vig_ti", "layer=vig", *FAST,
                 f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((tmp_path / str(i) / "results.json").is_file() for i in range(3))


def test_vig_token_mixer_in_a_vit(tmp_path: Path) -> None:
    proc = _main("net=vit_tiny", "net.depth=2", "layer=vig", *FAST, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_vig_refuses_vggs_last_stage(tmp_path: Path) -> None:
    """VGG's 2×2 last stage at 32×32 has 4 tokens < k = 9: exit 1 naming the stage and key."""
    proc = _main("net=vgg11", "layer=vig", *FAST, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "layer.kernel_size=9" in proc.stderr
    assert "on a 512×2×2 input" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_patch_knn_trains_and_resumes_without_recomputing(tmp_path: Path) -> None:
    """Catches: a dictionary missing from the checkpoint, recomputed on resume, or a data
    stage that breaks training."""
    base = ["dataset=digits", "trainer=cpu", "logger=none", *SMALL_DICT,
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2"]  # fmt: skip
    run = tmp_path / "run"
    first = _main(*base, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert float(state["net.fitted"]) == 1.0
    second = _main(*base, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run}")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert resumed["net.centroids"].equal(state["net.centroids"])
    assert "patch dictionary" not in second.stderr + second.stdout
    results = json.loads((run / "results.json").read_text())
    assert results
