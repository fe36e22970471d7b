"""Entry point: compose the Hydra config, validate it, train/test, write results.

Examples: ``python main.py experiment=quickstart``,
``python main.py -m layer=conv,convnn seed=0,1``.
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

import framework.cli  # (registers ${config_groups:} for --help)
import framework.rundir  # noqa: F401  (registers ${attempt_subdir:}, ${launch_dir:}, ${job_dir:})
from framework.console import configure_console
from framework.errors import user_errors
from framework.rundir import locked_run_dir
from framework.schemas import register_configs
from framework.sweep import resume_sweep_job
from framework.train import run

log = logging.getLogger(__name__)

# What a sweeper (e.g. Optuna) optimises: the best validation top-1, never a test metric.
OBJECTIVE = "val/acc1_best"

register_configs()


@hydra.main(version_base="1.3", config_path="cfg", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; returns the best validation top-1 (what sweepers such as Optuna optimise;
    NaN when the run did no validation epoch)."""
    configure_console()  # one console line per record, rank 0 only
    with user_errors(), locked_run_dir(Path(cfg.paths.output_dir)):  # multirun jobs too
        cfg, finished = resume_sweep_job(cfg)  # a resumed sweep keeps its finished jobs
        value = (finished if finished is not None else run(cfg))[OBJECTIVE]
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    main()
