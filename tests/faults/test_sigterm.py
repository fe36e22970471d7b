"""SIGTERM (preemption, time limit): stop at the next batch boundary with a resumable checkpoint
and exit 143; resuming gives the uninterrupted run's weights bit for bit. Real subprocesses,
signals sent at fixed optimizer steps by ``tests/faults/sigterm.py``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ..framework.helpers import TINY, assert_same, run_main

# 2 epochs of 6 batches, with dropout, random augmentation and noise: every source of
# randomness a resume must reproduce.
ARGS = [*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=6", "net.dropout=0.3",
        "dataset.augment=true", "dataset.noise=0.1", "scheduler=cosine", "logger=csv"]
SIGTERM = "+callbacks.sigterm._target_=tests.faults.sigterm.SigtermAt"


def _state(run_dir: Path) -> dict[str, Any]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    return ckpt


@pytest.mark.slow
def test_sigterm_at_fixed_points_then_resume_is_bitwise_exact(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    proc = run_main([*ARGS, f"hydra.run.dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _state(straight)
    # mid first epoch; mid last epoch (the csv logger resumes); the run's last batch (before
    # the last validation: the first epoch's checkpoint stays, the epoch is redone)
    for step, saved_at in ((4, 4), (9, 9), (12, 6)):
        run_dir = tmp_path / f"term{step}"
        proc = run_main([*ARGS, f"hydra.run.dir={run_dir}", SIGTERM],
                        env={"SIGTERM_AT": str(step)})
        assert proc.returncode == 143, proc.stderr[-3000:]
        assert not (run_dir / "results.json").exists()
        saved = _state(run_dir)
        assert saved["global_step"] == saved_at
        proc = run_main([*ARGS, f"hydra.run.dir={run_dir}", SIGTERM, "ckpt_path=last"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = _state(run_dir)
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch"):
            assert_same(resumed[key], expected[key], f"step {step}: {key}")


@pytest.mark.slow
def test_second_sigterm_exits_at_once_without_saving(tmp_path: Path) -> None:
    proc = run_main([*ARGS, f"hydra.run.dir={tmp_path}", SIGTERM], env={"SIGTERM_AT": "2,2"})
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "second SIGTERM" in proc.stderr + proc.stdout
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # nothing new was saved
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_no_batch_boundary_within_the_grace_period_exits_143(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_main([*ARGS, f"hydra.run.dir={tmp_path}", SIGTERM],
                    env={"SIGTERM_AT": "7,1,300"}, timeout=200)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert time.monotonic() - start < 150  # the 300 s step did not finish
    assert "no batch boundary within 30 s" in proc.stderr + proc.stdout
    assert _state(tmp_path)["global_step"] == 6  # the epoch's checkpoint stays the last one
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_sigterm_mid_epoch_with_persistent_workers_resumes_exactly(tmp_path: Path) -> None:
    """Two persistent workers: the loader's position is found through the seed-tagged sampler
    they read from, and their dataset copies follow the resumed epoch."""
    workers = [*ARGS, "dataset.num_workers=2"]
    proc = run_main([*workers, f"hydra.run.dir={tmp_path / 'straight'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "term"
    proc = run_main([*workers, f"hydra.run.dir={run_dir}", SIGTERM], env={"SIGTERM_AT": "4"})
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert _state(run_dir)["global_step"] == 4
    proc = run_main([*workers, f"hydra.run.dir={run_dir}", SIGTERM, "ckpt_path=last"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, expected = _state(run_dir), _state(tmp_path / "straight")
    for key in ("state_dict", "optimizer_states", "global_step"):
        assert_same(resumed[key], expected[key], key)
