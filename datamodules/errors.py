"""The project's user-error base: a leaf module (no project, Hydra or Lightning imports) so that
the data layer and the framework raise the same kind of error. Only ``framework`` turns these
into what Hydra prints (the message alone, exit 1); ``convnn`` keeps plain ValueError/TypeError."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "UserError"]


class UserError(Exception):
    """An error the user can fix (configuration, data, disk, a diverging run): its message is
    the whole report, without a traceback."""


class ConfigError(UserError, ValueError):
    """Invalid configuration, named by its key, value and what is allowed."""


class DataError(UserError, RuntimeError):
    """Data cannot be found, read, or does not match the configuration."""
