"""Start-up checks of the analysis and training-recipe options (light imports: no torch)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from framework.errors import ConfigError

__all__ = ["ANALYSES", "AUTO_AUGMENTS", "check_recipes"]

ANALYSES = ("none", "neighbours")
AUTO_AUGMENTS = (None, "randaugment", "trivialaugment")


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"Invalid configuration: {key}={value!r} — {allowed}.")


def _positive_int(node: Any, key: str, prefix: str) -> None:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(f"{prefix}{key}", value, "expected an integer ≥ 1")


def _number(
    node: Any, key: str, prefix: str, low: float, high: float | None, default: Any = None
) -> float:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _fail(f"{prefix}{key}", value, "expected a number")
    if value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f"≥ {low}"
        raise _fail(f"{prefix}{key}", value, f"must be in {span}")
    return float(value)


def check_recipes(cfg: DictConfig) -> None:
    """``analysis``, ``ema`` and the dataset augmentation keys."""
    a = cfg.get("analysis")
    if a:
        name = a.get("name", "none")
        if name not in ANALYSES:
            raise _fail("analysis.name", name, f"choose one of {list(ANALYSES)}")
        if name == "neighbours":
            for key in ("num_images", "num_queries"):
                _positive_int(a, key, "analysis.")
            seed = a.get("seed")
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise _fail("analysis.seed", seed, "expected an integer ≥ 0")

    e = cfg.get("ema")
    if e and e.get("enabled", False):
        _number(e, "decay", "ema.", 0.0, 1.0)
        _positive_int(e, "update_every_n_steps", "ema.")
        start = e.get("update_starting_at_step")
        if start is not None and (
            isinstance(start, bool) or not isinstance(start, int) or start < 0
        ):
            raise _fail("ema.update_starting_at_step", start, "expected null or an integer ≥ 0")

    d = cfg.dataset
    aa = d.get("auto_augment")
    if aa not in AUTO_AUGMENTS:
        raise _fail("dataset.auto_augment", aa, "choose null, randaugment or trivialaugment")
    _number(d, "random_erasing", "dataset.", 0.0, 1.0, default=0.0)
    _number(d, "mixup_alpha", "dataset.", 0.0, None, default=0.0)
    _number(d, "cutmix_alpha", "dataset.", 0.0, None, default=0.0)
