"""Training recipes: the sweep objective, EMA weights, v2 augmentation, MixUp/CutMix, searches."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
