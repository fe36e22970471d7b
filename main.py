"""Entry point: compose the Hydra config, validate it, train/test, write results.

Examples: ``python main.py experiment=quickstart``,
``python main.py -m layer=conv,convnn seed=0,1``.
"""

import logging

import hydra
from omegaconf import DictConfig

from framework.schemas import register_configs
from framework.train import run

log = logging.getLogger(__name__)

register_configs()


@hydra.main(version_base="1.3", config_path="cfg", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; the return value (test top-1) is what sweepers such as Optuna optimise."""
    return run(cfg)["test/acc1"]


if __name__ == "__main__":
    main()
