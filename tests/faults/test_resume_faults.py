"""Resuming: unreadable or foreign checkpoints and changed configs are refused before anything
in the run directory is rewritten; safe changes (more epochs) resume and keep every record."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from framework.resume import config_diff

from ..framework.helpers import TINY, run_main

BASE = [*TINY, "logger=csv", "scheduler=none", "trainer.max_epochs=1"]
KEPT = [".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "model.txt",
        "metrics.csv", "results.json", "csv/metrics.csv", "checkpoints/last.ckpt"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (CLI, so .hydra/ is written)."""
    out = tmp_path_factory.mktemp("base") / "run"
    proc = run_main([*BASE, f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in KEPT}


def _resume(run_dir: Path, *extra: str):
    return run_main([*BASE, *extra, f"hydra.run.dir={run_dir}"])


@pytest.mark.parametrize("damage", ["truncated", pytest.param("garbage", marks=pytest.mark.slow),
                                    pytest.param("empty", marks=pytest.mark.slow)])
def test_unreadable_checkpoint_is_refused_and_nothing_rewritten(run_dir: Path, damage: str) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 100,
                      "empty": b""}[damage])
    before = _snapshot(run_dir)
    proc = _resume(run_dir, "ckpt_path=last")
    assert proc.returncode == 1
    assert f"ckpt_path={last} cannot be read as a checkpoint" in proc.stderr
    assert "truncated or corrupt" in proc.stderr and "best-epoch001" in proc.stderr
    assert "hold(s) weights only: start a new run from it with init_from=PATH" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(run_dir) == before


def test_changed_config_is_refused_with_every_differing_key(run_dir: Path) -> None:
    before = _snapshot(run_dir)
    proc = _resume(run_dir, "ckpt_path=last", "net.channels=[8,32]", "optimizer.lr=0.5",
                   "seed=3", "trainer.max_epochs=2")
    assert proc.returncode == 1
    assert "Differing keys:" in proc.stderr and "Traceback" not in proc.stderr
    keys = proc.stderr.split("Differing keys:")[1].split(". Resume with")[0]
    for key in ("net.channels: [8, 16] → [8, 32]", "optimizer.lr:", "seed: 0 → 3"):
        assert key in keys
    assert "trainer.max_epochs" not in keys  # allowed, so not a reason
    assert _snapshot(run_dir) == before
    # The attempt's own config is kept beside the first one, not over it.
    overrides = (run_dir / ".hydra" / "attempt-2" / "overrides.yaml").read_text()
    assert "seed=3" in overrides


def test_checkpoint_of_another_network_without_stored_config_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if "RunConfig" not in k}
    foreign = tmp_path / "foreign.ckpt"
    torch.save(ckpt, foreign)
    fresh = tmp_path / "fresh"
    proc = run_main([*BASE, "net.channels=[8,32]", f"ckpt_path={foreign}",
                     f"hydra.run.dir={fresh}"])
    assert proc.returncode == 1
    assert "was written for another network" in proc.stderr
    assert "net.features.3.weight" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_more_epochs_resume_and_keep_every_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"  # not a copy: checkpoints remember their folder (best-model state)
    proc = run_main([*BASE, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _snapshot(run_dir)
    first_time = json.loads((run_dir / "results.json").read_text())["train_time_s"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    stored = next(v for k, v in ckpt["callbacks"].items() if k.startswith("TrainClock"))
    proc = _resume(run_dir, "ckpt_path=last", "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2
    assert results["train_time_s"] > stored["train_time_s"] > 0  # accumulated, not restarted
    assert first_time > 0
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "model.txt"):
        assert (run_dir / name).read_bytes() == before[name], name
    assert "trainer.max_epochs=2" in (run_dir / ".hydra/attempt-2/overrides.yaml").read_text()
    # Lightning's step log keeps the first attempt's rows and matches an uninterrupted run.
    straight = tmp_path / "straight"
    proc = run_main([*BASE, "trainer.max_epochs=2", f"hydra.run.dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    def rows(path: Path) -> list[dict[str, str]]:
        return list(csv.DictReader((path / "csv" / "metrics.csv").open()))

    resumed, expected = rows(run_dir), rows(straight)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    assert {"1", "2"} <= {r["epoch"] for r in resumed}  # the first attempt's rows stay
    for a, b in zip(resumed, expected):
        for key in b:
            if b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key


def test_resume_rules() -> None:
    old = {"trainer": {"max_epochs": 10, "max_steps": -1}, "scheduler": {"T_max": 10},
           "dataset": {"num_workers": 2, "batch_size": 32}, "seed": 0, "logger": None}
    more = {"trainer": {"max_epochs": 20, "max_steps": -1}, "scheduler": {"T_max": 20},
            "dataset": {"num_workers": 0, "batch_size": 32}, "seed": 0, "logger": {"csv": 1}}
    refused, allowed = config_diff(old, more)
    assert refused == []
    assert {"trainer.max_epochs", "scheduler.T_max", "dataset.num_workers"} <= set(allowed)
    # A horizon changed on its own, the batch size or the seed break the exact resume.
    other = {**old, "scheduler": {"T_max": 5}, "dataset": {"num_workers": 2, "batch_size": 64},
             "seed": 1}
    refused, _ = config_diff(old, other)
    assert refused == ["dataset.batch_size", "scheduler.T_max", "seed"]
