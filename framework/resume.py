"""Exact resumes: the bookkeeping stored in every checkpoint (the run config, the accumulated
train time), and the checks before a resume touches anything: the checkpoint is readable, its
stored config agrees with the new one on everything an exact resume depends on."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError

__all__ = [
    "REFUSED",
    "SAFE",
    "ResumeCheck",
    "RunConfig",
    "TrainClock",
    "check_resume",
    "config_diff",
    "flatten",
    "run_config",
    "stored_config",
    "total_train_time",
]

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


# ---------------------------------------------------------------------- resume bookkeeping
class TrainClock(Callback):
    """Keeps the training time of earlier attempts in the checkpoint, so ``train_time_s`` of a
    resumed run counts the whole run, not only the resumed part."""

    def __init__(self) -> None:
        self.before = 0.0
        self._start: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start this attempt's clock."""
        self._start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """Training time up to this checkpoint, all attempts together."""
        now = 0.0 if self._start is None else time.perf_counter() - self._start
        return {"train_time_s": self.before + now}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Time spent by the attempts before this one."""
        self.before = float(state_dict.get("train_time_s", 0.0))


class RunConfig(Callback):
    """Stores the resolved run config in every checkpoint, so a resume can be checked against
    the config that produced it."""

    KEY = "RunConfig"  # where the checkpoint keeps it: ckpt["callbacks"][KEY]

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    @property
    def state_key(self) -> str:
        """The fixed key of this state in ``ckpt["callbacks"]``, read by :func:`stored_config`."""
        return self.KEY

    def state_dict(self) -> dict[str, Any]:
        """The config (plain containers: loadable with ``weights_only=True``)."""
        return {"config": self.config}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the config was compared before training started."""


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as stored in checkpoints and compared on resume (without ``paths``,
    which may change)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    resolved.pop("paths", None)
    return resolved


def total_train_time(trainer: pl.Trainer, this_attempt: float) -> float:
    """``this_attempt`` plus the training time of earlier attempts (from the checkpoint)."""
    before = sum(cb.before for cb in trainer.callbacks if isinstance(cb, TrainClock))
    return before + this_attempt


# ------------------------------------------------------------------------- resume checks
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


def _other_checkpoints(path: str) -> str:
    """What else the folder offers: ``last*.ckpt`` resume a run; the best checkpoints hold
    weights only and start a new run with ``init_from``."""
    others = sorted(p.name for p in Path(path).parent.glob("*.ckpt") if str(p) != path)
    full = [n for n in others if n.startswith("last")]
    weights = [n for n in others if not n.startswith("last")]
    hints = []
    if full:
        hints.append(f"Resume from {' or '.join(full)} there with ckpt_path=PATH.")
    if weights:
        hints.append(
            f"{', '.join(weights)} there hold(s) weights only: start a new run from it with "
            "init_from=PATH."
        )
    return " ".join(hints) or "No other checkpoint is there; start a new run."


def _load(path: str) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        hint = _other_checkpoints(path)
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
    """The run config stored by :class:`RunConfig`, if any."""
    state = ckpt.get("callbacks", {}).get(RunConfig.KEY)
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def check_resume(cfg: DictConfig, ckpt_path: str | None) -> ResumeCheck:
    """Load the checkpoint to resume from and compare its stored config with ``cfg``.

    Raises :class:`ConfigError` (exit 1, nothing written) for an unreadable checkpoint or a
    config change that breaks the exact resume, listing every differing key."""
    if ckpt_path is None:
        return ResumeCheck()
    ckpt = _load(ckpt_path)
    if "optimizer_states" not in ckpt and not cfg.get("test_only"):
        raise ConfigError(
            f"Invalid configuration: ckpt_path={ckpt_path} holds weights only (a best "
            "checkpoint), so it cannot continue a run: resume from last.ckpt (ckpt_path=last "
            "with hydra.run.dir=<that run>, or ckpt_path=<that run>/checkpoints/last.ckpt), or "
            f"start a new run from these weights with init_from={ckpt_path}."
        )
    old = stored_config(ckpt)
    if old is None:
        log.warning("%s stores no run config; only its weights are checked", ckpt_path)
        return ResumeCheck(ckpt_path, ckpt)
    new = run_config(cfg)
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
