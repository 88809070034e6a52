"""Start or resume a run from its workdir, and stop it where its privacy budget ends.

Every trainer (DP-SGD, DataLens, the DP-FedAvg host loop) begins the same way: pin the
config, restore the newest checkpoint's state and ledger together (so privacy spend is
neither lost nor counted twice), drop metrics logged after that checkpoint, then ask
the ledger how many more steps the target epsilon allows. This module is that start.

The target epsilon is a setting of the *current* invocation: a resumed run adopts the
target it is launched with, not the one stored in the checkpointed ledger (the events
come from the checkpoint; the budget from the flags). A lowered target is therefore
honoured, and a target the checkpoint already exceeds stops the run at once.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from dp_accounting.dp_event import DpEvent

from dpfed import privacy
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: its state, its ledger, and the step (0 for a fresh run)."""

    state: Any
    ledger: privacy.PrivacyLedger | None
    step: int
    resumed: bool


def resume_or_start(
    checkpointer: Checkpointer,
    workdir: Workdir,
    state: Any,
    ledger: privacy.PrivacyLedger | None,
    *,
    step_of: Callable[[Any], int],
    config: Any = None,
    key: str = "step",
    log: Callable[[str], None] = print,
) -> Start:
    """Returns the fresh `state` and `ledger`, or the newest checkpoint's.

    Args:
      checkpointer: the run's checkpoints (`workdir/checkpoints`).
      workdir: receives config.json; its metrics after the restored step are dropped.
      state: the step-0 state, also the template the checkpoint is restored into.
      ledger: the fresh ledger built from this invocation's flags (None: no DP). On a
        resume the checkpoint's events replace its (empty) events; its target epsilon
        is kept.
      step_of: reads the step (or round) counter out of a restored state.
      config: the run's config dataclass for `Workdir.pin_config` (None: not pinned).
      key: the metrics record's step field ("step" or "round").
      log: where the one-line resume message goes.

    Raises:
      ConfigError: resuming under a changed non-resumable setting.
      ValueError: the checkpoint holds a ledger and `ledger` is None or vice versa.
    """
    resuming = checkpointer.latest_step() is not None
    if config is not None:
        workdir.pin_config(config, resuming)
    if not resuming:
        return Start(state, ledger, 0, resumed=False)
    state, extra = checkpointer.restore(state)
    step = step_of(state)
    stored = extra.get("ledger")
    if (stored is None) != (ledger is None):
        raise ValueError(
            f"the checkpoint in {checkpointer.directory} was written by a "
            f"{'non-private' if stored is None else 'private'} run; this run is "
            f"{'non-private' if ledger is None else 'private'}"
        )
    if ledger is not None:
        restored = privacy.PrivacyLedger.from_json(stored)
        ledger = dataclasses.replace(restored, target_epsilon=ledger.target_epsilon)
    workdir.truncate_metrics(step, key=key)
    log(f"resumed from {key} {step} in {workdir.path}")
    return Start(state, ledger, step, resumed=True)


def budget_stop(
    ledger: privacy.PrivacyLedger | None,
    event: DpEvent | None,
    start: int,
    total: int,
    *,
    events_per_step: int = 1,
    key: str = "step",
    log: Callable[[str], None] = print,
) -> int:
    """The last step in [start, total] whose releases keep the ledger within its target.

    Each step records `events_per_step` copies of `event`. Without a ledger or a target
    the run goes to `total`. Logs when the budget ends the run early.
    """
    if ledger is None or ledger.target_epsilon is None:
        return total
    remaining = max(total - start, 0)
    last = start + ledger.affordable_count(event, events_per_step * remaining) // events_per_step
    if last < total:
        if last == start and ledger.entries:
            log(
                f"budget guard: the resumed ledger already spends eps {ledger.epsilon():.4g}; "
                f"target {ledger.target_epsilon} allows no further {key}"
            )
        else:
            log(f"budget guard: stop after {key} {last} (target eps {ledger.target_epsilon})")
    return last
