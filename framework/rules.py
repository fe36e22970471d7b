"""Rules declared once and applied to every key of the composed config.

- every float is finite and every int fits in 64 bits, unless :data:`MAY_BE_NON_FINITE` lists
  the key;
- :data:`RANGES`: rates and bounds, written as data (a bound may name another key: ``eta_min``
  is at most ``optimizer.lr``);
- options that have no effect in the composed config (:func:`check_effect`) are refused in a
  single run and warned about once in a multirun sweep, where a grid legitimately pairs them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from convnn import LAYERS, ConvNNBase, layer_options
from framework.errors import ConfigError

__all__ = [
    "MAY_BE_NON_FINITE",
    "RANGES",
    "Range",
    "check_effect",
    "check_network_effect",
    "check_numbers",
    "check_ranges",
]

log = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
#: Floats become float32 tensors (weights, learning rates, masks): larger ones overflow to inf.
FLOAT32_MAX = 3.4028234663852886e38
#: Float keys that may be non-finite (none today: a schema that wants ``inf`` says so here).
MAY_BE_NON_FINITE: tuple[str, ...] = ()


@dataclass(frozen=True)
class Range:
    """``low ≤ value ≤ high`` (open ends with ``low_open``/``high_open``); a bound may be the
    name of another key, whose value is used. ``also``: values accepted outside the range."""

    low: float | str = -math.inf
    high: float | str = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple[Any, ...] = ()
    why: str = ""


#: Rates and bounds (key → range). Keys absent from the composed config are skipped.
RANGES: dict[str, Range] = {
    "optimizer.momentum": Range(0.0, 1.0, why="a momentum above 1 makes the update diverge"),
    "optimizer.dampening": Range(0.0, 1.0),
    "ema.decay": Range(
        0.0,
        1.0,
        high_open=True,
        why="with decay 1 the average never moves from the weights it first copies",
    ),
    "scheduler.eta_min": Range(0.0, "optimizer.lr", why="the floor of a decay is below the lr"),
    "scheduler.min_lr": Range(0.0, "optimizer.lr", why="the floor of a decay is below the lr"),
    "sampling.num_samples": Range(1, INT64_MAX, also=(-1,), why="-1 means every candidate"),
    "sampling.sample_padding": Range(0, INT64_MAX),
    "callbacks.stop_on_nonfinite.patience": Range(1, INT64_MAX),
    "trainer.min_epochs": Range(0, INT64_MAX, also=(None,)),
    "trainer.num_sanity_val_steps": Range(0, INT64_MAX, also=(None, -1)),
    "trainer.log_every_n_steps": Range(1, INT64_MAX),
    "dataset.mixup_alpha": Range(0.0),
    "dataset.cutmix_alpha": Range(0.0),
    "dataset.noise": Range(0.0),
    "analysis.num_images": Range(1, 10_000),
    "analysis.num_queries": Range(1, 10_000),
}


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def check_numbers(cfg: DictConfig) -> None:
    """Every float is finite and fits in float32, every int fits in 64 bits (torch's and numpy's
    integers)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    raw = dict(_leaves(OmegaConf.to_container(cfg, resolve=False)))
    for key, value in _leaves(tree):
        base = key.split("[", 1)[0]
        if isinstance(raw.get(key), str) and "${" in raw[key]:
            continue  # an interpolation: checked (and named) where its value is set
        if isinstance(value, float) and not math.isfinite(value) and base not in MAY_BE_NON_FINITE:
            raise ConfigError(
                f"Invalid configuration: {key}={value} — must be a finite number (NaN and "
                "infinities are refused for every key)."
            )
        if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise ConfigError(
                f"Invalid configuration: {key}={value} — too large: floats must fit in float32 "
                f"(|value| ≤ {FLOAT32_MAX:.4g}), the precision the network computes in."
            )
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise ConfigError(
                f"Invalid configuration: {key}={value} — too large: integers must fit in 64 bits "
                f"(|value| ≤ {INT64_MAX})."
            )


def _bound(cfg: DictConfig, bound: float | str) -> tuple[float, str]:
    if isinstance(bound, str):
        value = OmegaConf.select(cfg, bound)
        return float(value), f"{bound}={value}"
    return float(bound), f"{bound:g}" if math.isfinite(bound) else ("∞" if bound > 0 else "-∞")


