"""Entry point: compose the Hydra config, validate it, train/test, write results.

Examples: ``python main.py experiment=quickstart``,
``python main.py -m layer=conv,convnn seed=0,1``.
"""

import logging

import hydra
from omegaconf import DictConfig

from framework.checks import check_config
from framework.schemas import register_configs

log = logging.getLogger(__name__)

register_configs()


@hydra.main(version_base="1.3", config_path="cfg", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; the return value (test top-1) is what sweepers such as Optuna optimise."""
    check_config(cfg)  # fails fast, before torch and Lightning are even imported
    from framework.train import run

    return run(cfg, validate=False)["test/acc1"]


if __name__ == "__main__":
    main()
