"""ema=on: the start-up warning when the average cannot forget the initial weights in time."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from framework.ema import EMA, horizon_warning


def test_quickstart_with_decay_0999_is_warned_and_told_a_value_that_fits() -> None:
    """168 planned steps: 1/(1-0.999) = 1000 updates > 33.6; 0.97 (33 updates) fits."""
    message = horizon_warning(0.999, 168)
    assert message is not None
    assert message.startswith("ema.decay=0.999 averages over about 1000 updates (1/(1-decay)), "
                              "more than 20 % of the 168 updates this run plans")
    assert "Use ema.decay=0.97 or lower" in message
    assert horizon_warning(0.97, 168) is None
    assert horizon_warning(0.999, 100_000) is None


def test_update_interval_start_and_tiny_runs() -> None:
    """Updates every 2 steps from step 100 of 1100: 500 updates, budget 100."""
    assert horizon_warning(0.99, 1100, every=2, start=100) is None  # horizon 100
    assert "ema.decay=0.99 or lower" in str(horizon_warning(0.995, 1100, every=2, start=100))
    assert "Use ema=none" in str(horizon_warning(0.9, 4))  # no decay fits 4 steps
    assert "averages forever" in str(horizon_warning(1.0, 100))


def test_the_callback_warns_once_at_fit_start(caplog: pytest.LogCaptureFixture) -> None:
    trainer = SimpleNamespace(estimated_stepping_batches=168, is_global_zero=True,
                              fast_dev_run=False)
    with caplog.at_level(logging.WARNING, logger="framework.ema"):
        EMA(decay=0.999).on_fit_start(trainer, None)  # type: ignore[arg-type]
        EMA(decay=0.97).on_fit_start(trainer, None)  # type: ignore[arg-type]
    assert [r.getMessage()[:16] for r in caplog.records] == ["ema.decay=0.999 "]
