"""A persistent Optuna study for ``hparams_search=optuna``: before the sweeper starts, trials a
killed process left running are marked failed and queued again, ``n_trials`` becomes what is
left of the total, and job folders continue at the study's next trial number (the Optuna
sweeper numbers its jobs from 0 on every call, which would overwrite earlier trials' folders;
see ``framework.rundir.job_subdir``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, read_write

from framework.errors import ConfigError
from framework.rundir import OFFSET_VARIABLE, RunDirLock

__all__ = ["is_optuna", "prepare_study"]

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attribute of trials marked failed here


def is_optuna(config: DictConfig) -> bool:
    """Whether the multirun's sweeper is Optuna's."""
    return "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_") or "").lower()


def _fail(storage: Any, trial_id: int) -> None:
    state = __import__("optuna").trial.TrialState.FAIL
    if hasattr(storage, "set_trial_state_values"):  # optuna ≥ 3
        storage.set_trial_state_values(trial_id, state=state)
    else:
        storage.set_trial_state(trial_id, state)


def prepare_study(config: DictConfig, resume: bool) -> None:
    """Open (or create) the study the sweeper will use; on ``resume`` re-queue the trials a
    killed process left running and count finished trials against ``n_trials``."""
    import optuna

    sweeper = config.hydra.sweeper
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    if storage is None or name is None:
        return  # an in-memory or unnamed study cannot be continued
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    directions = sweeper.direction
    directions = list(directions) if not isinstance(directions, str) else [directions]
    study = optuna.create_study(study_name=str(name), storage=str(storage),
                                directions=directions, load_if_exists=True)
    trials = study.get_trials(deepcopy=False)
    first = len(trials)
    if resume:
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        for t in running:
            lock = RunDirLock(sweep_dir / str(t.number))
            owner = lock.owner()
            if owner and not lock.is_stale(owner):
                raise ConfigError(
                    f"Cannot resume the sweep in {sweep_dir}: trial {t.number} is still running "
                    f"(pid {owner.get('pid')} on {owner.get('host')}). Wait for that process to "
                    "end or stop it, then resume."
                )
            study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
            _fail(study._storage, t._trial_id)
            study.enqueue_trial(t.params)
            log.warning("Trial %d was left running by a killed process: marked failed and "
                        "queued again", t.number)
        done = [t for t in trials if t.state.is_finished() and not t.user_attrs.get(INTERRUPTED)]
        total = int(sweeper.n_trials)
        left = max(total - len(done), 0)
        log.info("Optuna study %s: %d of %d trials done, %d to run", name, len(done), total, left)
        with read_write(config.hydra):  # the sweeper reads n_trials when it is built next
            config.hydra.sweeper.n_trials = left
    os.environ[OFFSET_VARIABLE] = str(first)
