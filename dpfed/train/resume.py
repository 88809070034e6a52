"""Start or resume a run from its workdir, and stop it where its privacy budget ends.

Every trainer (DP-SGD, DataLens, the DP-FedAvg host loop) begins the same way: pin the
config and the digest of the training data, restore the newest checkpoint's state and
ledger together (so privacy spend is neither lost nor counted twice), ask the ledger how
many more steps the target epsilon allows, and drop metrics logged after that checkpoint
(the replay logs them again), unless the run would end before them or replay them with
another mechanism: then the resume is refused, since what was logged would be in no
ledger. This module is that start.

The target epsilon is a setting of the *current* invocation: a resumed run adopts the
target it is launched with, not the one stored in the checkpointed ledger (the events
come from the checkpoint; the budget from the flags). A lowered target is therefore
honoured, and a target the checkpoint already exceeds stops the run at once. A run
whose noise is calibrated from the target calibrates the noise of the steps it has left
against what the checkpoint has already spent (`checkpointed_spend`, `calibrate_rest`),
so a resume with a changed target or length still ends at its target; the ledger's
metadata lists the settings that changed at each resume (`changed_on_resume`).
"""

import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.dp_event import DpEvent

from dpfed import privacy
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import ConfigError
from dpfed.train.run_clock import WALL_SECONDS, RunClock, earlier_seconds
from dpfed.train.workdir import (
    LEDGER_FILE,
    METRICS_FILE,
    RESUMABLE_FIELDS,
    SUMMARY_FILE,
    TrainingData,
    Workdir,
    dumps,
    loads,
)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: its state, its ledger, the step (0 for a fresh run), the last
    step it may reach (`total`, or earlier where the target epsilon ends it), and the run's
    wall seconds up to the restored checkpoint (`run_clock.RunClock`'s `earlier`)."""

    state: Any
    ledger: privacy.PrivacyLedger | None
    step: int
    resumed: bool
    last: int
    earlier_seconds: float = 0.0


def resume_or_start(
    checkpointer: Checkpointer,
    workdir: Workdir,
    state: Any,
    ledger: privacy.PrivacyLedger | None,
    *,
    step_of: Callable[[Any], int],
    total: int,
    event: DpEvent | None = None,
    events_per_step: int = 1,
    config: Any = None,
    data: TrainingData | None = None,
    key: str = "step",
    log: Callable[[str], None] = print,
    private: bool | None = None,
    on_resume: Callable[[Any], Any] | None = None,
) -> Start:
    """Returns the fresh `state` and `ledger`, or the newest checkpoint's, and the last step.

    A killed run may have logged metrics (releases) past its last checkpoint, or before
    its first one. Replaying those steps with the same mechanism reproduces them, so
    they are dropped from the logs and counted once when replayed. A resume that would
    not replay them all (a lower `total` or target), or would replay them with another
    mechanism, would leave releases in no ledger: refused, and the logs are left alone.
    The eps each record logged must be what the restored (or fresh) ledger gives at its
    step, and with no checkpoint left, ledger.json (written at every evaluation and at
    an invocation's end) must have this run's mechanism: else the checkpoint is another
    run's, or the replay is not.

    Args:
      checkpointer: the run's checkpoints (`workdir/checkpoints`).
      workdir: receives config.json; its metrics after the restored step are dropped.
      state: the step-0 state, also the template the checkpoint is restored into.
      ledger: the fresh ledger built from this invocation's flags (None: no DP). On a
        resume the checkpoint's events replace its (empty) events; its target epsilon
        is kept.
      step_of: reads the step (or round) counter out of a restored state.
      total: the step the run is asked to end at.
      event, events_per_step: what one step releases, for the budget guard
        (`budget_stop`); None without DP.
      config: the run's config dataclass for `Workdir.pin_config` (None: not pinned).
        Before the first checkpoint, a rerun over logged metrics must match it in
        every field: there is no checkpointed ledger to compare the mechanism with.
      data: the digest of the run's training data for `Workdir.pin_data` (None: not
        pinned); a resume or a rerun over logged metrics must train on the same data.
      key: the metrics record's step field ("step" or "round").
      log: where the one-line resume message goes.
      private: whether the logged records are DP releases (default: `ledger` is not
        None). True for a run accounted outside `ledger` (DPD-fVAE's local DP: a ledger
        per client), so it too may not end before what a killed run logged.
      on_resume: applied to a restored state after every other check and before the
        workdir is written (config.json, data.json, the logs' truncation), so that a
        refusal of its own (ConfigError) leaves the workdir as it was.

    Raises:
      ConfigError: resuming under a changed non-resumable setting (before the first
        checkpoint: any changed setting; config.json missing) or on other training
        data (naming `data.flag`), or a resume that would end before, or replay with
        another mechanism, steps the killed run already logged, or whose checkpoint's
        ledger disagrees with the logged eps.
      ValueError: the checkpoint holds a ledger and `ledger` is None or vice versa.
    """
    resuming = checkpointer.latest_step() is not None
    records = workdir.read_released(key)  # with those a killed replay had not logged again
    logged = max((r[key] for r in records if key in r), default=0)
    # No checkpoint, but releases of an earlier invocation: this run replays them.
    replaying = not resuming and (logged > 0 or any(
        workdir.file(name).exists() for name in (LEDGER_FILE, SUMMARY_FILE)))
    if config is not None:
        resumable = RESUMABLE_FIELDS if resuming else frozenset()
        workdir.check_config(config, resuming or replaying, resumable, required=True)
    if data is not None:
        workdir.check_data(data, resuming or replaying)
    step, earlier = 0, 0.0
    if resuming:
        state, extra = checkpointer.restore(state)
        step, earlier = step_of(state), earlier_seconds(extra)
        stored = extra.get("ledger")
        if (stored is None) != (ledger is None):
            raise ValueError(
                f"the checkpoint in {checkpointer.directory} was written by a "
                f"{'non-private' if stored is None else 'private'} run; this run is "
                f"{'non-private' if ledger is None else 'private'}"
            )
        lost = _records_lost(workdir.read_metrics(), extra, step, key)
        if ledger is not None:
            assert stored is not None  # both or neither, checked above
            restored = privacy.PrivacyLedger.from_json(stored)
            now = _as_stored(ledger)
            _refuse_other_accounting(restored, now, checkpointer.directory)
            changes = _mechanism_changes(restored, now)
            logger = _ledger_that_logged(workdir, restored)
            _refuse_replay_with_other_noise(
                logger, _mechanism_changes(logger, now), logged, step, key)
            if lost and changes:
                _refuse_changes_over_lost_records(restored, changes, lost, step, key, workdir)
            ledger = _adopt_settings(restored, now, changes, step, key)
        if lost:
            log(f"warning: {workdir.file(METRICS_FILE)} lost {lost} record(s) of {key}s up "
                f"to {step} that the checkpoint saw (removed by hand?); they are not logged "
                "again")
    if replaying and ledger is not None:
        _refuse_replay_of_another_ledger_json(workdir, ledger)
    if ledger is not None and event is not None:
        _refuse_logs_of_another_ledger(
            ledger, event, events_per_step, records, step, key, checkpointer.directory)
    last = max(  # a rerun of a finished run with a lower total just ends where it is
        step, budget_stop(ledger, event, step, total, events_per_step=events_per_step, key=key,
                          log=log)
    )
    if (ledger is not None if private is None else private) and logged > last:
        _refuse_ending_before_logged(logged, last, total, key)
    if resuming and on_resume is not None:
        state = on_resume(state)
    if config is not None:  # only now: a refused resume leaves the pinned config as it was
        workdir.pin_config(config, resuming=False)
    if data is not None:
        workdir.pin_data(data, resuming=False)
    if resuming or logged > 0:
        workdir.truncate_logs(step, key=key)
    if resuming:
        log(f"resumed from {key} {step} in {workdir.path}")
    return Start(state, ledger, step, resumed=resuming, last=last, earlier_seconds=earlier)


def checkpoint_extra(
    ledger: privacy.PrivacyLedger | None, workdir: Workdir, clock: RunClock
) -> dict:
    """What every trainer's checkpoint stores beside its state: the ledger (None without
    DP), how many records metrics.jsonl holds (`Workdir.metrics_records`) and the run's
    wall seconds so far (`dpfed.train.run_clock`; a resume's clock starts from them)."""
    return {
        "ledger": ledger.to_json(with_pld=False) if ledger is not None else None,
        METRICS_RECORDS: workdir.metrics_records,
        WALL_SECONDS: clock.seconds(),
    }


METRICS_RECORDS = "metrics_records"  # checkpoint_extra's count of metrics.jsonl records


def _records_lost(records: list[dict], extra: dict, step: int, key: str) -> int:
    """How many of the records the checkpoint saw metrics.jsonl no longer holds (0 for a
    checkpoint that did not count them). Every record up to the checkpoint's `step` was
    logged before it was saved; the ones after it come from later steps."""
    saw = extra.get(METRICS_RECORDS)
    if saw is None:
        return 0
    return max(0, saw - sum(1 for r in records if key not in r or r[key] <= step))


def _refuse_changes_over_lost_records(
    restored: privacy.PrivacyLedger, changes: dict, lost: int, step: int, key: str,
    workdir: Workdir,
) -> None:
    """Raises: metrics.jsonl lost records, and this run would change the mechanism.

    Records removed by hand may include releases a killed run logged after the
    checkpoint; replaying those steps with another mechanism would leave them in no
    ledger (as `_refuse_replay_with_other_noise`, which cannot see removed records).
    """
    old = ", ".join(f"{n}={restored.metadata.get(n)}" for n in sorted(changes))
    raise ConfigError(
        "workdir",
        f"{workdir.file(METRICS_FILE)} lost {lost} record(s) that the checkpoint of {key} "
        f"{step} saw, so releases a killed run logged after {key} {step} may be gone too; "
        f"this run changes {', '.join(sorted(changes))} (the checkpoint's: {old}), and would "
        "leave them in no ledger. Restore metrics.jsonl, resume with the checkpoint's "
        "settings, or start a new workdir",
    )


def _refuse_logs_of_another_ledger(
    ledger: privacy.PrivacyLedger, event: DpEvent, events_per_step: int, records: list[dict],
    step: int, key: str, checkpoints: pathlib.Path,
) -> None:
    """Raises unless the eps logged in metrics.jsonl is what `ledger` gives at its steps.

    Every record of a private run carries the eps of its ledger at its step. The last
    record up to the restored `step` must agree with the restored ledger's first
    releases: else the checkpoint is another run's. The first and the last record after
    `step` (or of all, with no checkpoint) must agree with `ledger` extended by this
    run's steps: else the replay would use another mechanism than the one that made
    them, and they would be in no ledger. That happens when checkpoints/ is deleted
    after a resume that recalibrated the noise, the fresh run then calibrating one z
    for all steps. Three accountant calls at most: each costs up to a second.
    """
    logged = sorted((r[key], r["epsilon_rdp"]) for r in records
                    if key in r and r.get("epsilon_rdp") is not None)
    kept = [(s, eps) for s, eps in logged if s <= step][-1:]
    replayed = [(s, eps) for s, eps in logged if s > step]
    for s, eps in kept:
        releases = s * events_per_step
        now = ledger.first(releases).epsilon() if releases <= ledger.num_releases else None
        if now is None or not math.isclose(eps, now, rel_tol=EPS_REL_TOL):
            there = "no eps" if now is None else f"eps {now:.6g}"
            raise ConfigError(
                "workdir",
                f"a release logged eps {eps:.6g} at {key} {s}, but the ledger of the "
                f"checkpoint in {checkpoints} gives {there} there: the checkpoint is not this "
                "run's. Restore this run's checkpoints or use a new workdir",
            )
    for s, eps in replayed[:1] + replayed[1:][-1:]:
        now = ledger.epsilon_with(event, (s - step) * events_per_step)
        if not math.isclose(eps, now, rel_tol=EPS_REL_TOL):
            since = f"{key} {step}" if step else "the start (no checkpoint is left)"
            raise ConfigError(
                "workdir",
                f"a release logged eps {eps:.6g} at {key} {s}, but replaying from {since} "
                f"with this run's noise gives {now:.6g}: the logged releases were made with "
                "another mechanism (were checkpoints deleted after a resume that changed the "
                "noise?) and would be in no ledger. Restore the checkpoints or use a new workdir",
            )


def _refuse_replay_of_another_ledger_json(workdir: Workdir, ledger: privacy.PrivacyLedger) -> None:
    """Raises if ledger.json, left with no checkpoint, was made with another mechanism.

    A rerun with no checkpoint replays from step 0 with `ledger`'s mechanism: the same
    releases as the ledger.json an invocation wrote here (at its end, or at an
    evaluation before it was killed) only if that one ran with the same metadata and
    never changed it on a resume (`changed_on_resume`).
    """
    path = workdir.file(LEDGER_FILE)
    if not path.exists():
        return
    try:
        finished = privacy.PrivacyLedger.from_json(workdir.read_json_object(LEDGER_FILE))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            "workdir", f"{path} is unreadable ({error}): restore it or use a new workdir"
        ) from None
    changes = _mechanism_changes(finished, _as_stored(ledger))
    history = finished.metadata.get("changed_on_resume")
    if changes or history:
        made = "; ".join(
            ([", ".join(f"{n}={finished.metadata.get(n)} (this run: {v})"
                        for n, v in sorted(changes.items()))] if changes else [])
            + ([f"settings changed on resume: {history}"] if history else []))
        raise ConfigError(
            "workdir",
            f"{path} records releases made with {made}. With no checkpoint left, this run "
            "would replay them from the start with its own mechanism, and they would be in "
            "no ledger: restore the checkpoints or use a new workdir",
        )


