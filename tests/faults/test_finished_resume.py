"""Resuming a run that already finished: with the same ``trainer.max_epochs`` it is complete
(logged, nothing written, exit 0), with more epochs it continues; with every logger."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from framework.train import run

from ..framework.helpers import TINY, compose_cfg

LOGGERS = ["csv", pytest.param("tensorboard", marks=pytest.mark.slow),
           pytest.param("wandb", marks=pytest.mark.slow)]


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file but Hydra's, the log and wandb's own debug logs (its service process, which
    outlives ``wandb.finish()``, appends to them), with size and modification time."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run_dir.rglob("*")
        if p.is_file()
        and p.parts[len(run_dir.parts)] not in (".hydra", "main.log")
        and not (p.parts[len(run_dir.parts)] == "wandb" and p.name.startswith("debug"))
    }


@pytest.mark.parametrize("logger", LOGGERS)
def test_finished_run_resume_writes_nothing_and_more_epochs_continue(
    tmp_path: Path, logger: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = [*TINY, f"logger={logger}", "trainer.max_epochs=1"]
    first = run(compose_cfg(args, out=tmp_path))
    before = _files(tmp_path)
    with caplog.at_level(logging.INFO):
        again = run(compose_cfg([*args, "ckpt_path=last"], out=tmp_path))
    assert "run already complete" in caplog.text
    assert _files(tmp_path) == before  # not a byte written
    assert again == first == json.loads((tmp_path / "results.json").read_text())
    more = run(compose_cfg([*TINY, f"logger={logger}", "trainer.max_epochs=2", "ckpt_path=last"],
                           out=tmp_path))
    assert more["epochs"] == 2 and more["global_step"] == 2 * first["global_step"]
