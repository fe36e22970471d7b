"""Start-up by construction: the Lightning ``Trainer``, the data splits and the optimizer and
scheduler are built before any run file, so a value only Lightning, torchvision or
``torch.optim`` rejects is refused at start-up, naming its exact key.

A failure of a constructor that takes many keys (the ``Trainer``) is narrowed down to the keys
that cause it by constructing again without each one; every refusal is a :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from datamodules.base import BaseDataModule
from framework.errors import ConfigError
from models.module import ImageClassifier, param_groups

__all__ = [
    "Batches",
    "build_trainer",
    "check_data",
    "check_optimization",
    "in_debug_preset",
    "in_multirun",
]

log = logging.getLogger(__name__)

# What the Trainer's constructor raises for a value it rejects (Lightning, torch, importlib).
# (AttributeError: a ``max_time`` number, which the Timer takes for a timedelta.)
TRAINER_ERRORS = (
    MisconfigurationException,
    ValueError,
    TypeError,
    RuntimeError,
    ImportError,
    AttributeError,
)
# Everything the Trainer would write or print is off while a failure is narrowed down.
_QUIET = {
    "logger": False,
    "callbacks": [],
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def in_debug_preset() -> bool:
    """Whether a ``debug=...`` preset is composed in (it cuts bounds on purpose)."""
    try:
        return HydraConfig.get().runtime.choices.get("debug") not in (None, "null")
    except ValueError:
        return False


def in_multirun() -> bool:
    """Whether this job is one of a multirun sweep."""
    try:
        return str(HydraConfig.get().mode).endswith("MULTIRUN")
    except ValueError:
        return False


def _show(value: Any) -> str:
    return repr(value)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def trainer_options(cfg: DictConfig) -> dict[str, Any]:
    """The resolved ``trainer`` group as ``Trainer`` keywords (``_target_`` dropped; a value
    with its own ``_target_``, such as ``debug=profiler``'s profiler, instantiated)."""
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(options, dict)
    options.pop("_target_", None)
    for key, value in options.items():
        if isinstance(value, dict) and "_target_" in value:
            try:
                options[key] = instantiate(value)
            except InstantiationException as err:
                reason = str(err.__cause__ or err).strip().splitlines()[0]
                raise ConfigError(
                    f"Invalid configuration: trainer.{key} ({value['_target_']}) cannot be "
                    f"built: {reason}."
                ) from None
    return options


def _failure(options: dict[str, Any], extra: dict[str, Any]) -> BaseException | None:
    """The Trainer's refusal of ``options`` (``None`` when it accepts them)."""
    try:
        with _quiet():
            pl.Trainer(**{**options, **extra})
    except TRAINER_ERRORS as err:
        return err
    return None


def _fails(options: dict[str, Any], extra: dict[str, Any]) -> bool:
    return _failure(options, extra) is not None


def _culprits(options: dict[str, Any], extra: dict[str, Any]) -> list[str]:
    """The smallest set of ``trainer`` keys (greedy) whose values make the Trainer refuse:
    first without loggers and callbacks, else with them (a key that conflicts with one)."""
    context = _QUIET if _fails(options, _QUIET) else extra
    keep = dict(options)
    for key in list(options):
        trial = {k: v for k, v in keep.items() if k != key}
        if _fails(trial, context):
            keep = trial
    return list(keep) if len(keep) < len(options) or len(options) <= 1 else []


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_trainer(cfg: DictConfig, **extra: Any) -> pl.Trainer:
    """``Trainer(**cfg.trainer, **extra)``; a refusal becomes a :class:`ConfigError` naming the
    ``trainer.*`` keys that cause it, their values and Lightning's reason."""
    options = trainer_options(cfg)
    if SLURMEnvironment.detect():  # submitit requeues (see README); Lightning's requeue is off
        plugins = list(extra.get("plugins") or [])
        extra["plugins"] = [*plugins, SLURMEnvironment(auto_requeue=False)]
    try:
        trainer = pl.Trainer(**{**options, **extra})
    except TRAINER_ERRORS as err:
        keys = _culprits(options, extra)
        named = ", ".join(f"trainer.{k}={_show(options[k])}" for k in keys) or "trainer"
        # the culprits' own refusal (another bad key may have been the first to fail)
        alone = None
        if keys:
            culprits = {k: options[k] for k in keys}
            alone = _failure(culprits, _QUIET) or _failure(culprits, extra)
        reason = _reason(alone or err)
        raise ConfigError(
            f"Invalid configuration: {named} — Lightning's Trainer refuses it: {reason} "
            "(see the trainer group in the README's config reference)."
        ) from None
    precision = str(trainer.precision)
    if isinstance(trainer.accelerator, CPUAccelerator) and precision in ("16-true", "16"):
        raise ConfigError(
            f"Invalid configuration: trainer.precision={cfg.trainer.precision!r} on the CPU "
            "keeps the weights in float16, where the training loss overflows to NaN; use "
            "trainer.precision=bf16-mixed or 32-true on the CPU."
        )
    return trainer


# ------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Batches:
    """Batches per epoch each stage will run (after ``limit_*_batches``)."""

    train: int
    val: int
    test: int

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch (optimizer steps come from this and accumulation)."""
        return self.train


def _limited(n: int, limit: int | float) -> int:
    """Lightning's ``limit_*_batches`` rule: an int caps, a float is a fraction (floored)."""
    if isinstance(limit, float):
        return int(n * limit)
    return min(n, int(limit))


def _val_selectors(cfg: DictConfig) -> list[str]:
    """Config keys that select or schedule by a validation metric."""
    keys = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if isinstance(c, DictConfig) and str(c.get("monitor") or "").startswith("val/"):
            keys.append(f"callbacks.{name}.monitor={c.monitor}")
    monitor = cfg.scheduler.get("monitor")
    if monitor is not None and str(monitor).startswith("val/"):
        keys.append(f"scheduler.monitor={monitor}")
    return keys


def _setup(datamodule: BaseDataModule, test_only: bool) -> None:
    """Build the splits now (they are kept for the run): reads or scans every data file once."""
    datamodule.setup("test" if test_only else None)


def check_data(
    cfg: DictConfig, datamodule: BaseDataModule, trainer: pl.Trainer, train: bool = True
) -> Batches:
    """Split sizes and batches per stage; refuses a run that cannot train, validate or test
    (``train=False``: ``test_only``, or a finished run that is only resumed: no training rule)."""
    test_only = not train
    _setup(datamodule, bool(cfg.test_only))
    sizes = datamodule.split_sizes()
    world = max(1, int(trainer.world_size))
    per_device = max(1, datamodule.batch_size // world)

    def count(split: str) -> int:
        n = sizes.get(split, 0)
        return math.ceil(math.ceil(n / world) / per_device) if n else 0

    overfit = trainer.overfit_batches
    limits = {
        "train": trainer.limit_train_batches,
        "val": trainer.limit_val_batches,
        "test": trainer.limit_test_batches,
    }
    full = {s: count(s) for s in ("train", "val", "test")}
    if overfit:
        limits["train"] = limits["val"] = overfit
        full["val"] = full["train"]
    got = {s: _limited(full[s], limits[s]) for s in full}
    batches = Batches(**got)
    key = {s: f"trainer.limit_{s}_batches" for s in full}
    if overfit:
        key["train"] = key["val"] = "trainer.overfit_batches"
    t = cfg.trainer

    def refuse(split: str, why: str) -> ConfigError:
        return ConfigError(
            f"Invalid configuration: {key[split]}={t.get(key[split].split('.')[1])!r} leaves "
            f"{got[split]} of the {full[split]} {split} batches ({sizes.get(split, 0)} images, "
            f"{per_device} per batch and device); {why}. Use a batch count ≥ 1 or a fraction "
            f"of at least {1 / full[split] if full[split] else 1:.3g}."
        )

    if got["test"] == 0:
        raise refuse("test", "the run's results are the test metrics, so it needs a test batch")
    if test_only:
        return batches
    if got["train"] == 0:
        raise refuse("train", "nothing would be trained (use test_only=true to only evaluate)")
    selectors = _val_selectors(cfg)
    if got["val"] == 0 and selectors:
        raise refuse("val", f"{', '.join(selectors)} select by a validation metric")
    _check_schedule(cfg, trainer, batches, selectors)
    log.info(
        "Data: %s images train/val/test, %d/%d/%d batches per epoch",
        "/".join(str(sizes.get(s, 0)) for s in ("train", "val", "test")),
        batches.train,
        batches.val,
        batches.test,
    )
    return batches


def _refuse_or_warn(message: str, cut: bool) -> None:
    """Refuse, or warn once when a ``debug`` preset made the bound legitimately short."""
    if cut:
        log.warning("%s (accepted: a debug preset shortens this run)", message)
        return
    raise ConfigError(f"Invalid configuration: {message}.")


def _check_schedule(
    cfg: DictConfig, trainer: pl.Trainer, batches: Batches, selectors: list[str]
) -> None:
    """Counts bounded by what they count: steps, accumulation, validation epochs, warm-up."""
    t = cfg.trainer
    if trainer.fast_dev_run:
        return
    debug = in_debug_preset()
    if t.max_steps == 0:
        raise ConfigError(
            "Invalid configuration: trainer.max_steps=0 makes no optimizer step, so nothing "
            "would be trained; use -1 (no step limit) or a positive count, or test_only=true."
        )
    if t.accumulate_grad_batches > batches.train:
        raise ConfigError(
            f"Invalid configuration: trainer.accumulate_grad_batches={t.accumulate_grad_batches}"
            f" is more than the {batches.train} training batches of an epoch: the epoch would "
            "end with one down-scaled step. Use at most "
            f"trainer.accumulate_grad_batches={batches.train}."
        )
    vci = t.get("val_check_interval")
    if isinstance(vci, int) and not isinstance(vci, bool) and vci > batches.train:
        if t.check_val_every_n_epoch is not None:
            raise ConfigError(
                f"Invalid configuration: trainer.val_check_interval={vci} batches is more than "
                f"the {batches.train} training batches of an epoch; use at most {batches.train}, "
                "or a fraction in (0, 1]."
            )
    max_epochs = t.max_epochs
    every = t.check_val_every_n_epoch
    if selectors and every is not None and max_epochs not in (None, -1) and every > max_epochs:
        _refuse_or_warn(
            f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs="
            f"{max_epochs}: no validation epoch would run, and {', '.join(selectors)} would "
            f"have nothing to select from; use at most {max_epochs}",
            debug,
        )
    warmup = cfg.scheduler.get("warmup_epochs")
    if warmup is not None and max_epochs not in (None, -1) and warmup >= max_epochs > 0:
        _refuse_or_warn(
            f"scheduler.warmup_epochs={warmup} is not below trainer.max_epochs={max_epochs}: "
            "the run would end during the warm-up and never reach the cosine phase; use a "
            "shorter warm-up",
            debug,
        )


# ----------------------------------------------------------------------- optimizer, scheduler
_OPTIMIZER_WORDS = {
    "learning rate": "lr",
    "epsilon": "eps",
    "beta": "betas",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "dampening": "dampening",
    "nesterov": "nesterov",
}


def _optimizer_key(cfg: DictConfig, message: str) -> str:
    lower = message.lower()
    for word, key in _OPTIMIZER_WORDS.items():
        if word in lower and key in cfg.optimizer:
            return f"optimizer.{key}={cfg.optimizer[key]!r}"
    return f"optimizer={cfg.optimizer._target_}"


def _schedule_lengths(module: ImageClassifier, cfg: DictConfig, batches: Batches) -> dict:
    """What ``configure_optimizers`` passes to schedulers that need the run length."""
    factory = module.scheduler_factory
    func = getattr(factory, "func", factory)
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    t = cfg.trainer
    per_epoch = max(1, math.ceil(batches.train / int(t.accumulate_grad_batches)))
    total = per_epoch * max(1, int(t.max_epochs if t.max_epochs not in (None, -1) else 1))
    if t.max_steps not in (None, -1):
        total = min(total, int(t.max_steps)) if t.max_epochs not in (None, -1) else t.max_steps
    out: dict[str, int] = {}
    if "total_steps" in params and "total_steps" not in getattr(factory, "keywords", {}):
        out["total_steps"] = int(total)
    if "steps_per_epoch" in params:
        out["steps_per_epoch"] = per_epoch
    return out


def check_optimization(module: ImageClassifier, cfg: DictConfig, batches: Batches | None) -> None:
    """Build the optimizer on the network's parameter groups and the scheduler on it; a value
    ``torch.optim`` refuses becomes a :class:`ConfigError` naming the key."""
    weight_decay = float(getattr(module.optimizer_factory, "keywords", {}).get("weight_decay", 0))
    try:
        optimizer = module.optimizer_factory(params=param_groups(module.net, weight_decay))
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"Invalid configuration: {_optimizer_key(cfg, str(err))} — torch.optim refuses it: "
            f"{err}."
        ) from None
    if module.scheduler_factory is None or batches is None:
        return
    lengths = _schedule_lengths(module, cfg, batches)
    try:
        module.scheduler_factory(optimizer, **lengths)
    except (ValueError, TypeError, ZeroDivisionError) as err:
        keys = [k for k in cfg.scheduler if not str(k).startswith("_") and str(k) in str(err)]
        named = ", ".join(f"scheduler.{k}={cfg.scheduler[k]!r}" for k in keys)
        raise ConfigError(
            f"Invalid configuration: {named or 'scheduler=' + str(cfg.scheduler._target_)} — "
            f"the scheduler refuses it: {err}."
        ) from None
