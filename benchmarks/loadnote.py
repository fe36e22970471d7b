"""The load note of a benchmark report: whether the machine was idle while it ran."""

from __future__ import annotations

import os

__all__ = ["load_note"]


def load_note(before: str, after: str) -> str:
    """Whether the 1-minute load (``/proc/loadavg`` fields before and after the run) stayed below
    the core count (an idle machine) or not."""
    cores = os.cpu_count() or 1
    peak = max(float(before.split()[0]), float(after.split()[0]))
    if peak < cores:
        return f"1-minute load below the {cores} cores throughout: an idle machine"
    return f"1-minute load reached {peak:.1f} on {cores} cores: shared with other jobs"
