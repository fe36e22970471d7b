"""Exact resumes: the bookkeeping stored in every checkpoint (the run config, the accumulated
train time), and the resume rule — the allow-list of keys that may change between attempts —
checked before a resume touches anything."""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from framework.checkpoints import LoadedCheckpoint
from framework.errors import ConfigError

__all__ = [
    "ALLOWED",
    "REFUSED",
    "RunConfig",
    "TrainClock",
    "check_resume",
    "config_diff",
    "flatten",
    "matches",
    "run_config",
    "stored_config",
    "total_train_time",
]

log = logging.getLogger(__name__)

# Keys that may change between the attempts of one run (``ckpt_path=...``): how long to train,
# where things are, how data is loaded (not which data or in which order), and what is reported.
# Every other key is refused, with the differing keys listed. An entry matches the key and every
# key under it; ``*`` matches one name. A new schema key must be added here or to REFUSED
# (tests/faults/test_resume_rule.py fails otherwise).
ALLOWED: tuple[str, ...] = (
    # how long to train (the scheduler keeps its horizon, see HORIZON)
    "trainer.max_epochs",
    "trainer.max_steps",
    # paths
    "paths",
    "ckpt_path",
    "init_from",
    "dataset.root",
    "trainer.default_root_dir",
    "callbacks.*.dirpath",
    # reading files and data
    "trust_checkpoint",
    "dataset.num_workers",
    "dataset.pin_memory",
    "dataset.download",
    "dataset.prefetch_factor",
    "dataset.persistent_workers",
    # reporting only
    "name",
    "logger",
    "analysis",
    "test_only",
    "resume_sweep",
    "trainer.log_every_n_steps",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.enable_model_summary",
    "callbacks.progress",
    "callbacks.model_summary",
    # which files are kept: only future best checkpoints change, a resume reads last.ckpt
    "callbacks.checkpoint.save_weights_only",
)
# Refused: the network, its layer and sampling, the data and its batching, the optimisation and
# its schedule, the seed and numerics (precision, determinism, compilation, EMA), how many
# processes split a batch, and what checkpoints keep. Listed so every schema key is classified.
REFUSED: tuple[str, ...] = (
    "net",
    "layer",
    "sampling",
    "optimizer",
    "scheduler",
    "ema",
    "callbacks",
    "seed",
    "criterion",
    "label_smoothing",
    "deterministic",
    "compile",
    "compile_mode",
    "dataset._target_",
    "dataset.name",
    "dataset.batch_size",
    "dataset.resize",
    "dataset.augment",
    "dataset.noise",
    "dataset.val_split",
    "dataset.test_split",
    "dataset.auto_augment",
    "dataset.random_erasing",
    "dataset.mixup_alpha",
    "dataset.cutmix_alpha",
    "dataset.channels",
    "dataset.image_size",
    "dataset.num_classes",
    "dataset.train_size",
    "dataset.test_size",
    "trainer._target_",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.precision",
    "trainer.min_epochs",
    "trainer.max_time",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
    "trainer.accumulate_grad_batches",
    "trainer.check_val_every_n_epoch",
    "trainer.val_check_interval",
    "trainer.limit_train_batches",
    "trainer.num_sanity_val_steps",
    "trainer.fast_dev_run",
    "trainer.overfit_batches",
    "trainer.deterministic",
    "trainer.benchmark",
    "trainer.profiler",
    "trainer.sync_batchnorm",
    "trainer.detect_anomaly",
    "trainer.enable_checkpointing",
    "trainer.use_distributed_sampler",
)
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


def matches(key: str, entry: str) -> bool:
    """Whether ``entry`` of a rule list names ``key`` or a group above it (``*``: one name)."""
    parts, names = entry.split("."), key.split(".")
    return len(names) >= len(parts) and all(
        fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts)
    )


def _matches(key: str, entries: tuple[str, ...]) -> bool:
    return any(matches(key, e) for e in entries)


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
        if not _matches(key, ALLOWED) and not follows_epochs:
            refused.append(key)
        else:
            allowed.append(key)
    return refused, allowed


def _show(value: Any) -> str:
    return "<unset>" if value is _UNSET else repr(value)


_UNSET = object()


def stored_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The run config stored by :class:`RunConfig`, if any."""
    state = ckpt.get("callbacks", {}).get(RunConfig.KEY)
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def check_resume(cfg: DictConfig, checkpoint: LoadedCheckpoint) -> None:
    """Compare the config stored in the checkpoint to resume from (read once at start-up) with
    ``cfg``: :class:`ConfigError` (exit 1, nothing written) for a change outside
    :data:`ALLOWED`, listing every differing key."""
    ckpt_path = checkpoint.path
    old = stored_config(checkpoint.data)
    if "optimizer_states" not in checkpoint.data and not cfg.get("test_only"):
        raise ConfigError(
            f"Invalid configuration: ckpt_path={ckpt_path} holds weights only (a best "
            "checkpoint), so it cannot continue a run: resume from last.ckpt (ckpt_path=last "
            "with hydra.run.dir=<that run>, or ckpt_path=<that run>/checkpoints/last.ckpt), or "
            f"start a new run from these weights with init_from={ckpt_path}."
        )
    if old is None:
        log.warning("%s stores no run config; only its weights are checked", ckpt_path)
        return
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
