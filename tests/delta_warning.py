"""The check of a trainer's delta >= 1/N warning, shared by the trainers' tests."""

import logging
from collections.abc import Callable

import pytest


class StopError(Exception):
    """Ends a run once its set-up checks are done (before anything is trained)."""


def stop(*args, **kwargs):
    """Stands in for what a run does right after its delta check: ends it there."""
    raise StopError


def expected_warning(delta: float, n: int, unit: str) -> str:
    """The line `privacy.warn_if_delta_too_large(delta, n, unit)` logs."""
    return (f"delta={delta:g} >= 1/N={1 / n:g} (N={n} {unit}s): such a delta "
            f"allows releasing one {unit} in the clear")


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the WARNING records `caplog` holds."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def assert_warns_of_delta(
    caplog: pytest.LogCaptureFixture, run: Callable[[], object], delta: float, warns: bool,
    n: int, unit: str,
) -> None:
    """Runs `run`, which must end in `StopError`; one delta warning when `warns`, else none."""
    with caplog.at_level(logging.WARNING), pytest.raises(StopError):
        run()
    warnings = warnings_logged(caplog)
    assert warnings == ([expected_warning(delta, n, unit)] if warns else []), (
        f"delta={delta} with N={n}: {'one warning' if warns else 'no warning'} expected, "
        f"got {warnings}")
