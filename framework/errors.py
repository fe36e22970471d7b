"""The one exception type for user errors: bad config, bad checkpoint, missing credentials."""

from __future__ import annotations

from hydra.errors import CompactHydraException

__all__ = ["ConfigError"]


class ConfigError(CompactHydraException, ValueError):
    """Invalid configuration; Hydra prints only the message (no traceback) and exits with 1."""
