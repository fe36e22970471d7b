"""Strict JSON files (``results.json``, analysis statistics): NaN/inf become ``null``, and a
file is replaced atomically, never left half-written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["dumps_strict", "finite_or_none", "write_json"]


def finite_or_none(value: Any) -> Any:
    """Non-finite floats become ``None`` (JSON ``null``), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps_strict(data: Any, *, sort_keys: bool = True) -> str:
    """Standard JSON only: NaN/inf are written as ``null`` (``json.dumps`` would write ``NaN``)."""
    text = json.dumps(finite_or_none(data), indent=2, sort_keys=sort_keys, allow_nan=False)
    return text + "\n"


def write_json(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write ``data`` as strict JSON atomically (temp file + ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps_strict(data, sort_keys=sort_keys))
    os.replace(tmp, path)
