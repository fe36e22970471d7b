"""A non-finite loss stops the run with a clear message; the last finite checkpoint is kept and
every JSON file stays strict JSON."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from framework.faults import LAST_FINITE, NonFiniteLossError
from framework.train import run, write_json

from ..framework.helpers import TINY, compose_cfg, run_main


def _finite(path: Path) -> bool:
    weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def _reject_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def test_huge_lr_stops_with_the_epoch_named_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path,
) -> None:
    proc = run_main([*TINY, "trainer.max_epochs=6", "optimizer.lr=1e6",
                     "optimizer.weight_decay=0.05", "trainer.gradient_clip_val=null",
                     f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1
    match = re.search(r"Training stopped at epoch (\d+): ", proc.stderr)
    assert match, proc.stderr[-2000:]
    assert "Likely causes" in proc.stderr and "optimizer.lr=1000000.0" in proc.stderr
    assert "Traceback" not in proc.stderr
    epoch = int(match.group(1))  # counted from 1, as a person reads it
    assert 1 <= epoch < 6  # stopped, not trained to the end
    assert not (tmp_path / "results.json").exists()
    last = tmp_path / "checkpoints" / "last.ckpt"
    if epoch == 1:
        assert not last.exists()
    else:  # the epoch before, in Lightning's 0-based count
        assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == epoch - 2
        assert _finite(last)
        assert str(last) in proc.stderr


def test_patience_allows_non_finite_epochs_and_keeps_a_finite_copy(tmp_path: Path) -> None:
    # lr 0.01 in epoch 1, then 1e6: the weights blow up in epoch 2 (counted from 1).
    cfg = compose_cfg([*TINY, "trainer.max_epochs=6", "optimizer=sgd", "optimizer.lr=0.01",
                       "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=1e8",
                       "callbacks.stop_on_nonfinite.patience=2", "trainer.gradient_clip_val=null"],
                      out=tmp_path)
    with pytest.raises(NonFiniteLossError, match="2 non-finite epoch") as err:
        run(cfg)
    spare = tmp_path / "checkpoints" / LAST_FINITE
    assert f"The last finite checkpoint is {spare}" in str(err.value)
    assert "Training stopped at epoch 3" in str(err.value)
    assert torch.load(spare, map_location="cpu", weights_only=True)["epoch"] == 0
    assert _finite(spare)


def test_results_json_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}, "e": None})
    data = json.loads(path.read_text(), parse_constant=_reject_constant)
    assert data == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": None}
