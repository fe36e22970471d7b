"""User errors as Hydra prints them: the base lives in the leaf module ``datamodules.errors``;
this module is the one place that turns a :class:`UserError` into a compact Hydra error
(message only, exit 1)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from datamodules.errors import ConfigError, DataError, UserError

__all__ = ["ConfigError", "DataError", "UserError", "refused_options", "reported", "user_errors"]


@functools.cache
def _compact(cls: type[UserError]) -> type[UserError]:
    """``cls`` with :class:`CompactHydraException` mixed in: Hydra prints the message alone,
    and ``except ConfigError`` (or ``DataError``, …) still catches it."""
    return type(cls.__name__, (CompactHydraException, cls), {"__module__": cls.__module__})


def reported(err: UserError) -> UserError:
    """The same error as Hydra reports it (message only, exit 1)."""
    if isinstance(err, CompactHydraException):
        return err
    compact = _compact(type(err))(*err.args)
    compact.__cause__ = err.__cause__
    return compact


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise user errors raised inside the block as Hydra reports them."""
    try:
        yield
    except UserError as err:
        raise reported(err) from None


def refused_options(path: str, node: DictConfig, err: BaseException) -> ConfigError:
    """A constructor's refusal of the options of config node ``path`` (a callback, a logger),
    naming the options its reason mentions (``callbacks.lr_monitor.logging_interval=''``), or
    the node when it mentions none."""
    reason = str(err.__cause__ or err).strip().splitlines()[0]
    named = [
        f"{path}.{key}={_shown(node.get(key))}"
        for key in node
        if not str(key).startswith("_") and str(key) in reason
    ]
    where = ", ".join(named) or path
    return ConfigError(
        f"Invalid configuration: {where} — {node.get('_target_')} refuses it: {reason}."
    )


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
