"""One-line progress reports for long runs: steps done, named fields, rate and ETA.

    [dpsgd] 120/500 (24%) | eps 0.83 | loss 0.412 | 3.2 steps/s | ETA 1m58s

Lines are printed at most every `every_seconds` (and always for the first and the
final step), so they read well both on a terminal and in a log file.
"""

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import numpy as np


def format_value(value: Any) -> str:
    """A compact rendering: 3 significant digits for floats, integers as they are."""
    if isinstance(value, np.ndarray | np.generic | jax.Array) and np.size(value) == 1:
        value = np.asarray(value).item()
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e6 or (0 < magnitude < 1e-3):
        return f"{value:.2e}"
    if magnitude >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def format_duration(seconds: float) -> str:
    """Durations like `45s`, `1m58s`, `2h03m`; `?` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Prints progress lines for a run of `total` steps.

    Args:
      total: the step at which the run ends.
      desc: a short name shown in brackets at the start of each line.
      every_seconds: the least time between two lines (the final step always prints).
      stream: where lines go.
      start_step: the step this process starts from (the restored step when resuming),
        so the rate and ETA count only the steps run by this process. Once a line
        after the first is due, they count from the first line (the end of the first
        step, which compiles: 15 s where a step takes 0.04 s, an ETA of 1h44m for a
        28 s run); a first line of one step says how long it took instead.
      unit: the name of a step in the rate (e.g. "rounds").
      clock: a monotonic clock in seconds (injectable for tests).
      wait: what `update` calls on its `wait_for` before a line (injectable for tests).
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        every_seconds: float = 5.0,
        stream: TextIO = sys.stderr,
        *,
        start_step: int = 0,
        unit: str = "steps",
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[Any], Any] = jax.block_until_ready,
    ):
        self._total = total
        self._desc = desc
        self._every_seconds = every_seconds
        self._stream = stream
        self._start_step = start_step
        self._unit = unit
        self._clock = clock
        self._wait = wait
        self._start_time = clock()
        self._last_print: float | None = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first line
        self._finished = False

    def update(self, step: int, *, wait_for: Any = None, **fields: Any) -> None:
        """Reports that `step` steps are done; `fields` (e.g. eps, loss) are shown in order.

        Fields whose value is None (e.g. no evaluation yet) are left out of the line.
        `wait_for`: the step's results (e.g. the state a jitted step returned), waited
        for before a line so that its rate and ETA count finished steps. With
        asynchronous dispatch a loop runs several steps ahead of the device; without the
        wait, lines count queued steps and the run seems to stall at its next evaluation
        (WORKSPACE.md, "Progress lines"). Between lines dispatch stays asynchronous.
        """
        now = self._clock()
        final = step >= self._total
        if self._finished:
            return
        due = self._last_print is None or now - self._last_print >= self._every_seconds
        if not (final or due):
            return
        if wait_for is not None:
            self._wait(wait_for)
            now = self._clock()
        self._last_print = now
        self._finished = final
        print(self._line(step, now, fields), file=self._stream, flush=True)
        if self._first is None:
            self._first = (step, now)

    def _line(self, step: int, now: float, fields: dict[str, Any]) -> str:
        percent = 100 * step / self._total if self._total else 100
        head = f"[{self._desc}] " if self._desc else ""
        parts = [f"{head}{step}/{self._total} ({percent:.0f}%)"]
        parts += [f"{name} {format_value(v)}" for name, v in fields.items() if v is not None]
        elapsed = now - self._start_time
        base_step, base_time = self._start_step, self._start_time
        if self._first is not None and step > self._first[0] and now > self._first[1]:
            base_step, base_time = self._first  # past the first step's compilation
        steps_run, seconds = step - base_step, now - base_time
        if self._first is None and steps_run == 1 and step < self._total:
            parts.append(f"first {self._unit.removesuffix('s')} took {format_duration(elapsed)}")
        elif steps_run > 0 and seconds > 0:
            rate = steps_run / seconds
            parts.append(f"{format_value(rate)} {self._unit}/s")
            if step >= self._total:
                parts.append(f"took {format_duration(elapsed)}")
            else:
                parts.append(f"ETA {format_duration((self._total - step) / rate)}")
        return " | ".join(parts)
