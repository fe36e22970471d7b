"""End-to-end training runs on tiny configs: outputs, exact resume, SIGKILL, init_from, sweeps."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from framework.inspect import load_weights
from framework.train import run

from .helpers import ROOT, TINY, compose_cfg, main_cmd, run_main

RESULT_KEYS = {"test/acc1", "test/acc5", "test/loss", "val/acc1_best", "epochs", "train_time_s",
               "params"}


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_digits_run_writes_every_output(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "trainer.max_epochs=2", "logger=csv"], out=tmp_path)
    results = run(cfg)
    assert RESULT_KEYS <= set(results)
    assert _results(tmp_path) == results
    assert 0.0 <= results["test/acc1"] <= results["test/acc5"] <= 1.0
    assert results["epochs"] == 2 and results["params"] > 0
    assert results["tested_checkpoint"].startswith(str(tmp_path / "checkpoints" / "best-"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    model_txt = (tmp_path / "model.txt").read_text()
    assert "SimpleNet" in model_txt and "FLOPs" in model_txt and "parameters" in model_txt
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # counted from 1
    assert {"train/loss", "val/acc1", "lr"} <= set(rows[0])
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < results["step_time_s"] < results["train_time_s"]


def test_fast_dev_run_cli_writes_results(tmp_path: Path) -> None:
    """The quickstart runs end to end with debug=fdr and writes results.json (every other preset
    is run the same way, on dataset=fake, in tests/models/test_backbone_cli.py)."""
    proc = run_main(["experiment=quickstart", "debug=fdr", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path)
    assert RESULT_KEYS <= set(results) and results["tested_checkpoint"] is None
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert f"Run directory: {tmp_path}" in proc.stdout + proc.stderr


def test_resume_is_exact(tmp_path: Path) -> None:
    common = [*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=4", "net.dropout=0.3",
              "dataset.augment=true", "dataset.noise=0.1", "scheduler=cosine"]
    straight, part = tmp_path / "straight", tmp_path / "part"
    run(compose_cfg(common, out=straight))
    run(compose_cfg([*common, "trainer.max_steps=4"], out=part))  # stops after epoch 1 of 2
    first = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 0
    resumed = run(compose_cfg([*common, "ckpt_path=last"], out=part))
    assert resumed["epochs"] == 2
    a = _weights(straight / "checkpoints" / "last.ckpt")
    b = _weights(part / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= 1e-6
    rows = list(csv.DictReader((part / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # counted from 1
    states = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu",
                        weights_only=True)["callbacks"]
    curves = [v for k, v in states.items() if k.startswith("TrainingCurves")]
    assert curves == [{"resumed_at": [1]}]  # curves.png marks where the second attempt began
    assert (part / "curves.png").is_file()


def test_init_from_partial_load_and_test_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    run(compose_cfg(TINY, out=src))
    ckpt = src / "checkpoints" / "last.ckpt"
    # A 5-class head: the head is re-initialised, the rest loads.
    cfg = compose_cfg([*TINY, "dataset=fake", "dataset.channels=1", "dataset.image_size=8",
                       "dataset.num_classes=5", f"init_from={ckpt}", "trainer.max_epochs=1",
                       "dataset.train_size=64", "dataset.test_size=16"], out=tmp_path / "ft")
    from framework.build import build_datamodule, build_layer, build_module, build_net

    dm = build_datamodule(cfg)
    net = build_net(cfg, build_layer(cfg), dm.dims, dm.num_classes)
    module = build_module(cfg, net, dm.num_classes)
    report = load_weights(module, str(ckpt))
    assert report["reinitialised"] == ["net.head.bias", "net.head.weight"]
    assert report["missing"] == [] and report["unexpected"] == []
    src_w = _weights(ckpt)
    key = "net.features.0.weight"
    assert torch.equal(module.state_dict()[key], src_w[key])
    results = run(cfg)
    assert results["epochs"] == 1
    # test_only evaluates the given weights without training.
    out = tmp_path / "eval"
    results = run(compose_cfg([*TINY, f"init_from={ckpt}", "test_only=true"], out=out))
    assert results["epochs"] == 0 and not (out / "checkpoints").exists()
    assert 0.0 <= results["test/acc1"] <= 1.0


def test_sigkill_then_resume(tmp_path: Path) -> None:
    args = [*TINY, "trainer.max_epochs=200", "trainer.limit_train_batches=null",
            "trainer.limit_val_batches=null", "scheduler=none", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(main_cmd(*args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "CI": "1"})
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    try:
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert last.exists(), "no checkpoint appeared"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    resume = [*args[:-1], f"trainer.max_epochs={epoch + 2}", "ckpt_path=last", args[-1]]
    done = run_main(resume)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _results(tmp_path)["epochs"] == epoch + 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epoch + 3))


def test_multirun_summary_survives_a_failing_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", *TINY, "optimizer.lr=-1,0.01",
                     f"hydra.sweep.dir={sweep}"], timeout=400)
    assert proc.returncode != 0  # the failing jobs are reported...
    assert "optimizer.lr=-1" in proc.stderr and "Traceback" not in proc.stderr
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert len(rows) == 2  # ...and the other job's results are kept
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["optimizer.lr"] for r in ok] == ["0.01"]
    assert all(0 <= float(r["test/acc1"]) <= 1 for r in ok)
    assert all("optimizer.lr=-1" in r["error"] for r in rows if r["status"] == "failed")
    report = (sweep / "report.md").read_text()  # written although Hydra skipped multirun_end
    assert "## Failed runs (1)" in report and "optimizer.lr=-1" in report
    assert "job 2/2 done" in proc.stdout + proc.stderr


def test_multirun_without_sweep_dir_from_another_directory(tmp_path: Path) -> None:
    """Neither ``hydra.sweep.dir`` nor ``paths.root_dir`` is set, as a user types it, from a
    directory outside the checkout: the sweep lands under ``<cwd>/outputs/multirun``."""
    proc = run_main(["-m", *TINY, "layer=conv", "seed=0,1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep summary" in proc.stdout and "test/acc1" in proc.stdout
    (summary,) = tmp_path.glob("outputs/multirun/*/*/sweep_summary.csv")
    rows = list(csv.DictReader(summary.open()))
    assert [(r["seed"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]


def test_wandb_offline_run_and_resume_keep_the_run(tmp_path: Path) -> None:
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    os.makedirs(env["WANDB_DIR"])
    run_dir = tmp_path / "run"
    args = [*TINY, "logger=wandb", f"hydra.run.dir={run_dir}"]
    first = run_main(args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    runs = list(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    second = run_main([*args, "trainer.max_epochs=2", "ckpt_path=last"], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert all(r.name.endswith(run_id) for r in runs)
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id


@pytest.mark.slow
def test_quickstart_reaches_90_percent(tmp_path: Path) -> None:
    start = time.time()
    proc = run_main(["experiment=quickstart", f"hydra.run.dir={tmp_path}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path)
    assert results["test/acc1"] >= 0.90, results
    assert time.time() - start < 400


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    proc = run_main([*TINY, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                     f"hydra.run.dir={tmp_path}"], timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path)
    assert RESULT_KEYS <= set(results)
    assert len(list(tmp_path.rglob("results.json"))) == 1


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", "hydra/launcher=local", *TINY, "seed=0,1",
                     f"hydra.sweep.dir={sweep}"], timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"]
