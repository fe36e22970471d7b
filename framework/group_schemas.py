"""Schemas of the groups whose nodes are objects of other libraries (loggers, callbacks) or
small option sets (``ema``, ``analysis``): typed at compose time like every other group.

Logger and callback schemas derive from their constructors' signatures (one source of truth);
``ema`` and ``analysis`` are written out. Registered as ``schema/<group>/<name>`` by
:func:`register_group_schemas`; each option's YAML composes its node from one of them.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = ["AnalysisConf", "EmaConf", "register_group_schemas", "signature_schema"]


@dataclass
class EmaConf:
    """``ema``: Lightning's EMA weight averaging (see cfg/ema/on.yaml)."""

    enabled: bool = False
    decay: float = 0.9999
    update_every_n_steps: int = 1
    update_starting_at_step: int | None = None
    use_buffers: bool = True


@dataclass
class AnalysisConf:
    """``analysis``: the neighbour analysis after the test (``name: none`` turns it off)."""

    name: str = "none"
    num_images: int = 8
    num_queries: int = 3
    seed: int = 0


def signature_schema(
    name: str, target: str, func: Any, extra: list[tuple[str, Any, Any]] | None = None
) -> type:
    """A dataclass with ``_target_`` and every keyword of ``func`` (typed by its annotations;
    required ones are ``MISSING``), plus ``extra`` fields (keywords it takes through
    ``**kwargs``)."""
    from framework.schemas import _default, _field_type

    try:
        hints = typing.get_type_hints(func)
    except Exception:  # annotations naming what the module does not import at run time
        hints = {}
    fields: list[tuple[str, Any, Any]] = [("_target_", str, target)]
    for key, p in inspect.signature(func).parameters.items():
        if key == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = MISSING if p.default is p.empty else p.default
        kind = _field_type(hints.get(key, Any))
        if default is not MISSING and default is not None and kind is not Any:
            if not isinstance(default, (int, float, str, bool, list, tuple)):
                kind = Any
        fields.append((key, kind, _default(default)))
    for key, kind, default in extra or []:
        fields.append((key, kind, _default(default)))
    return make_dataclass(name, fields)


def _logger_schemas() -> dict[str, type]:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from framework.loggers import ResumableCSVLogger

    wandb_kwargs: list[tuple[str, Any, Any]] = [
        ("entity", str | None, None),
        ("resume", str | None, None),
        ("group", str | None, None),
        ("tags", list[str], []),
        ("job_type", str | None, None),
    ]
    return {
        "csv": signature_schema(
            "CSVLoggerConf", "framework.loggers.ResumableCSVLogger", ResumableCSVLogger.__init__
        ),
        "tensorboard": signature_schema(
            "TensorBoardLoggerConf",
            "lightning.pytorch.loggers.TensorBoardLogger",
            TensorBoardLogger.__init__,
        ),
        "wandb": signature_schema(
            "WandbLoggerConf",
            "lightning.pytorch.loggers.WandbLogger",
            WandbLogger.__init__,
            wandb_kwargs,
        ),
    }


def _callback_schemas() -> dict[str, type]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from framework.callbacks import auto_progress_bar
    from framework.console import ModelSummaryNoFlops
    from framework.faults import StopOnNonFiniteLoss

    targets = {
        "checkpoint": ("lightning.pytorch.callbacks.ModelCheckpoint", ModelCheckpoint.__init__),
        "lr_monitor": (
            "lightning.pytorch.callbacks.LearningRateMonitor",
            LearningRateMonitor.__init__,
        ),
        "model_summary": ("framework.console.ModelSummaryNoFlops", ModelSummaryNoFlops.__init__),
        "progress": ("framework.callbacks.auto_progress_bar", auto_progress_bar),
        "stop_on_nonfinite": (
            "framework.faults.StopOnNonFiniteLoss",
            StopOnNonFiniteLoss.__init__,
        ),
    }
    return {
        name: signature_schema(f"Callback_{name}", target, func)
        for name, (target, func) in targets.items()
    }


def register_group_schemas() -> None:
    """Register ``schema/ema/ema``, ``schema/analysis/analysis``, ``schema/logger/<name>`` and
    ``schema/callbacks/<name>``."""
    cs = ConfigStore.instance()
    cs.store(group="schema/ema", name="ema", node=EmaConf)
    cs.store(group="schema/analysis", name="analysis", node=AnalysisConf)
    for name, node in _logger_schemas().items():
        cs.store(group="schema/logger", name=name, node=node)
    for name, node in _callback_schemas().items():
        cs.store(group="schema/callbacks", name=name, node=node)
