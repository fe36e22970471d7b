"""Sweeps that resume and report progress: the parameter record, the refusals, the progress line
(fast, no training); and a sweep killed in its third job, resumed (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from framework.errors import ConfigError
from framework.sweep import (
    SWEEP_FILE,
    check_resumable,
    progress_line,
    resume_sweep_job,
    sweep_record,
)

from .helpers import ROOT, TINY, main_cmd, run_main


def _config(task: list[str], sweeper: str = "BasicSweeper", **extra: Any) -> Any:
    return OmegaConf.create({
        "hydra": {"overrides": {"task": task},
                  "sweeper": {"_target_": f"hydra._internal.core_plugins.{sweeper}",
                              "params": None, **extra}},
    })


def test_sweep_record_lists_jobs_in_hydras_order() -> None:
    """Job N of the record is Hydra's job N (the product over swept keys, last key fastest);
    resume_sweep is not a parameter. Catches: a record that numbers jobs differently."""
    record = sweep_record(_config(["layer=conv,branching", "seed=0,1", "resume_sweep=true"]))
    assert record["total"] == 4 and record["overrides"] == ["layer=conv,branching", "seed=0,1"]
    assert record["jobs"] == [["layer=conv", "seed=0"], ["layer=conv", "seed=1"],
                              ["layer=branching", "seed=0"], ["layer=branching", "seed=1"]]
    optuna = sweep_record(_config(["experiment=quickstart"], sweeper="OptunaSweeper",
                                  n_trials=20))
    assert optuna["total"] == 20 and optuna["jobs"] is None


def test_resume_refuses_a_non_sweep_and_changed_parameters(tmp_path: Path) -> None:
    """Exact refusals, naming the differing parameter; unchanged parameters (and a different
    resume_sweep) are accepted. Catches: resuming with a job list that renumbers jobs."""
    record = sweep_record(_config(["layer=conv,branching", "seed=0,1"]))
    with pytest.raises(ConfigError, match=f"hydra.sweep.dir={tmp_path} is not a sweep"):
        check_resumable(tmp_path, record)
    (tmp_path / SWEEP_FILE).write_text(json.dumps(record))
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text("{}")
    again = sweep_record(_config(["layer=conv,branching", "seed=0,1", "+resume_sweep=true"]))
    assert check_resumable(tmp_path, again) == 1
    more = sweep_record(_config(["layer=conv,branching", "seed=0,1,2"]))
    with pytest.raises(ConfigError, match=r"Differing: seed: 0,1 → 0,1,2\. Rerun"):
        check_resumable(tmp_path, more)
    added = sweep_record(_config(["layer=conv,branching", "seed=0,1", "optimizer.lr=0.1"]))
    with pytest.raises(ConfigError, match=r"optimizer\.lr: \(not given\) → 0\.1"):
        check_resumable(tmp_path, added)
    swapped = sweep_record(_config(["seed=0,1", "layer=conv,branching"]))
    order = r"order of the swept parameters \(layer, seed → seed, layer\)"
    with pytest.raises(ConfigError, match=order):
        check_resumable(tmp_path, swapped)


def test_resume_sweep_outside_a_multirun_is_refused(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"resume_sweep": True, "ckpt_path": None,
                            "paths": {"output_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="resume_sweep=true continues a multirun"):
        resume_sweep_job(cfg)
    off = OmegaConf.create({"resume_sweep": False, "ckpt_path": None})
    assert resume_sweep_job(off) == (off, None)


def test_progress_line() -> None:
    """Counts real failures (not jobs that have not run yet) and the ETA from the mean time."""
    rows = [{"status": "ok"}, {"status": "failed", "error": "ValueError: x"},
            {"status": "failed", "error": "no results.json"}]
    assert progress_line(6, True, rows, 24, [40.0, 80.0]) == (
        "job 7/24 done (ok), 1 failed so far, ETA 17m 00s")
    assert progress_line(23, False, rows, 24, [1.0]) == (
        "job 24/24 done (failed), 1 failed so far, sweep complete")
    assert progress_line(0, True, [], None, []) == "job 1/? done (ok), 0 failed so far"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining(tmp_path: Path) -> None:
    """Kill the sweep's process group during its third job, rerun with resume_sweep=true: the
    finished jobs' results.json stay byte-identical, the third job resumes from its last.ckpt
    and ends with the weights of an uninterrupted run, the fourth starts. Catches: retraining
    finished jobs, a resumed job that restarts from scratch or resumes inexactly."""
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY if not a.startswith(("layer=", "trainer.max_epochs",
                                                 "trainer.limit_train_batches"))]
    args = ["-m", *tiny, "trainer.max_epochs=6", "trainer.limit_train_batches=6",
            "layer=conv,branching", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(main_cmd(*args), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = sweep / "2" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 400
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last.exists() and not (sweep / "2" / "results.json").exists()
    before = {i: (sweep / str(i) / "results.json").read_bytes() for i in (0, 1)}
    assert not (sweep / "3").exists()

    done = run_main([*args, "resume_sweep=true"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for i, data in before.items():
        assert (sweep / str(i) / "results.json").read_bytes() == data
    assert "resuming from its last.ckpt" in done.stdout + done.stderr
    assert (sweep / "2" / ".hydra" / "attempt-2").is_dir()
    assert json.loads((sweep / "3" / "results.json").read_text())["epochs"] >= 5
    report = (sweep / "report.md").read_text()
    assert "| branching | 2 |" in report and "| conv | 2 |" in report

    single = tmp_path / "single"
    alone = run_main([*args[1:-3], "layer=branching", "seed=0", f"hydra.run.dir={single}"],
                     timeout=400)
    assert alone.returncode == 0, alone.stderr[-3000:]
    resumed, uninterrupted = _weights(last), _weights(single / "checkpoints" / "last.ckpt")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.slow
def test_optuna_study_continues(tmp_path: Path) -> None:
    """A resumed Optuna search continues its sqlite study: a trial left running is marked
    failed and re-run with its parameters, n_trials is the total, trial folders are numbered
    by trial so earlier ones are untouched. Catches: a fresh study per call, overwritten
    job folders, n_trials counted per call."""
    import optuna

    args = [*TINY, "hparams_search=optuna", f"hydra.sweep.dir={tmp_path}"]
    first = run_main([*args, "hydra.sweeper.n_trials=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = {i: (tmp_path / str(i) / "results.json").read_bytes() for i in (0, 1)}
    study = optuna.load_study(study_name="convnn", storage=f"sqlite:///{tmp_path}/optuna.db")
    killed = study.ask()  # what a killed process leaves behind: a trial that stays RUNNING
    lr = killed.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)

    second = run_main([*args, "hydra.sweeper.n_trials=3", "resume_sweep=true"])
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="convnn",
                               storage=f"sqlite:///{tmp_path}/optuna.db").trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs["interrupted"] and trials[3].params["optimizer.lr"] == lr
    for i, data in before.items():
        assert (tmp_path / str(i) / "results.json").read_bytes() == data
    assert (tmp_path / "3" / "results.json").is_file() and not (tmp_path / "2").exists()
    overrides = (tmp_path / "3" / ".hydra" / "overrides.yaml").read_text()
    assert f"optimizer.lr={lr}" in overrides