# Logged eps and a replay's agree to float rounding (the same events, composed in pieces).
EPS_REL_TOL = 1e-9


def _refuse_ending_before_logged(logged: int, last: int, total: int, key: str) -> None:
    """Raises: a killed run logged releases up to `logged`, and this run ends at `last`.

    Those releases are functions of the noised steps up to `logged`; a run that ends
    earlier never records them in its ledger, so the ledger would under-count.
    """
    field = "target_epsilon" if last < total else f"{key}s"
    raise ConfigError(
        field,
        f"the killed run logged metrics up to {key} {logged}, but this run would end at "
        f"{key} {last}: the releases of {key}s {last + 1}-{logged} would be in no ledger. "
        f"Resume with --{field} reaching at least {key} {logged}, or start a new workdir",
    )


def _as_stored(ledger: privacy.PrivacyLedger) -> privacy.PrivacyLedger:
    """`ledger` after the JSON round trip a checkpoint or ledger.json puts it through
    (tuples come back as lists), so its metadata compare equal to a stored one's."""
    return privacy.PrivacyLedger.from_json(loads(dumps(ledger.to_json(with_pld=False))))


def _mechanism_changes(restored: privacy.PrivacyLedger, now: privacy.PrivacyLedger) -> dict:
    """Metadata of `now` (this invocation's ledger, JSON round-tripped) that differ."""
    return {
        name: value
        for name, value in now.metadata.items()
        if name != "changed_on_resume" and restored.metadata.get(name) != value
    }


