"""A run's wall time across invocations: the earlier ones' seconds plus this one's."""

import math

import pytest

from dpfed.train import run_clock
from dpfed.train.run_clock import RunClock


def test_seconds_add_the_earlier_invocations_to_the_time_since_this_one_started(monkeypatch):
    monkeypatch.setattr(run_clock.time, "time", lambda: 1_000.0)
    clock = RunClock(started=990.0, earlier=300.0)
    assert clock.seconds() == 310.0, f"300 s before the resume + 10 s since: {clock.seconds()}"
    assert clock.summary() == {"wall_seconds": 310.0, "wall_seconds_earlier": 300.0}, (
        "summary.json gets the run's seconds and the earlier invocations' share")


@pytest.mark.parametrize("extra", [
    {}, {"wall_seconds": None}, {"wall_seconds": math.nan}, {"wall_seconds": -5.0},
    {"wall_seconds": True}, {"wall_seconds": "12"}])
def test_a_checkpoint_without_a_usable_figure_counts_as_no_earlier_time(extra):
    assert run_clock.earlier_seconds(extra) == 0.0, f"{extra} must count as 0 s"


def test_a_checkpoints_figure_is_the_earlier_time():
    assert run_clock.earlier_seconds({"wall_seconds": 42.5}) == 42.5
    assert run_clock.earlier_seconds({"wall_seconds": 7}) == 7.0


def test_the_report_line_names_the_earlier_share_of_a_resumed_run_only():
    assert run_clock.describe({"wall_seconds": 12.34, "wall_seconds_earlier": 0.0}) == "12.3 s"
    assert run_clock.describe({"wall_seconds": 12.34}) == "12.3 s", "a summary of an older run"
    line = run_clock.describe({"wall_seconds": 312.34, "wall_seconds_earlier": 300.0})
    assert line == "312.3 s (300.0 s of them in earlier invocations)", line
