"""DDP with two CPU processes (gloo): same metrics as one process at the same global batch, one
results.json, checkpoints written once, each console line once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from framework.rundir import LOCK_NAME

from ..framework.helpers import run_main

# A BatchNorm-free network (per-process BatchNorm statistics would differ from one process's)
# and a fixed batch order (overfit_batches turns shuffling off in both runs).
VIT = ["dataset=digits", "net=vit_tiny", "layer=attention", "net.dim=16", "net.depth=1",
       "net.mlp_dim=32", "net.patch_size=2", "net.dropout=0.0", "scheduler=none", "logger=csv",
       "dataset.batch_size=32", "trainer.max_epochs=2", "trainer.overfit_batches=3",
       "trainer.limit_test_batches=2", "trainer.enable_model_summary=false"]
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


@pytest.mark.slow
def test_two_process_cpu_ddp_matches_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_main([*VIT, "trainer=cpu", f"hydra.run.dir={one}"], env={"CI": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_main([*VIT, *DDP, f"hydra.run.dir={two}"], env={"CI": "1"}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("epoch 1 |") == 1 and out.count("`Trainer.fit` stopped") == 1
    a, b = _rows(one), _rows(two)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2"]
    for ra, rb in zip(a, b):
        for key in ra:
            assert float(rb[key]) == pytest.approx(float(ra[key]), abs=1e-5), key
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for key in ("test/acc1", "test/acc5", "test/loss", "val/acc1_best", "global_step"):
        assert rb[key] == pytest.approx(ra[key], abs=1e-5), key
    assert len(list(tmp_path.rglob("results.json"))) == 2  # one per run, none from rank 1
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (one / "checkpoints").iterdir())
    assert len(names) == 2 and "last.ckpt" in names  # best + last, no -v1 duplicates
    assert (two / "train_ddp_process_1.log").is_file()  # rank 1 logs to its own file
    assert not (two / LOCK_NAME).exists()


@pytest.mark.slow
def test_cpu_ddp_with_batchnorm_runs(tmp_path: Path) -> None:
    """cfg/trainer/ddp.yaml asks for SyncBatchNorm, which DDP refuses on CPU modules."""
    proc = run_main(["dataset=digits", "layer=conv", "net.num_layers=2", "net.channels=[8,16]",
                     "logger=none", "dataset.batch_size=32", "trainer.fast_dev_run=true", *DDP,
                     f"hydra.run.dir={tmp_path}"], env={"CI": "1"}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SyncBatchNorm" not in proc.stderr
    assert (tmp_path / "results.json").is_file()



@pytest.mark.slow
def test_ddp_evaluates_every_image_once(tmp_path: Path) -> None:
    """1 vs 2 processes with odd splits (130 validation, 361 test images: a padding sampler
    counts an image twice, and the test shards get 11 and 10 batches): the same validation
    metrics after the same two training steps, and the same checkpoint tests identically."""
    data = [*VIT[:-5], "dataset.batch_size=36", "dataset.test_split=0.2005",
            "dataset.val_split=0.0905", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    one, two, same = tmp_path / "one", tmp_path / "two", tmp_path / "same"
    proc = run_main([*data, "trainer=cpu", f"hydra.run.dir={one}"], env={"CI": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = one / "checkpoints" / "last.ckpt"
    runs = ((two, []), (same, ["test_only=true", f"init_from={ckpt}"]))
    for run_dir, extra in runs:
        proc = run_main([*data, *DDP, *extra, f"hydra.run.dir={run_dir}"], env={"CI": "1"},
                        timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "DistributedSampler" not in proc.stderr + proc.stdout
    (ra,), (rb,) = _rows(one), _rows(two)
    for key in ("val/acc1", "val/acc5", "val/loss"):
        assert float(rb[key]) == pytest.approx(float(ra[key]), abs=1e-5), key
    a, b, c = (json.loads((d / "results.json").read_text()) for d in (one, two, same))
    for key in ("test/acc1", "test/acc5", "test/loss"):
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
        assert c[key] == pytest.approx(a[key], abs=1e-6), key