def _refuse_other_accounting(
    restored: privacy.PrivacyLedger, now: privacy.PrivacyLedger, checkpoints: pathlib.Path
) -> None:
    """Raises if the checkpoint's ledger counts another unit, relation or delta than this
    run's: its eps would be reported under this run's terms (a delta changed with
    config.json gone, say) though its events were accounted under its own."""
    for name in ("unit", "neighboring_relation", "delta"):
        if getattr(restored, name) != getattr(now, name):
            raise ConfigError(
                "delta" if name == "delta" else "workdir",
                f"the ledger of the checkpoint in {checkpoints} has {name} "
                f"{getattr(restored, name)!r}, this run {getattr(now, name)!r}: use the same "
                "settings or a new workdir",
            )


def _ledger_that_logged(
    workdir: Workdir, restored: privacy.PrivacyLedger
) -> privacy.PrivacyLedger:
    """The ledger of the invocation that logged the releases past the checkpoint.

    ledger.json is written before every metrics record: where it holds more releases
    than the checkpoint's ledger (`restored`), it is that invocation's, whose mechanism
    may differ from the checkpoint's (a resume that recalibrated the noise, then was
    killed before its next checkpoint). Else `restored`.
    """
    try:
        written = privacy.PrivacyLedger.from_json(workdir.read_json_object(LEDGER_FILE))
    except (OSError, ValueError, KeyError, TypeError):
        return restored
    return written if written.num_releases > restored.num_releases else restored


