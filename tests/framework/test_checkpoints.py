"""What the checkpoints hold (best: weights only, last: complete), their size line, and one
lineage of the best checkpoint when a run is resumed into another directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework.checkpoints import RunCheckpoint, size_line
from framework.errors import ConfigError
from framework.train import run

from .helpers import TINY, compose_cfg


def _load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of the tiny network (best and last checkpoints)."""
    out = tmp_path_factory.mktemp("first")
    run(compose_cfg([*TINY, "trainer.max_epochs=2"], out=out))
    return out


def test_best_is_weights_only_and_last_is_complete(first_run: Path) -> None:
    results = json.loads((first_run / "results.json").read_text())
    best, last = _load(results["tested_checkpoint"]), _load(first_run / "checkpoints/last.ckpt")
    assert Path(results["tested_checkpoint"]).name.startswith("best-epoch00")
    assert "optimizer_states" not in best and "callbacks" not in best
    assert {"optimizer_states", "callbacks", "lr_schedulers"} <= set(last)
    assert best["state_dict"].keys() == last["state_dict"].keys()


def test_full_best_checkpoints_on_request(tmp_path: Path) -> None:
    results = run(compose_cfg([*TINY, "callbacks.checkpoint.save_weights_only=false"],
                              out=tmp_path))
    assert "optimizer_states" in _load(results["tested_checkpoint"])


def test_best_holds_the_ema_weights(tmp_path: Path) -> None:
    """Lightning skips callbacks' checkpoint hooks for weights-only saves; the best checkpoint
    must still hold what validation measured: the average, not the current weights."""
    results = run(compose_cfg([*TINY, "ema=on", "ema.decay=0.5"], out=tmp_path))
    best = _load(results["tested_checkpoint"])["state_dict"]
    last = _load(tmp_path / "checkpoints" / "last.ckpt")
    key = "net.head.weight"
    assert torch.equal(best[key], last["state_dict"][key])  # EMA weights in both (one epoch)
    assert not torch.equal(best[key], last["current_model_state"][key])


def test_resuming_from_a_weights_only_checkpoint_is_refused(
    first_run: Path, tmp_path: Path
) -> None:
    best = json.loads((first_run / "results.json").read_text())["tested_checkpoint"]
    with pytest.raises(ConfigError, match=r"holds weights only .* resume from last\.ckpt"):
        run(compose_cfg([*TINY, "trainer.max_epochs=3", f"ckpt_path={best}"], out=tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("incumbent", [1.0, -1.0])
def test_resume_into_another_directory_keeps_one_lineage(
    first_run: Path, tmp_path: Path, incumbent: float
) -> None:
    """The old run's best (path and score) is the one to beat: with a score no epoch can reach
    it stays the tested checkpoint; with one every epoch beats, the new directory's best is
    tested and the old file is kept. results.json's score and tested checkpoint always agree."""
    last = _load(first_run / "checkpoints" / "last.ckpt")
    (key,) = [k for k in last["callbacks"] if k.startswith("RunCheckpoint{'monitor': 'val/acc1'")]
    old_best = last["callbacks"][key]["best_model_path"]
    last["callbacks"][key]["best_model_score"] = torch.tensor(incumbent)
    ckpt = tmp_path / "old_last.ckpt"
    torch.save(last, ckpt)
    new = tmp_path / "new"
    results = run(compose_cfg([*TINY, "trainer.max_epochs=3", f"ckpt_path={ckpt}"], out=new))
    new_best = sorted((new / "checkpoints").glob("best-*.ckpt"))
    assert Path(old_best).is_file()  # another run's file is never deleted
    if incumbent == 1.0:
        assert results["tested_checkpoint"] == old_best and not new_best
        assert results["val/acc1_best"] == pytest.approx(1.0)
    else:
        assert [str(p) for p in new_best] == [results["tested_checkpoint"]]
        assert new_best[0].name.startswith("best-epoch003-")  # epoch 3 of 3, counted from 1
        score = float(new_best[0].stem.split("-acc")[1])
        assert results["val/acc1_best"] == pytest.approx(score, abs=1e-4)


def test_size_line_counts_weights_optimizer_and_ema() -> None:
    """25 M float32 parameters (meta tensors: nothing allocated): 0.10 GB of weights, AdamW
    keeps two moments, EMA one more copy; the best checkpoint holds the weights only."""
    net = nn.Linear(5000, 5000, bias=False, device="meta")
    best = RunCheckpoint(monitor="val/acc1", save_weights_only=True)
    last = RunCheckpoint(monitor=None)
    cfg = OmegaConf.create({"optimizer": {"_target_": "torch.optim.AdamW"},
                            "ema": {"enabled": False}})
    assert size_line(net, cfg, [best, last]) == (
        "checkpoints: ~0.40 GB per save (last.ckpt 0.30 GB: weights, AdamW state; "
        "best 0.10 GB: weights only, written when val/acc1 improves)"
    )
    cfg.ema.enabled = True
    assert size_line(net, cfg, [best, last]).startswith(
        "checkpoints: ~0.50 GB per save (last.ckpt 0.40 GB: weights, AdamW state, EMA; "
        "best 0.10 GB: weights only (EMA)"
    )
