"""framework.report on synthetic run directories (no training): grouping by everything but the
seed, the statistics, the published column, failed/unreadable runs, bad inputs, a 200-job
sweep; and the published table against docs/behaviour.md."""

from __future__ import annotations

import csv
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from framework.published import PUBLISHED, markdown_table
from framework.report import build_report, main, markdown, write_report

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def make_run(
    run_dir: Path,
    *,
    layer: str = "conv",
    lr: float = 1e-3,
    seed: int = 0,
    dataset: str = "digits",
    experiment: str | None = None,
    overrides: list[str] | None = None,
    results: dict[str, Any] | None = None,
    error: str | None = None,
    epochs: int = 3,
) -> Path:
    """A run directory as main.py leaves it: Hydra's snapshot, metrics.csv, results.json or
    error.txt."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    config = {
        "net": {"_target_": "models.simple.SimpleNet", "channels": [8, 16]},
        "layer": {"_target_": "models.layer_factory.LayerFactory", "name": layer,
                  "K": 9 if layer != "conv" else None},
        "optimizer": {"lr": lr},
        "dataset": {"_target_": f"datamodules.{dataset}", "batch_size": 64},
        "trainer": {"max_epochs": epochs},
        "scheduler": {"T_max": "${trainer.max_epochs}"},
        "callbacks": {"checkpoint": {"dirpath": "${paths.output_dir}/checkpoints"}},
        "paths": {"output_dir": "${hydra:runtime.output_dir}", "root_dir": "${launch_dir:}"},
        "seed": seed,
        "ckpt_path": None,
    }
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"layer": layer, "dataset": dataset, "experiment": experiment, "net": "simple",
               "hydra/launcher": "basic"}
    (hydra_dir / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    ov = overrides if overrides is not None else [f"layer={layer}", f"optimizer.lr={lr}",
                                                  f"seed={seed}"]
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(ov))
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "lr", "train/loss", "val/acc1"])
        for e in range(epochs):
            final = (results or {}).get("val/acc1_best", 0.5)
            writer.writerow([e, 10 * (e + 1), lr, 1.0 / (e + 1), final * (1 - 0.4 ** (e + 1))])
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    if error is not None:
        (run_dir / "error.txt").write_text(error)
    return run_dir


def results_for(acc: float, **extra: Any) -> dict[str, Any]:
    return {"test/acc1": acc, "val/acc1_best": acc + 0.01, "epochs": 3, "params": 1466,
            "flops": 156992, "train_time_s": 2.0, "step_time_s": 0.004, **extra}


def test_two_layers_two_seeds_make_two_groups(tmp_path: Path) -> None:
    """Grouping ignores seed and paths; the column is the differing config group; statistics
    are the sample mean/std; sorted by mean test top-1. Catches: seeds splitting groups, a
    population std, the wrong sort order."""
    accs = {("conv", 0): 0.90, ("conv", 1): 0.94, ("branching", 0): 0.95, ("branching", 1): 0.97}
    for i, ((layer, seed), acc) in enumerate(accs.items()):
        make_run(tmp_path / str(i), layer=layer, seed=seed, results=results_for(acc))
    report = build_report([tmp_path])
    assert [g.label for g in report.groups] == ["layer=branching", "layer=conv"]
    conv = report.groups[1]
    stats = conv.stats("test/acc1")
    assert stats is not None and stats["n"] == 2
    assert stats["mean"] == pytest.approx(0.92)
    assert stats["std"] == pytest.approx(statistics.stdev([0.90, 0.94]))
    text = markdown(report)
    assert "| branching | 2 | 96.00 ± 1.41 [95.00, 97.00] |" in text
    assert "published" not in text


def test_200_job_sweep_fixture(tmp_path: Path) -> None:
    """5 layers × 4 learning rates × 10 seeds, 3 failed and 1 corrupt: 20 groups with their own
    statistics, failures listed with their first line, all four files written in seconds.
    Catches: a report that breaks or slows down on real sweep sizes, lost failed jobs."""
    layers = ["conv", "convnn", "branching", "convnn_attn", "attention"]
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]
    expected: dict[tuple[str, float], list[float]] = {}
    job = 0
    for li, layer in enumerate(layers):
        for ri, lr in enumerate(lrs):
            for seed in range(10):
                acc = 0.5 + 0.05 * li + 0.02 * ri + 0.003 * seed
                run_dir = tmp_path / "sweep" / str(job)
                if job in (7, 77, 177):
                    make_run(run_dir, layer=layer, lr=lr, seed=seed,
                             error=f"ConfigError: job {job} broke\nTraceback ...\n")
                elif job == 100:
                    make_run(run_dir, layer=layer, lr=lr, seed=seed)
                    (run_dir / "results.json").write_text('{"test/acc1": 0.9')
                else:
                    make_run(run_dir, layer=layer, lr=lr, seed=seed, results=results_for(acc))
                    expected.setdefault((layer, lr), []).append(acc)
                job += 1
    start = time.perf_counter()
    report = write_report([tmp_path / "sweep"], tmp_path / "out")
    elapsed = time.perf_counter() - start
    assert report is not None and elapsed < 20
    assert len(report.groups) == 20 and sum(len(g.runs) for g in report.groups) == 196
    assert list(report.groups[0].columns) == ["layer", "optimizer.lr"]
    for g in report.groups:
        values = expected[(g.columns["layer"], float(g.columns["optimizer.lr"]))]
        stats = g.stats("test/acc1")
        assert stats is not None
        assert stats["n"] == len(values) and stats["mean"] == pytest.approx(
            statistics.fmean(values))
        assert stats["min"] == pytest.approx(min(values))
    means = [g.stats("test/acc1")["mean"] for g in report.groups]  # type: ignore[index]
    assert means == sorted(means, reverse=True)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Failed runs (3)" in text and "ConfigError: job 77 broke" in text
    assert "Traceback" not in text
    assert "## Unreadable runs (1)" in text and "sweep/100" in text
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert len(rows) == 20 and rows[0]["n"] in ("9", "10")
    for name in ("report_acc.png", "report_curves.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG


def test_published_column_only_for_unmodified_presets(tmp_path: Path) -> None:
    """A preset run gets the published number and the difference; the same preset with the
    layer overridden does not. Catches: comparing a modified run with the paper."""
    make_run(tmp_path / "a", layer="branching", experiment="vgg11_cifar10_branching",
             overrides=["experiment=vgg11_cifar10_branching", "dataset.root=/data"],
             results=results_for(0.80), dataset="cifar10")
    make_run(tmp_path / "b", layer="conv", experiment="vgg11_cifar10_branching",
             overrides=["experiment=vgg11_cifar10_branching", "layer=conv"],
             results=results_for(0.79), dataset="cifar10")
    report = build_report([tmp_path])
    by_layer = {g.columns["layer"]: g for g in report.groups}
    assert by_layer["branching"].published is PUBLISHED["vgg11_cifar10_branching"]
    assert by_layer["conv"].published is None
    text = markdown(report)
    assert "| branching | 1 | 80.00 |" in text and "| 82.8 | -2.80 |" in text
    assert "best test epoch" in text


def test_bad_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing to report → exit 1 with a message; different datasets → separate groups and a
    warning; a corrupt results.json → listed, the rest reported, exit 0."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1
    assert "holds no runs" in caplog.text and "Nothing to report" in caplog.text
    assert not (empty / "report.md").exists()
    assert main([str(tmp_path / "missing")]) == 1
    assert "is not a directory" in caplog.text

    mixed = tmp_path / "mixed"
    make_run(mixed / "0", dataset="digits", results=results_for(0.9))
    make_run(mixed / "1", dataset="cifar10", results=results_for(0.6))
    make_run(mixed / "2", dataset="cifar10", results=None)
    (mixed / "2" / "results.json").write_text("not json")
    caplog.clear()
    assert main([str(mixed), "--ignore", "optimizer.lr"]) == 0
    text = (mixed / "report.md").read_text()
    assert "2 datasets (cifar10, digits)" in text and "not comparable" in text
    assert "| cifar10 | 1 |" in text and "| digits | 1 |" in text
    assert "## Unreadable runs (1)" in text and "unreadable results.json" in text
    assert "unreadable results.json" in caplog.text

    only_failed = tmp_path / "failed"
    make_run(only_failed / "0", error="RuntimeError: out of memory")
    assert main([str(only_failed)]) == 1


def test_ignore_merges_groups(tmp_path: Path) -> None:
    """``--ignore optimizer.lr`` puts runs that differ only in lr in one group."""
    make_run(tmp_path / "0", lr=1e-3, results=results_for(0.9))
    make_run(tmp_path / "1", lr=1e-2, results=results_for(0.8))
    assert len(build_report([tmp_path]).groups) == 2
    (group,) = build_report([tmp_path], ignore=["optimizer.lr"]).groups
    assert len(group.runs) == 2 and group.label == "all runs"


def test_published_table_matches_docs() -> None:
    """docs/behaviour.md holds the table rendered from framework.published and names every
    number in its prose; every preset exists and says it reproduces. Catches: the docs and the
    report quoting different numbers."""
    docs = (ROOT / "docs" / "behaviour.md").read_text()
    assert markdown_table() in docs
    section = docs.split("## Reference numbers", 1)[1].split("\n## ", 1)[0]
    prose = section.split("| preset", 1)[0]
    for preset, ref in PUBLISHED.items():
        assert re.search(rf"\b{ref.top1} %", prose), (preset, ref.top1)
        header = (ROOT / "cfg" / "experiment" / f"{preset}.yaml").read_text()
        assert "reproduces" in header and str(ref.top1) in header