def _refuse_replay_with_other_noise(
    logger: privacy.PrivacyLedger, changes: dict, logged: int, step: int, key: str,
) -> None:
    """Raises if a resume would replay already-logged steps with another mechanism.

    A killed run may have logged metrics (releases: functions of its noised models)
    after its last checkpoint. Replaying those steps with the same round keys and the
    same mechanism reproduces them, so counting them once is right. With another
    noise multiplier the replay reuses their noise draws at another scale, and the
    releases already logged would be in no ledger: refused. `logger` is the ledger
    that logged them (`_ledger_that_logged`), `changes` this run's metadata that
    differ from its, and `logged` the last step (or round) of every release logged
    (`Workdir.read_released`).
    """
    if changes and logged > step:
        old = ", ".join(f"{n}={logger.metadata.get(n)}" for n in sorted(changes))
        new = ", ".join(f"{n}={v}" for n, v in sorted(changes.items()))
        raise ConfigError(
            ", ".join(sorted(changes)),
            f"the killed run logged metrics up to {key} {logged}, past its last checkpoint "
            f"({key} {step}), with {old}; replaying those {key}s with {new} would reuse their "
            "noise at another scale and leave what was logged uncounted. Resume with the "
            f"flags of the killed run until past {key} {logged}, or start a new workdir",
        )


