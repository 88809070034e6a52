"""The host loop of federated training: schedules rounds, evaluations and checkpoints.

All the work of a round happens inside the engine's jitted `round`; this loop only
picks the round's key (`fold_in(key(seed), round)`, so a resumed run replays the same
randomness), records each round's DpEvent in the ledger, evaluates, checkpoints the
state *with* the ledger, and prints progress. Rerunning on the same workdir resumes from
the last checkpoint and ends with the same parameters and ledger as an uninterrupted run.
A ledger with a target eps stops the run before the round that would exceed it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.federated.dp_fedavg import (
    DpFedAvg,
    RoundMetrics,
    ServerState,
    checkpoint_layout,
    from_checkpoint_layout,
)
from dpfed.federated.mesh import settle
from dpfed.train import divergence, preemption, seeds
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import require
from dpfed.train.progress import Progress
from dpfed.train.resume import checkpoint_extra, resume_or_start
from dpfed.train.run_clock import RunClock
from dpfed.train.workdir import LEDGER_FILE, RAW_LOG_PREFIX, TrainingData, Workdir

ROUND_KEY_STREAM = 1  # round keys: fold_in(fold_in(key(seed), 1), round); init uses others


@dataclasses.dataclass
class LoopResult:
    """How the loop ended."""

    state: ServerState
    ledger: privacy.PrivacyLedger | None
    rounds_done: int
    last_round: int  # the round the loop was allowed to reach (budget guard)
    evaluation: dict[str, Any]  # the last record of metrics.jsonl (releases)
    resumed_from: int | None
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)  # not a release
    # The run's wall time across invocations (`clock.summary()` goes into summary.json).
    clock: RunClock = dataclasses.field(default_factory=lambda: RunClock(time.time()))

    @property
    def trained_nothing(self) -> bool:
        """Whether this invocation ran no round (a finished run was rerun)."""
        return self.resumed_from == self.rounds_done

    @property
    def diverged(self) -> bool:
        """Whether the final trained parameters, or a loss of the last evaluation, hold NaN
        or inf (`dpfed.train.divergence`)."""
        return divergence.diverged(trained_params(self.state), self.evaluation)


def trained_params(state: ServerState) -> tuple[Any, Any]:
    """The parameters a round trains: the shared ones and the server-trained context (a
    GAN's generator); checked for divergence at each evaluation (`dpfed.train.divergence`)."""
    return state.params, state.context


def round_key(seed: int, round_index: int) -> jax.Array:
    """The key of round `round_index` (independent of where a run was resumed)."""
    return jax.random.fold_in(seeds.stream_key(seed, ROUND_KEY_STREAM), round_index)


class RoundEngine(Protocol):
    """What `run_rounds` drives: a `DpFedAvg`, or an engine wrapping one (`DpFedAvgGan`)."""

    def round(
        self, state: ServerState, key: jax.Array, *, donate: bool = False
    ) -> tuple[ServerState, RoundMetrics]:
        """One round from `state` (deleted when `donate`)."""
        ...

    def round_event(self) -> dp_event.DpEvent | None:
        """The DpEvent of one round, None when no noise is added."""
        ...


def run_rounds(
    engine: RoundEngine,
    state: ServerState,
    *,
    rounds: int,
    seed: int,
    workdir: Workdir,
    ledger: privacy.PrivacyLedger | None,
    evaluate: Callable[[ServerState], dict[str, Any]],
    eval_every: int,
    checkpoint_every: int,
    desc: str = "fedavg",
    log: Callable[[str], None] = print,
    config: Any = None,
    data: TrainingData | None = None,
    extra: dict[str, Any] | None = None,
    on_resume: Callable[[ServerState], ServerState] | None = None,
    diagnose: Callable[[ServerState], dict[str, Any]] | None = None,
    started: float | None = None,
    release_ledger: Callable[[ServerState], privacy.PrivacyLedger] | None = None,
) -> LoopResult:
    """Runs (or resumes) `rounds` rounds of `engine` from `state`.

    Args:
      engine: the DP-FedAvg engine (or one wrapping it); its `round_event()` is recorded
        once per round, and each `round(state, key, donate=True)` takes the state it is given.
      state: the round-0 state (also the template for restoring a checkpoint).
      rounds: the total number of rounds of the run.
      seed: seeds the round keys.
      workdir: receives metrics.jsonl and diagnostics.jsonl (one record each per
        evaluation) and checkpoints/.
      ledger: the run's privacy ledger (None for a non-private run); restored with
        the state on resume.
      evaluate: `evaluate(state) -> dict` of host numbers computed from the released
        state and public data only; logged to metrics.jsonl with the round's released
        metrics and eps.
      eval_every, checkpoint_every: periods in rounds (the last round always does both).
      desc: the progress line's label.
      log: where one-off messages go.
      config: the run's config dataclass, pinned in the workdir (`Workdir.pin_config`):
        resuming under changed settings raises ConfigError naming the field.
      data: the digest of the clients' training data (`Workdir.pin_data`): resuming on
        other data raises ConfigError naming its flag.
      extra: JSON-able values saved with every checkpoint beside the ledger (read them
        back with `Checkpointer.restore_extra` before building the engine).
      on_resume: applied to a restored state, to re-derive what this invocation's
        flags determine (e.g. DPD-fVAE's per-client participation budgets); it may
        refuse the resume (ConfigError) before the workdir is written
        (`resume_or_start`).
      diagnose: `diagnose(state) -> dict` of figures computed from raw client data
        (e.g. per-client accuracies); logged to diagnostics.jsonl with the round's
        diagnostics, never to metrics.jsonl.
      release_ledger: `release_ledger(state)`, the ledger that counts the releases up to
        `state` where it is not `ledger` (DPD-fVAE's local DP: the worst client's); it
        is written as ledger.json before each metrics record (`Workdir.append_release`).
      started: when this invocation of the trainer began (`time.time()`; default: now),
        so the run's wall time (`LoopResult.clock`, saved with every checkpoint) counts
        its set-up too.
    """
    require(eval_every >= 1, "eval_every", "must be >= 1")
    require(checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    event = engine.round_event()
    if (ledger is None) != (event is None):
        raise ValueError("a private engine needs a ledger and a non-private one none")
    checkpointer = Checkpointer(workdir.file("checkpoints"))
    begin = resume_or_start(
        checkpointer, workdir, checkpoint_layout(state), ledger,
        step_of=lambda saved: int(from_checkpoint_layout(saved).round), total=rounds,
        event=event, config=config, data=data, key="round", log=log,
        private=ledger is not None or release_ledger is not None,
        on_resume=None if on_resume is None else (
            lambda saved: on_resume(from_checkpoint_layout(saved))),
    )
    state, ledger, start, last_round = (
        from_checkpoint_layout(begin.state), begin.ledger, begin.step, begin.last)
    clock = RunClock(time.time() if started is None else started, begin.earlier_seconds)
    resumed_from = start if begin.resumed else None

    progress = Progress(last_round, desc=desc, start_step=start, unit="rounds")
    watch = divergence.DivergenceWatch("round", log, label=desc)
    nonfinite_seen = None  # the first evaluated round with a NaN or inf client update
    record: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    eps = ledger.epsilon() if ledger is not None and ledger.entries else None

    def save(done: int) -> None:
        checkpointer.save(done, checkpoint_layout(state),
                          {**(extra or {}), **checkpoint_extra(ledger, workdir, clock)})

    with preemption.armed():
        for r in range(start, last_round):
            # settle: else XLA:CPU can deadlock on several devices (mesh.waits_for_each_step)
            # donate: the round reuses the old state's buffers (no copy of per-client states)
            state, metrics = settle(engine.round(state, round_key(seed, r), donate=True))
            if ledger is not None:
                ledger.record(event)
            done = r + 1
            if done % eval_every == 0 or done == last_round:
                eps = ledger.epsilon() if ledger is not None else None
                record = {
                    "round": done,
                    "epsilon_rdp": eps,
                    **_floats(metrics.released),
                    **evaluate(state),
                }
                watch.check(trained_params(state), record, done)
                diagnostics = {
                    "round": done,
                    **_floats(metrics.diagnostics),
                    **(diagnose(state) if diagnose is not None else {}),
                }
                workdir.append_release(
                    record, ledger if release_ledger is None else release_ledger(state))
                workdir.append_diagnostics(diagnostics)
                if nonfinite_seen is None and diagnostics.get("nonfinite_updates", 0) > 0:
                    nonfinite_seen = done
                    log(_nonfinite_warning(diagnostics["nonfinite_updates"], done, desc))
            progress.update(done, wait_for=state, eps=privacy.format_upper(eps, 3, None),
                            acc=record.get("test_accuracy"))
            preemption.save_or_stop(
                done, save, checkpointer, "round", every=checkpoint_every, last=last_round)
    checkpointer.close()
    if not record:  # nothing left to run: a finished run was resumed
        # What its last round logged (with that round's eps and released metrics), as the
        # run that ran it returned; a fresh evaluation lacks them (fedlm's last_evaluation
        # lost them on every rerun). Evaluated again only where no record of it is left.
        done = int(state.round)
        record = _record_of(workdir.read_metrics(), done) or {"round": done, **evaluate(state)}
        diagnostics = _record_of(workdir.read_diagnostics(), done) or {
            "round": done, **(diagnose(state) if diagnose is not None else {})}
        watch.check(trained_params(state), record, done)  # a diverged run, rerun: said again
    return LoopResult(state, ledger, int(state.round), last_round, record, resumed_from,
                      diagnostics, clock)


def _nonfinite_warning(count: float, round_done: int, desc: str) -> str:
    """The terminal line for client updates that were NaN or inf (zeroed in the sum, so
    the shared model stays finite and its `diverged` check cannot see it). A count of raw
    client updates is no release: labelled as such, and only in diagnostics.jsonl."""
    return (f"{RAW_LOG_PREFIX}[{desc}] warning: {count:.0f} client update(s) of round "
            f"{round_done} were NaN or inf and count as zero: the clients' local training "
            "diverged (a smaller client learning rate?); diagnostics.jsonl counts them "
            "(nonfinite_updates)")


def _record_of(records: list[dict[str, Any]], round_done: int) -> dict[str, Any] | None:
    """The last of `records` (metrics.jsonl's or diagnostics.jsonl's) of `round_done`."""
    return next((r for r in reversed(records) if r.get("round") == round_done), None)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(v) for name, v in metrics.items()}


# "What the same noise would give" with more users: federated EMNIST's 3,400 writers, 1M.
OTHER_POPULATIONS = (3400, 1_000_000)


def write_privacy_summary(
    result: LoopResult, engine: DpFedAvg, workdir: Workdir, delta: float
) -> dict[str, Any]:
    """Writes ledger.json (private runs) and returns the summary's user-level privacy fields.

    Keys: `epsilon_rdp`, `epsilon_pld`, `delta` (None for a non-private run), `unit`
    ("user") and `epsilon_rdp_same_noise_if_users` (RDP eps of the ledger's rounds, each with
    its noise and cohort size, with each of `OTHER_POPULATIONS` users; empty when
    non-private).
    """
    ledger = result.ledger.to_json() if result.ledger is not None else None
    if ledger is not None:
        workdir.write_json(LEDGER_FILE, ledger)
    others = {}
    if result.ledger is not None and result.rounds_done > 0:
        others = {
            str(n): engine.epsilon_with_population(result.ledger, n, delta)
            for n in OTHER_POPULATIONS
        }
    return {
        "epsilon_rdp": ledger["epsilon_rdp"] if ledger else None,
        "epsilon_pld": ledger["epsilon_pld"] if ledger else None,
        "delta": delta if ledger else None,
        "unit": "user",
        "epsilon_rdp_same_noise_if_users": others,
    }


def describe_user_level_privacy(result: dict[str, Any], delta: float) -> str:
    """One report sentence on a group's user-level guarantee (non-private when no eps).

    `result` holds `write_privacy_summary`'s fields plus `sampling_rate`, `rounds` and
    `num_clients`, or, for a group sampled from a larger population, `population`,
    `num_clients_noised` and the eps with the group sizes' release
    (`dpfed.generative.group_sizes.group_size_fields`).
    """
    if result["epsilon_rdp"] is None:
        return "non-private (no noise): **no privacy guarantee**"

    def fmt(x: float | None) -> str:
        return privacy.format_upper(x, 3)

    others = ", ".join(
        f"{int(n):,} users: {fmt(e)}" for n, e in result["epsilon_rdp_same_noise_if_users"].items()
    )
    if "num_clients" in result:
        users = f"{result['num_clients']} users"
        with_sizes = ""
    else:
        users = (f"the group's users sampled from {result['population']} (its size noised: "
                 f"{result['num_clients_noised']:.1f})")
        with_sizes = (f"; with the noised group sizes' release, "
                      f"({fmt(result['epsilon_rdp_with_group_sizes'])}, {delta:g})-DP (RDP; PLD "
                      f"{fmt(result['epsilon_pld_with_group_sizes'])})")
    return (
        f"({fmt(result['epsilon_rdp'])}, {delta:g})-DP at user level (RDP; PLD "
        f"{fmt(result['epsilon_pld'])}), {users}, sampling rate "
        f"{result['sampling_rate']:.3g}, {result['rounds']} rounds{with_sizes}; the same noise "
        f"with {others}"
    )
