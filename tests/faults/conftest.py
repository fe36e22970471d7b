"""Fixtures of the fault tests."""

from collections.abc import Iterator

import pytest
from hydra.core.global_hydra import GlobalHydra


@pytest.fixture(autouse=True)
def _clear_hydra() -> Iterator[None]:
    """Every test composes from a clean Hydra state."""
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
