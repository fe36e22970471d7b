"""The console: each line once, the current epoch's numbers, a readable sweep table."""

from __future__ import annotations

import re
from pathlib import Path

from ..framework.helpers import TINY, run_main


def test_each_line_once_with_the_current_epochs_numbers(tmp_path: Path) -> None:
    proc = run_main([*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                     "trainer.enable_model_summary=true", "debug=profiler", "trainer.max_epochs=2",
                     "logger=csv", f"hydra.run.dir={tmp_path}"], env={"CI": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("epoch 1 |") == 1 and out.count("epoch 2 |") == 1  # counted from 1
    assert "epoch 0" not in out
    assert out.count("`Trainer.fit` stopped") == 1
    assert out.count("Trainable params") == 1  # the model summary, once
    assert "Total Flops" not in out and "FLOPs per sample" in out  # our count, not Lightning's 0
    assert "Profiler Report" not in out and "Profile stats" not in out  # in a file instead
    assert out.count(f"fit profiler report: {tmp_path / 'fit-profiler.txt'}") == 1
    assert "FIT Profiler Report" in (tmp_path / "fit-profiler.txt").read_text()
    assert "Tip:" not in out and "litlogger" not in out  # Lightning's product tips
    assert "Deprecat" not in out and "deprecat" not in out  # other packages' warnings
    assert "MulticlassAccuracy" not in out and "MeanMetric" not in out  # not modules to a reader
    assert "| net " in out  # the network is in the summary
    # Without a terminal the mid-epoch lines show this epoch's running means, not the last
    # epoch's: epoch 2's first line differs from epoch 1's summary.
    summary = re.search(r"epoch 1 \|.*train/loss=(\S+)", out)
    first = re.search(r"epoch 2  1/4  train/loss=(\S+)", out)
    assert summary and first, out[-3000:]
    assert first.group(1) != summary.group(1)
    # The main log file holds each line once as well.
    log_text = (tmp_path / "main.log").read_text()
    assert log_text.count("epoch 1 |") == 1 and log_text.count("`Trainer.fit` stopped") == 1
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0].startswith(("best-epoch001-", "best-epoch002-")) and names[1] == "last.ckpt"
    assert "checkpoints: ~" in out and "best " in out and "weights only" in out


def test_sweep_with_a_failed_job_prints_the_full_table_and_its_path(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", *TINY, "optimizer.lr=-1,0.01", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "sweep summary" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if "status" in line)
    for col in ("test/acc1", "test/acc5", "val/acc1_best", "train_time_s"):
        assert col in header  # not cut to "test/ac…"
    assert f"Sweep summary: {sweep / 'sweep_summary.csv'}" in out
    assert "1 of 2 jobs failed" in out and "Traceback" not in out


def test_rich_progress_bar_counts_epochs_from_one() -> None:
    """Lightning's bar shows "Epoch 0/7" for the first of 8 epochs; ours "Epoch 1/8"."""
    from types import SimpleNamespace

    from framework.callbacks import RichEpochBar

    bar = RichEpochBar()
    bar._trainer = SimpleNamespace(max_epochs=8)  # type: ignore[assignment]
    assert bar._get_train_description(0).strip() == "Epoch 1/8"
    assert bar._get_train_description(7).strip() == "Epoch 8/8"
