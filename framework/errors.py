"""User errors as Hydra prints them: the base lives in the leaf module ``datamodules.errors``;
this module is the one place that turns a :class:`UserError` into a compact Hydra error
(message only, exit 1)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import CompactHydraException

from datamodules.errors import ConfigError, DataError, UserError

__all__ = ["ConfigError", "DataError", "UserError", "reported", "user_errors"]


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
