"""curves.png: drawn from metrics.csv, the best validation epoch found as the checkpoint finds
it, resumed attempts kept across checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

from framework.curves import TrainingCurves, _best_epoch, plot_curves, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, val: list[float]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "lr", "train/loss", "train/acc1", "val/loss", "val/acc1"])
        for e, v in enumerate(val):
            writer.writerow([e, 3 * (e + 1), 0.1 / (e + 1), 1 / (e + 1), v, 1.1 / (e + 1), v])
    return path


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    metrics = _write(tmp_path / "metrics.csv", [0.2, 0.5, 0.5, 0.4])
    out = plot_curves(metrics, tmp_path / "curves.png", resumed_at=[2])
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".curves*"))  # written through a temporary file


def test_best_epoch_is_the_first_maximum() -> None:
    """Ties go to the earlier epoch, as ModelCheckpoint keeps the first best. Catches: marking
    a later epoch than the tested checkpoint."""
    cols = {"epoch": [0.0, 1.0, 2.0, 3.0], "val/acc1": [0.2, 0.5, 0.5, float("nan")]}
    assert _best_epoch(cols) == 1.0
    assert _best_epoch({"epoch": [0.0]}) is None


def test_no_epoch_yet_draws_nothing(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step\n")
    assert read_metrics(metrics) == {}
    assert plot_curves(metrics, tmp_path / "curves.png") is None


def test_resume_points_survive_checkpoints(tmp_path: Path) -> None:
    """An attempt that starts past epoch 0 is recorded; the record travels in the checkpoint,
    and a later attempt from an earlier checkpoint drops the resume points after it. Catches:
    a resumed run's picture that forgets earlier attempts."""
    first = TrainingCurves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    first.on_train_start(SimpleNamespace(current_epoch=0), None)  # type: ignore[arg-type]
    assert first.resumed_at == []
    second = TrainingCurves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    second.load_state_dict(first.state_dict())
    second.on_train_start(SimpleNamespace(current_epoch=3), None)  # type: ignore[arg-type]
    third = TrainingCurves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    third.load_state_dict(second.state_dict())
    third.on_train_start(SimpleNamespace(current_epoch=5), None)  # type: ignore[arg-type]
    assert third.resumed_at == [3, 5]
    fourth = TrainingCurves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    fourth.load_state_dict({"resumed_at": [3, 5]})
    fourth.on_train_start(SimpleNamespace(current_epoch=4), None)  # type: ignore[arg-type]
    assert fourth.resumed_at == [3, 4]
