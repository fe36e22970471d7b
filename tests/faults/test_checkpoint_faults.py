"""Checkpoint writes that fail stop the run at once; blocked outputs are found at start-up."""

from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

import pytest
import torch

from framework import checkpoints
from framework.checkpoints import CheckpointWriteError
from framework.train import run

from ..framework.helpers import TINY, compose_cfg, run_main


def _fail_fsync_after(monkeypatch: pytest.MonkeyPatch, ok_calls: int) -> list[int]:
    """Make checkpoint writes hit ENOSPC (after ``ok_calls`` good ones), mid-file."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > ok_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    return calls


def test_disk_full_stops_the_run_at_once_and_keeps_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two checkpoints per epoch (best, last): the third write (epoch 1) fails.
    _fail_fsync_after(monkeypatch, ok_calls=2)
    cfg = compose_cfg([*TINY, "trainer.max_epochs=4", "scheduler=none"], out=tmp_path)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as err:
        run(cfg)
    assert "ckpt_path=last" in str(err.value)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # stopped in epoch 2, not trained on
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) == []  # no temp
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0  # the earlier checkpoint is intact
    assert not (tmp_path / "results.json").exists()


def test_first_checkpoint_failing_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_fsync_after(monkeypatch, ok_calls=0)
    cfg = compose_cfg([*TINY, "trainer.max_epochs=3"], out=tmp_path)
    with pytest.raises(CheckpointWriteError):
        run(cfg)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_checkpoint_dir_that_cannot_exist_fails_at_start_up(tmp_path: Path) -> None:
    """`checkpoints` under a regular file cannot be created, even by root: exit 1 before
    training, with the folder named and no traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    out = tmp_path / "run"
    proc = run_main([*TINY, f"hydra.run.dir={out}",
                     f"callbacks.last_checkpoint.dirpath={blocker}/ckpt"])
    assert proc.returncode == 1
    assert f"Cannot write into {blocker}/ckpt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.csv").exists()  # nothing trained


def test_results_path_blocked_by_a_directory_fails_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "results.json").mkdir(parents=True)
    proc = run_main([*TINY, f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1
    assert f"Cannot write {tmp_path / 'results.json'}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.csv").exists()
