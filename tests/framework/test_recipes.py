"""Training recipes: the sweep objective, EMA weights, v2 augmentation, MixUp/CutMix, searches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from framework.checks import ConfigError, check_config
from framework.train import run

from .helpers import TINY, compose_cfg


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_main_returns_the_validation_metric_not_a_test_metric(tmp_path: Path) -> None:
    import main

    cfg = compose_cfg([*TINY, "trainer.limit_train_batches=2"], out=tmp_path)
    value = main.main.__wrapped__(cfg)
    results = _results(tmp_path)
    assert results["val/acc1_best"] != results["test/acc1"]  # the check below can tell them apart
    assert math.isclose(value, results["val/acc1_best"])


# ----------------------------------------------------------------------------------------- EMA
def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_ema_weights_are_validated_saved_and_tested(tmp_path: Path) -> None:
    # decay 1: the average is the weights after the first step, whatever follows.
    ema_run = run(
        compose_cfg([*TINY, "ema=on", "ema.decay=1.0"], out=tmp_path / "ema"),
    )
    one_step = run(compose_cfg([*TINY, "trainer.limit_train_batches=1"], out=tmp_path / "one"))
    three = run(compose_cfg(TINY, out=tmp_path / "three"))
    ema_ckpt = _ckpt(tmp_path / "ema" / "checkpoints" / "last.ckpt")
    ref = _ckpt(tmp_path / "one" / "checkpoints" / "last.ckpt")["state_dict"]
    assert _max_diff(ema_ckpt["state_dict"], ref) == 0.0
    current = _ckpt(tmp_path / "three" / "checkpoints" / "last.ckpt")["state_dict"]
    assert _max_diff(ema_ckpt["current_model_state"], current) == 0.0
    assert _max_diff(ema_ckpt["state_dict"], current) > 0.0
    for key in ("val/acc1_best", "test/acc1", "test/loss"):
        assert ema_run[key] == one_step[key]
    assert ema_run["test/loss"] != three["test/loss"]


def test_ema_resume_is_exact(tmp_path: Path) -> None:
    common = [*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=4", "ema=on"]
    common.append("ema.decay=0.5")
    straight, part = tmp_path / "straight", tmp_path / "part"
    run(compose_cfg(common, out=straight))
    run(compose_cfg([*common, "trainer.max_steps=4"], out=part))
    run(compose_cfg([*common, "ckpt_path=last"], out=part))
    a = _ckpt(straight / "checkpoints" / "last.ckpt")
    b = _ckpt(part / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 1
    assert _max_diff(a["state_dict"], b["state_dict"]) <= 1e-6
    assert _max_diff(a["current_model_state"], b["current_model_state"]) <= 1e-6
    assert float(a["averaging_state"]["n_averaged"]) == float(b["averaging_state"]["n_averaged"])


def test_bad_ema_decay_is_a_config_error(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "ema=on", "ema.decay=1.5"], out=tmp_path)
    with pytest.raises(ConfigError, match=r"ema\.decay=1\.5"):
        check_config(cfg)
