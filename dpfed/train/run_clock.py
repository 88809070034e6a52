"""The wall time of a run across the invocations that made it.

A run killed (or preempted) and resumed spends its time in several processes; a summary
that timed only the last one reported a few seconds for a run of hours. Every checkpoint
stores the run's seconds so far (`RunClock.seconds()`, saved by `resume.checkpoint_extra`),
and a resumed invocation's clock starts from the restored checkpoint's figure, so
summary.json's `wall_seconds` is the time of the work the run kept: the invocations up to
the checkpoint it resumed from, plus this one (its start-up, compilation and final
evaluation included). What a killed invocation did after its last checkpoint is redone,
and only the redoing is counted. `wall_seconds_earlier` says how much of the figure came
from earlier invocations (0 for a run in one go; a checkpoint written before 2026-12-03
holds no figure and counts as 0). Timing is not a DP release (WORKSPACE.md).
"""

import dataclasses
import math
import time

WALL_SECONDS = "wall_seconds"  # the key of the run's seconds in a checkpoint's extra


@dataclasses.dataclass(frozen=True)
class RunClock:
    """Seconds of a run: `earlier` (invocations up to the restored checkpoint) plus the
    time since this invocation's `started` (a `time.time()` value)."""

    started: float
    earlier: float = 0.0

    def seconds(self) -> float:
        """The run's wall seconds up to now."""
        return self.earlier + time.time() - self.started

    def summary(self) -> dict[str, float]:
        """summary.json's `wall_seconds` (the run's) and `wall_seconds_earlier`."""
        return {WALL_SECONDS: self.seconds(), "wall_seconds_earlier": self.earlier}


def earlier_seconds(extra: dict) -> float:
    """The run's seconds stored in a checkpoint's `extra`; 0 where it holds none (older
    checkpoints) or a value that is no finite non-negative number."""
    value = extra.get(WALL_SECONDS)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and value >= 0 else 0.0


def describe(summary: dict) -> str:
    """A report's wall time: `12.3 s`, or for a resumed run `312.3 s (300.0 s of them in
    earlier invocations)`."""
    seconds = summary[WALL_SECONDS]
    earlier = summary.get("wall_seconds_earlier") or 0.0
    if earlier <= 0:
        return f"{seconds:.1f} s"
    return f"{seconds:.1f} s ({earlier:.1f} s of them in earlier invocations)"
