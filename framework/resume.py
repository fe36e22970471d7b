"""Checks before a resume touches anything: the checkpoint is readable, its stored config agrees
with the new one on everything an exact resume depends on, and its weights fit the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError

__all__ = ["REFUSED", "SAFE", "ResumeCheck", "check_resume", "config_diff", "flatten"]

log = logging.getLogger(__name__)

# Changing these between attempts breaks the exact resume: the network, its layer and sampling,
# the data and its batching, the optimisation, the seed, and how many processes split a batch.
REFUSED = (
    "net",
    "layer",
    "sampling",
    "dataset",
    "optimizer",
    "scheduler",
    "seed",
    "criterion",
    "label_smoothing",
    "deterministic",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
    "trainer.limit_train_batches",
    "trainer.overfit_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.sync_batchnorm",
)
# Exceptions inside the refused groups: where the data lives and how it is loaded.
SAFE = ("dataset.root", "dataset.num_workers", "dataset.pin_memory", "dataset.download")
# Scheduler keys that follow trainer.max_epochs; the checkpoint's horizon is kept (see below).
HORIZON = ("scheduler.T_max",)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Keys that differ between the checkpoint's config and the new one: (refused, allowed).

    A scheduler horizon (``scheduler.T_max``) that only follows a changed
    ``trainer.max_epochs`` is allowed: the scheduler state restored from the checkpoint keeps the
    first attempt's horizon."""
    a, b = flatten(old), flatten(new)
    refused: list[str] = []
    allowed: list[str] = []
    max_epochs = (a.get("trainer.max_epochs"), b.get("trainer.max_epochs"))
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        follows_epochs = _matches(key, HORIZON) and (a.get(key), b.get(key)) == max_epochs
        if _matches(key, REFUSED) and not _matches(key, SAFE) and not follows_epochs:
            refused.append(key)
        else:
            allowed.append(key)
    return refused, allowed


def _show(value: Any) -> str:
    return "<unset>" if value is _UNSET else repr(value)


_UNSET = object()


@dataclass
class ResumeCheck:
    """The loaded checkpoint of a resume (``None`` for a fresh run)."""

    path: str | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)


def _load(path: str) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        others = sorted(p.name for p in Path(path).parent.glob("*.ckpt") if str(p) != path)
        hint = (
            f"Other checkpoints there: {', '.join(others)}; resume from one with ckpt_path=PATH."
            if others
            else "No other checkpoint is there; start a new run."
        )
        raise ConfigError(
            f"Invalid configuration: ckpt_path={path} cannot be read as a checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty'}); it is "
            f"truncated or corrupt. {hint}"
        ) from None
    if not isinstance(ckpt, dict):
        raise ConfigError(
            f"Invalid configuration: ckpt_path={path} holds a {type(ckpt).__name__}, not a "
            "checkpoint dictionary; give a checkpoint written by a run."
        )
    return ckpt


def stored_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The run config stored by :class:`framework.faults.RunConfig`, if any."""
    for key, state in ckpt.get("callbacks", {}).items():
        if str(key).startswith("RunConfig") and isinstance(state, dict):
            config = state.get("config")
            return config if isinstance(config, dict) else None
    return None


def check_resume(cfg: DictConfig, ckpt_path: str | None) -> ResumeCheck:
    """Load the checkpoint to resume from and compare its stored config with ``cfg``.

    Raises :class:`ConfigError` (exit 1, nothing written) for an unreadable checkpoint or a
    config change that breaks the exact resume, listing every differing key."""
    if ckpt_path is None:
        return ResumeCheck()
    ckpt = _load(ckpt_path)
    old = stored_config(ckpt)
    if old is None:
        log.warning("%s stores no run config; only its weights are checked", ckpt_path)
        return ResumeCheck(ckpt_path, ckpt)
    new = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(new, dict)
    new.pop("paths", None)
    refused, allowed = config_diff(old, new)
    a, b = flatten(old), flatten(new)
    if refused and not cfg.get("test_only"):
        changes = "; ".join(
            f"{k}: {_show(a.get(k, _UNSET))} → {_show(b.get(k, _UNSET))}" for k in refused
        )
        raise ConfigError(
            f"Invalid configuration: resuming {ckpt_path} with a different config would not "
            f"continue the same run. Differing keys: {changes}. Resume with the original values "
            "(see .hydra/config.yaml of the run directory), or start a new run directory with "
            "init_from=PATH to reuse the weights."
        )
    for key in (k for k in allowed if k != "ckpt_path"):
        log.info("resume: %s %s → %s", key, _show(a.get(key, _UNSET)), _show(b.get(key, _UNSET)))
    if "trainer.max_epochs" in allowed and any(_matches(k, HORIZON) for k in allowed):
        log.warning(
            "resume: trainer.max_epochs changed; the learning-rate schedule keeps the horizon "
            "stored in the checkpoint (scheduler.T_max=%s), so epochs past it follow the "
            "scheduler's continuation rather than a stretched schedule",
            a.get("scheduler.T_max"),
        )
    return ResumeCheck(ckpt_path, ckpt)