def _adopt_settings(
    restored: privacy.PrivacyLedger, now: privacy.PrivacyLedger, changes: dict, step: int,
    key: str,
) -> privacy.PrivacyLedger:
    """The restored ledger (its events) with this invocation's target and metadata.

    Metadata that differ from the checkpoint's (a recalibrated noise multiplier, say) are
    also appended to `metadata["changed_on_resume"]` with the step they apply from.
    """
    history = list(restored.metadata.get("changed_on_resume", []))
    changed = dict(changes)
    if now.target_epsilon != restored.target_epsilon:
        changed["target_epsilon"] = now.target_epsilon
    if changed:
        history.append({key: step, **changed})
    metadata = {**now.metadata, **({"changed_on_resume": history} if history else {})}
    return dataclasses.replace(restored, target_epsilon=now.target_epsilon, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Spent:
    """What a checkpoint has already released: its step (or round) and its ledger."""

    step: int
    ledger: privacy.PrivacyLedger


def checkpointed_spend(
    checkpointer: Checkpointer, workdir: Workdir, config: Any, data: TrainingData | None = None
) -> Spent | None:
    """The newest checkpoint's step and ledger, read before any state exists.

    None for a fresh run or a non-private checkpoint. A trainer that calibrates its
    noise from the target needs this before it builds its mechanism. A private
    checkpoint's `config` and `data` are checked first (`Workdir.check_config` and
    `check_data`, as `resume_or_start` will): a changed setting is refused by name
    before the checkpoint's ledger is composed with this invocation's events (under
    another sampling's neighbouring relation the accountant would raise, a traceback
    instead of the flag's name; on other data the target may seem out of reach).

    Raises:
      ConfigError: as `Workdir.check_config` and `check_data` on a resume.
    """
    step = checkpointer.latest_step()
    if step is None:
        return None
    stored = checkpointer.restore_extra(step).get("ledger")
    if stored is None:
        return None
    workdir.check_config(config, resuming=True, required=True)
    if data is not None:
        workdir.check_data(data, resuming=True)
    return Spent(step, privacy.PrivacyLedger.from_json(stored))


def calibrate_rest(
    step_event: Callable[[float], DpEvent],
    total: int,
    spent: Spent | None,
    target_epsilon: float,
    delta: float,
    relation: NeighboringRelation,
) -> float:
    """The noise multiplier z with which `total` steps of `step_event(z)` meet the target.

    A fresh run calibrates all `total` steps. A resumed one calibrates its remaining
    `total - spent.step` steps composed after the releases `spent` already holds, so
    it ends at the target even when the target or `total` changed since the checkpoint
    (a lowered target needs more noise, a raised one less). Where the checkpoint
    already spends (about) the whole target, no z can help: the fresh calibration is
    returned and the budget guard (`budget_stop`) ends the run.

    A resume keeps the z the checkpoint was training with (its ledger's metadata
    `noise_multiplier`) while that z still meets the target and is within
    `KEEP_NOISE_TOLERANCE` of the smallest z that does: so rerunning the killed run's
    command replays its steps with its exact noise (a recalibration differs in the last
    digits, which changes the releases and refuses a replay of logged steps).

    A checkpoint at or past `total` runs no step: its z is returned as it is, so a
    rerun of a finished run reports the z its last steps used.

    Raises:
      CalibrationError: the target is out of reach for a fresh run of `total` steps.
    """
    previous = None if spent is None else spent.ledger.metadata.get("noise_multiplier")
    if spent is not None and spent.step >= total and previous is not None:
        return float(previous)
    if spent is not None and spent.step < total and spent.ledger.entries:
        rest = total - spent.step

        def composed(z: float) -> DpEvent:
            return spent.ledger.with_recorded(step_event(z), rest).composed_event()

        if previous is not None and _still_calibrated(
            float(previous), composed, target_epsilon, delta, relation
        ):
            return float(previous)
        try:
            return privacy.calibrate_noise_multiplier(composed, target_epsilon, delta, relation)
        except privacy.CalibrationError:
            pass  # already (nearly) spent: budget_stop says so and stops
    return privacy.calibrate_noise_multiplier(
        lambda z: dp_event.SelfComposedDpEvent(step_event(z), total),
        target_epsilon, delta, relation)


# A checkpoint's z is kept on resume while z * (1 - this) would exceed the target.
KEEP_NOISE_TOLERANCE = 0.01


def _still_calibrated(
    z: float,
    make_event: Callable[[float], DpEvent],
    target_epsilon: float,
    delta: float,
    relation: NeighboringRelation,
) -> bool:
    """Whether `z` meets the target and `z * (1 - KEEP_NOISE_TOLERANCE)` does not."""
    if not z > 0:
        return False

    def eps(noise: float) -> float:
        return privacy.rdp_epsilon(make_event(noise), delta, relation)

    return eps(z) <= target_epsilon < eps(z * (1 - KEEP_NOISE_TOLERANCE))


def require_first_step(
    ledger: privacy.PrivacyLedger, event: DpEvent, events_per_step: int = 1, key: str = "step"
) -> None:
    """Raises ConfigError naming "target_epsilon" when `ledger` cannot afford one more
    step of `events_per_step` x `event` (a fresh run would release its untrained state)."""
    if ledger.affordable_count(event, events_per_step) < events_per_step:
        raise ConfigError(
            "target_epsilon",
            f"cannot be met: one {key} already costs eps "
            f"{privacy.format_upper(ledger.epsilon_with(event, events_per_step))} > "
            f"{ledger.target_epsilon}; "
            "raise the noise multiplier or the target",
        )


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

    Raises:
      ConfigError: naming "target_epsilon", when a fresh ledger cannot afford even one
        step (the run would release its untrained initial state under a DP label), or a
        resumed ledger already spent more than the target (a lowered target cannot take
        back what was spent: the run would release its model above the target).
    """
    if ledger is None or ledger.target_epsilon is None:
        return total
    if start < total and not ledger.entries:
        require_first_step(ledger, event, events_per_step, key)
    spent = ledger.epsilon() if ledger.entries else 0.0
    assert spent is not None  # the ledger holds only events RDP supports (`record`)
    if spent > ledger.target_epsilon:
        raise ConfigError(
            "target_epsilon",
            f"{ledger.target_epsilon!r} is below the eps {spent!r} this workdir's ledger "
            f"already spent by {key} {start}: raise it to at least that, or use a new workdir",
        )
    remaining = max(total - start, 0)
    last = start + ledger.affordable_count(event, events_per_step * remaining) // events_per_step
    if last < total:
        if last == start and ledger.entries:
            log(
                "budget guard: the resumed ledger already spends eps "
                f"{privacy.format_upper(spent)}; "
                f"target {ledger.target_epsilon} allows no further {key}"
            )
        else:
            log(f"budget guard: stop after {key} {last} (target eps {ledger.target_epsilon})")
    return last
