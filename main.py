"""Entry point: compose the Hydra config, validate it, train/test, write results.

Examples: ``python main.py experiment=quickstart``,
``python main.py -m layer=conv,convnn seed=0,1``.
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import framework.rundir  # noqa: F401  (registers the ${attempt_subdir:} resolver)
from framework.checks import check_config
from framework.schemas import register_configs

log = logging.getLogger(__name__)

register_configs()


@hydra.main(version_base="1.3", config_path="cfg", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; the return value (test top-1) is what sweepers such as Optuna optimise."""
    check_config(cfg)  # fails fast, before torch and Lightning are even imported
    from framework.console import configure_console
    from framework.rundir import locked_run_dir
    from framework.train import run

    configure_console()  # after Lightning's import: one console line per record, rank 0 only
    with locked_run_dir(Path(HydraConfig.get().runtime.output_dir)):  # multirun jobs too
        return run(cfg, validate=False)["test/acc1"]


if __name__ == "__main__":
    main()
