"""What ``python main.py --help`` lists: the config groups a user picks from (``cfg/``), without
the internal ``schema/*`` groups Hydra's own listing shows, and with ``hydra/launcher``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["CFG_DIR", "config_groups"]

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"


def config_groups(cfg_dir: Path = CFG_DIR) -> str:
    """``group: option, option`` lines for every folder of ``cfg_dir`` holding YAML files."""
    lines = []
    for folder in sorted(p for p in cfg_dir.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options:
            lines.append(f"{folder.relative_to(cfg_dir).as_posix()}: {', '.join(options)}")
    return "\n".join(lines)


if not OmegaConf.has_resolver("config_groups"):
    OmegaConf.register_new_resolver("config_groups", config_groups)
