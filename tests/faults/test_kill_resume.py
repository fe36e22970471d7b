"""kill -9 at random points, then resume: the final state equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ..framework.helpers import ROOT, TINY, assert_same, main_cmd, run_main

ARGS = [*TINY, "trainer.max_epochs=3", "trainer.limit_train_batches=15", "net.dropout=0.3",
        "dataset.augment=true", "dataset.noise=0.1", "scheduler=cosine"]


def _state(run_dir: Path) -> dict[str, Any]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    return {k: ckpt[k] for k in ("state_dict", "optimizer_states", "lr_schedulers", "epoch",
                                 "global_step")}


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bitwise_exact(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    proc = run_main([*ARGS, f"hydra.run.dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads((straight / "results.json").read_text())
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    for attempt in range(2):
        run_dir = tmp_path / f"killed{attempt}"
        delay = rng.uniform(0.0, 1.0)
        child = subprocess.Popen(main_cmd(*ARGS, f"hydra.run.dir={run_dir}"), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "CI": "1"})
        last = run_dir / "checkpoints" / "last.ckpt"
        deadline = time.time() + 180
        while not last.exists() and time.time() < deadline and child.poll() is None:
            time.sleep(0.02)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = run_main([*ARGS, "ckpt_path=last", f"hydra.run.dir={run_dir}"])
        assert done.returncode == 0, f"delay {delay:.2f}s: {done.stderr[-3000:]}"
        assert_same(_state(straight), _state(run_dir), f"killed after {delay:.2f}s")
        got = json.loads((run_dir / "results.json").read_text())
        for key in ("test/acc1", "test/acc5", "test/loss", "val/acc1_best", "epochs"):
            assert got[key] == expected[key], key
