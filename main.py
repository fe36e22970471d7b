"""Entry point: compose the Hydra config and run the job."""

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="cfg", config_name="config")
def main(cfg: DictConfig) -> None:
    """Placeholder job until the experiment framework lands: show the resolved config."""
    log.info("Resolved config:\n%s", OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    main()