_ABSENT = object()


def check_ranges(cfg: DictConfig) -> None:
    """Apply :data:`RANGES` to the keys present in ``cfg``."""
    for key, rule in RANGES.items():
        group = key.split(".", 1)[0]
        node = cfg.get(group)
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or not isinstance(node, DictConfig):
            continue
        if group == "ema" and not node.get("enabled", False):
            continue
        if group == "analysis" and node.get("name") != "neighbours":
            continue
        if value in rule.also and not isinstance(value, bool):
            continue
        low, low_text = _bound(cfg, rule.low)
        high, high_text = _bound(cfg, rule.high)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and (low < value if rule.low_open else low <= value)
        ok = ok and (value < high if rule.high_open else value <= high)
        if ok:
            continue
        left, right = "(" if rule.low_open else "[", ")" if rule.high_open else "]"
        interval = f"{left}{low_text}, {high_text}{right}"
        extra = f" or {', '.join(map(str, rule.also))}" if rule.also else ""
        why = f" ({rule.why})" if rule.why else ""
        raise ConfigError(
            f"Invalid configuration: {key}={value!r} — must be in {interval}{extra}{why}."
        )


# --------------------------------------------------------------------------- without effect
_WARNED: set[str] = set()


def _no_effect(message: str, multirun: bool) -> None:
    """Refuse in a single run; in a multirun warn once per message (a grid pairs options)."""
    if not multirun:
        raise ConfigError(f"Invalid configuration: {message}.")
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s (a sweep may pair options like this; this job runs anyway)", message)


def _sampling_defaults() -> dict[str, Any]:
    from framework.schemas import SamplingConf

    return {f.name: f.default for f in dataclasses.fields(SamplingConf)}


def check_effect(cfg: DictConfig, multirun: bool) -> None:
    """Options the composed config would silently ignore."""
    layer = str(cfg.layer.name)
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    assert isinstance(sampling, dict)
    defaults = _sampling_defaults()
    changed = {k: v for k, v in sampling.items() if defaults.get(k, v) != v}
    if layer in LAYERS and not LAYERS[layer].uses_sampling and changed:
        shown = ", ".join(f"sampling.{k}={v!r}" for k, v in changed.items())
        users = ", ".join(n for n, spec in LAYERS.items() if spec.uses_sampling)
        _no_effect(
            f"{shown} has no effect with layer={layer}, which does not sample candidates; "
            f"layers that sample are {users}",
            multirun,
        )
    elif sampling.get("sampling_type") == "all":
        unused = {k: v for k, v in changed.items() if k in ("num_samples", "sample_padding")}
        if unused:
            shown = ", ".join(f"sampling.{k}={v!r}" for k, v in unused.items())
            _no_effect(
                f"{shown} has no effect with sampling.sampling_type='all' (every token is a "
                "candidate); use sampling=random or sampling=spatial",
                multirun,
            )
    options = layer_options(layer) if layer in LAYERS else {}
    if "shuffle_scale" in cfg.layer and cfg.layer.get("shuffle_pattern") == "NA":
        default = options.get("shuffle_scale")
        if cfg.layer.shuffle_scale != default:
            _no_effect(
                f"layer.shuffle_scale={cfg.layer.shuffle_scale} has no effect with "
                "layer.shuffle_pattern=NA; set layer.shuffle_pattern to B, A or BA",
                multirun,
            )


def check_network_effect(cfg: DictConfig, net: nn.Module, multirun: bool) -> None:
    """Options that depend on the built network: the neighbour analysis needs a ConvNN layer."""
    analysis = cfg.get("analysis")
    if analysis is None or analysis.get("name") != "neighbours":
        return
    if not any(isinstance(m, ConvNNBase) for m in net.modules()):
        _no_effect(
            f"analysis=neighbours has no effect: net={cfg.net._target_.rsplit('.', 1)[-1]} with "
            f"layer={cfg.layer.name} has no ConvNN layer whose neighbours it could record; use "
            "a ConvNN layer (e.g. layer=convnn or layer=branching) or analysis=none",
            multirun,
        )
