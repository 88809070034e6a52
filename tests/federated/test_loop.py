"""The host loop: resuming reproduces an uninterrupted run; the budget guard stops early."""

import os
import signal
import time
from typing import Any, NamedTuple

import numpy as np
import optax
import pytest
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.federated import DpFedAvg, DpFedAvgConfig, ServerState, loop, run_rounds
from dpfed.train import preemption
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import ConfigError
from dpfed.train.workdir import RAW_LOG_PREFIX, Workdir, dumps
from tests import dispatch
from tests.federated import toy
from tests.killed import (
    KilledAtRelease,
    assert_ledger_json_covers_metrics,
    kill_after_metrics_record,
)


def engine(noise_multiplier=1.0):
    deltas = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    return DpFedAvg(toy.add_own_vector, optax.sgd(1.0), toy.vector_clients(deltas),
                    DpFedAvgConfig(clients_per_round=6, l2_clip=0.5,
                                   noise_multiplier=noise_multiplier))


def ledger(target=None):
    return privacy.PrivacyLedger("user", "add_or_remove_one", 1e-5, target_epsilon=target)


def run(eng, path, rounds, target=None, **changes):
    """`run_rounds` of `eng` on toy params; `changes` replace its keyword arguments."""
    kwargs = dict(
        rounds=rounds, seed=3, workdir=Workdir(path), ledger=ledger(target),
        evaluate=lambda s: {"norm": float(np.linalg.norm(s.params))}, eval_every=2,
        checkpoint_every=2, log=lambda _: None)
    return run_rounds(eng, eng.init(toy.params_of(4)), **{**kwargs, **changes})


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    eng = engine()
    whole = run(eng, tmp_path / "whole", rounds=6)
    run(eng, tmp_path / "split", rounds=4)  # "killed" after round 4
    resumed = run(eng, tmp_path / "split", rounds=6)
    assert resumed.resumed_from == 4, "the second run should resume from round 4"
    np.testing.assert_array_equal(np.asarray(resumed.state.params), np.asarray(whole.state.params),
                                  err_msg="resumed params differ from the uninterrupted run")
    assert resumed.ledger.to_json() == whole.ledger.to_json(), "ledgers must match"
    rounds = [r["round"] for r in Workdir(tmp_path / "split").read_metrics()]
    assert rounds == [2, 4, 6], f"metrics must not repeat rounds after a resume: {rounds}"


class _ServerStateBeforeStop59(NamedTuple):
    """`ServerState` as the code before stop 59 had and checkpointed it (no `audit`)."""

    params: Any
    opt_state: Any
    round: Any
    clip_norm: Any
    client_states: Any
    context: Any


def test_a_checkpoint_written_before_server_state_had_audit_resumes(tmp_path, monkeypatch):
    eng = engine()
    whole = run(eng, tmp_path / "whole", rounds=6)
    with monkeypatch.context() as patched:  # the older code's checkpoints
        patched.setattr(loop, "checkpoint_layout", lambda s: _ServerStateBeforeStop59(*s[:6]))
        patched.setattr(loop, "from_checkpoint_layout", lambda saved: ServerState(*saved))
        run(eng, tmp_path / "split", rounds=4)
    resumed = run(eng, tmp_path / "split", rounds=6)
    assert resumed.resumed_from == 4, (
        "a checkpoint in the layout before ServerState.audit must resume (orbax records "
        "fields by name: saving the empty audit field would refuse it)")
    np.testing.assert_array_equal(np.asarray(resumed.state.params), np.asarray(whole.state.params),
                                  err_msg="the resumed run must end as the uninterrupted one")


def test_a_run_without_an_audit_checkpoints_the_layout_it_had_before_stop_59(tmp_path):
    eng = engine()
    run(eng, tmp_path, rounds=2)
    template = _ServerStateBeforeStop59(*eng.init(toy.params_of(4))[:6])
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        restored, _ = checkpointer.restore(template)  # the older code's restore
    assert int(restored.round) == 2, (
        "the older code must read a checkpoint of a run without an audit (no audit field)")


def test_a_run_extended_then_killed_leaves_a_ledger_json_of_every_logged_round(
        tmp_path, monkeypatch):
    # ledger.json used to be written at a run's end only: a finished run extended with
    # more rounds and killed after logging round 5 (checkpoint 4) kept the ledger.json of
    # its first end (2 rounds) beside records of rounds 3-5 at a higher eps.
    eng = engine()
    run(eng, tmp_path, rounds=2, eval_every=1)
    with monkeypatch.context() as patch:
        kill_after_metrics_record(patch, "round", 5)
        with pytest.raises(KilledAtRelease):
            run(eng, tmp_path, rounds=8, eval_every=1)
    assert_ledger_json_covers_metrics(tmp_path, "epsilon_rdp")


def test_a_run_counted_by_its_release_ledger_may_not_end_before_its_logged_rounds(
        tmp_path, monkeypatch):
    # DPD-fVAE's local DP keeps no ledger of rounds, but each logged round is a release its
    # release ledger counts: a rerun ending before them would leave them in no ledger.
    eng = engine(noise_multiplier=0.0)
    own = ledger()
    with monkeypatch.context() as patch:
        kill_after_metrics_record(patch, "round", 3)  # its checkpoint: round 2
        with pytest.raises(KilledAtRelease):
            run(eng, tmp_path, rounds=4, ledger=None, release_ledger=lambda s: own, eval_every=1)
    with pytest.raises(ConfigError, match="would be in no ledger"):
        run(eng, tmp_path, rounds=2, ledger=None, release_ledger=lambda s: own)


def test_the_ledger_json_of_a_run_is_its_release_ledger_where_one_is_given(tmp_path):
    # DPD-fVAE's local DP: the ledger of the releases is the worst client's, not `ledger`.
    eng, own = engine(), ledger()
    own.metadata["whose"] = "the hook's"
    run(eng, tmp_path, rounds=2, release_ledger=lambda state: own)
    written = Workdir(tmp_path).read_json_object("ledger.json")
    assert written["metadata"] == {"whose": "the hook's"}, f"ledger.json: {written}"


def test_a_resumed_runs_clock_counts_the_invocation_up_to_its_checkpoint(tmp_path):
    eng = engine()
    # "killed" after round 4, begun 50 s before its loop
    killed = run(eng, tmp_path, rounds=4, started=time.time() - 50.0)
    assert killed.clock.earlier == 0.0 and killed.clock.seconds() >= 50.0, killed.clock
    resumed = run(eng, tmp_path, rounds=6)
    assert resumed.clock.earlier >= 50.0, (
        f"the resume must start from the ~50 s the checkpoint of round 4 held: {resumed.clock}")
    assert resumed.clock.seconds() > resumed.clock.earlier, "and count its own time"


def test_a_loss_gone_nan_is_warned_about_once_and_the_result_says_diverged(tmp_path):
    eng, messages = engine(), []
    result = run(eng, tmp_path, rounds=6, log=messages.append,
                 evaluate=lambda s: {"test_loss": float("nan") if int(s.round) >= 4 else 1.0})
    warnings = [m for m in messages if "diverged" in m]
    assert len(warnings) == 1 and "after round 4" in warnings[0], messages
    assert result.diverged, "the last evaluation's loss is NaN"
    assert not run(eng, tmp_path / "sane", rounds=2).diverged, "finite params and no loss"


def test_a_finished_diverged_run_rerun_says_so_again(tmp_path):
    eng, nan_loss = engine(), lambda s: {"test_loss": float("nan")}
    run(eng, tmp_path, rounds=2, evaluate=nan_loss)
    messages = []
    rerun = run(eng, tmp_path, rounds=2, evaluate=nan_loss, log=messages.append)
    assert rerun.trained_nothing and rerun.diverged, "the rerun restores the diverged model"
    warnings = [m for m in messages if "warning:" in m and "diverged" in m]
    assert len(warnings) == 1 and "after round 2" in warnings[0], (
        f"a rerun of a diverged run must warn as the run did: {messages}")


def test_nan_client_updates_are_warned_about_once_as_raw_diagnostics(tmp_path):
    # They count as zero in the sum, so the shared model stays finite: only this says so.
    deltas = np.full((30, 4), np.nan, np.float32)
    eng = DpFedAvg(toy.add_own_vector, optax.sgd(1.0), toy.vector_clients(deltas),
                   DpFedAvgConfig(clients_per_round=6, l2_clip=0.5, noise_multiplier=1.0))
    messages = []
    result = run(eng, tmp_path, rounds=4, checkpoint_every=4, log=messages.append, desc="toy")
    warnings = [m for m in messages if "NaN or inf and count as zero" in m]
    assert len(warnings) == 1 and "of round 2" in warnings[0], messages
    assert warnings[0].startswith(RAW_LOG_PREFIX + "[toy]"), (
        f"a count of raw client updates is no release and must be labelled: {warnings[0]}")
    assert not result.diverged, "the zeroed updates leave the shared model finite"


def test_each_checkpoint_counts_the_records_logged_before_it(tmp_path):
    run(engine(), tmp_path, rounds=6)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    counts = {step: checkpointer.restore_extra(step)["metrics_records"]
              for step in checkpointer.all_steps()}
    assert counts == {4: 2, 6: 3}, (
        f"records of rounds 2, 4 (and 6) precede the checkpoints of rounds 4 and 6: {counts}")


def test_raw_cohort_figures_go_to_diagnostics_not_to_the_release_log(tmp_path):
    eng = engine()
    result = run_rounds(
        eng, eng.init(toy.params_of(4)), rounds=2, seed=3, workdir=Workdir(tmp_path),
        ledger=ledger(), evaluate=lambda s: {"norm": 1.0},
        diagnose=lambda s: {"per_client": 0.5}, eval_every=1, checkpoint_every=2,
        log=lambda _: None)
    wd = Workdir(tmp_path)
    released = set().union(*wd.read_metrics())
    assert released == {"round", "epsilon_rdp", "clip_norm", "noised_unclipped_fraction",
                        "norm"}, f"metrics.jsonl holds more than releases: {sorted(released)}"
    diagnosed = set().union(*wd.read_diagnostics())
    assert {"cohort_size", "update_norm_mean", "unclipped_fraction", "client_norm",
            "per_client"} <= diagnosed, f"diagnostics.jsonl lacks raw figures: {diagnosed}"
    assert [r["round"] for r in wd.read_diagnostics()] == [1, 2], "one record per evaluation"
    assert result.diagnostics["per_client"] == 0.5, "the last diagnostics come back"
    assert "cohort_size" not in result.evaluation, "the result's evaluation is a release"


def test_resume_does_not_repeat_diagnostics(tmp_path):
    eng = engine()
    run(eng, tmp_path, rounds=4)
    with Workdir(tmp_path).file("diagnostics.jsonl").open("a") as f:
        f.write('{"round": 5, "cohort_size": 6}\n')  # logged by a run killed before its save
    run(eng, tmp_path, rounds=6)
    rounds = [r["round"] for r in Workdir(tmp_path).read_diagnostics()]
    assert rounds == [2, 4, 6], f"diagnostics must not repeat rounds after a resume: {rounds}"


def test_budget_guard_stops_before_the_round_that_would_exceed_the_target(tmp_path):
    eng = engine()
    event = eng.round_event()
    target = privacy.epsilon(dp_event.SelfComposedDpEvent(event, 5), 1e-5)
    result = run(eng, tmp_path, rounds=10, target=target * 1.0001)
    assert result.rounds_done == 5, f"5 rounds fit the budget, ran {result.rounds_done}"
    assert result.ledger.epsilon() <= target * 1.0001, "the ledger stays within its target"


def test_resume_honours_the_target_it_is_launched_with(tmp_path):
    eng = engine()
    event = eng.round_event()
    target = lambda n: privacy.epsilon(dp_event.SelfComposedDpEvent(event, n), 1e-5) * 1.0001
    run(eng, tmp_path, rounds=2, target=target(6))  # interrupted after round 2
    lowered = run(eng, tmp_path, rounds=10, target=target(4))
    assert lowered.rounds_done == 4, f"a lowered target allows 4 rounds, ran {lowered.rounds_done}"
    raised = run(eng, tmp_path, rounds=10, target=target(7))
    assert raised.rounds_done == 7, f"a raised target allows 7 rounds, ran {raised.rounds_done}"
    assert raised.ledger.to_json()["target_epsilon"] == target(7)


def test_resume_under_a_target_below_what_was_spent_is_refused(tmp_path):
    eng = engine()
    event = eng.round_event()
    target = lambda n: privacy.epsilon(dp_event.SelfComposedDpEvent(event, n), 1e-5) * 1.0001
    run(eng, tmp_path, rounds=3, target=target(6))  # interrupted after round 3
    with pytest.raises(ConfigError) as error:
        run(eng, tmp_path, rounds=10, target=target(2))
    assert error.value.field == "target_epsilon", (
        f"3 rounds were spent; a target of 2 rounds must be refused, not released: {error.value}")


def test_private_engine_without_ledger_is_refused(tmp_path):
    eng = engine()
    with pytest.raises(ValueError, match="ledger"):
        run_rounds(eng, eng.init(toy.params_of(4)), rounds=1, seed=0, workdir=Workdir(tmp_path),
                   ledger=None, evaluate=dict, eval_every=1, checkpoint_every=1)


def test_non_private_engine_with_a_ledger_is_refused(tmp_path):
    # The other direction: a ledger for rounds that add no noise would record
    # `round_event()`'s None, and eps claims for a run with no guarantee.
    eng = engine(noise_multiplier=0.0)
    with pytest.raises(ValueError, match="non-private one none"):
        run(eng, tmp_path, rounds=1)


@pytest.mark.parametrize("field", ["eval_every", "checkpoint_every"])
def test_a_period_below_one_is_a_config_error_naming_it(tmp_path, field):
    eng = engine()
    periods = {"eval_every": 1, "checkpoint_every": 1, field: 0}
    with pytest.raises(ConfigError) as info:
        run_rounds(eng, eng.init(toy.params_of(4)), rounds=1, seed=0, workdir=Workdir(tmp_path),
                   ledger=ledger(), evaluate=dict, **periods)
    assert info.value.field == field, f"a period of 0 must be blamed on {field}, not crash"


class _ReadinessWatcher:
    """The engine, with slow rounds; records whether each round's input state was ready."""

    def __init__(self, engine):
        self.engine, self.ready = engine, []
        self.round = dispatch.watch(
            engine.round, self.ready, lambda s: s._replace(params=dispatch.slow_identity(s.params))
        )

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_progress_lines_wait_for_the_round_they_report(tmp_path, monkeypatch):
    # With asynchronous dispatch (one device) the host runs rounds ahead of the device; a
    # line that did not wait for its round would count rounds that are only queued.
    seen = dispatch.record_progress_waits(monkeypatch, loop, lambda state: state.round)
    run(engine(), tmp_path, rounds=3)
    assert seen == [(1, 1), (2, 2), (3, 3)], (
        f"(line's round, state it waits for): {seen}; each line must wait for its round")


def test_on_several_cpu_devices_each_round_waits_for_the_previous_one(tmp_path):
    # XLA:CPU deadlocks (a device never joins an all-reduce) when the host queues rounds
    # ahead of its devices; the tests run on 8 CPU devices.
    watched = _ReadinessWatcher(engine())
    run_rounds(watched, watched.init(toy.params_of(4)), rounds=4, seed=0,
               workdir=Workdir(tmp_path), ledger=ledger(), evaluate=lambda _: {}, eval_every=4,
               checkpoint_every=4)
    assert watched.ready == [True] * 4, (
        f"a round was dispatched before the previous one finished: {watched.ready}")


def test_the_privacy_summary_states_the_delta_of_its_guarantee(tmp_path):
    # Every other ledger here is at delta 1e-5, the trainers' default.
    eng = engine()
    spent = privacy.PrivacyLedger("user", "add_or_remove_one", 3e-6)
    result = loop.LoopResult(eng.init(toy.params_of(4)), spent, 0, 0, {}, None)
    fields = loop.write_privacy_summary(result, eng, Workdir(tmp_path), 3e-6)
    assert fields["delta"] == 3e-6, f"a guarantee at delta 3e-6 stated as {fields['delta']}"


def test_describe_user_level_privacy_states_eps_users_and_larger_populations():
    from dpfed.federated import describe_user_level_privacy

    result = {
        "epsilon_rdp": 34.158, "epsilon_pld": 30.09, "num_clients": 67,
        "sampling_rate": 0.0746, "rounds": 150,
        "epsilon_rdp_same_noise_if_users": {"3400": 4.107, "1000000": 1.5896},
    }
    assert describe_user_level_privacy(result, 1e-5) == (
        "(34.2, 1e-05)-DP at user level (RDP; PLD 30.1), 67 users, sampling rate 0.0746, "
        "150 rounds; the same noise with 3,400 users: 4.11, 1,000,000 users: 1.59"
    ), "the report's privacy sentence"
    assert "no privacy guarantee" in describe_user_level_privacy(
        {**result, "epsilon_rdp": None}, 1e-5
    ), "a run without eps must say it has no guarantee"


def test_describe_user_level_privacy_of_a_subpopulation_gives_the_noised_size_and_its_eps():
    from dpfed.federated import describe_user_level_privacy

    result = {
        "epsilon_rdp": 3.5, "epsilon_pld": 3.1, "population": 200, "num_clients_noised": 71.26,
        "epsilon_rdp_with_group_sizes": 3.62, "epsilon_pld_with_group_sizes": 3.2,
        "sampling_rate": 0.025, "rounds": 150,
        "epsilon_rdp_same_noise_if_users": {"3400": 0.5},
    }
    assert describe_user_level_privacy(result, 1e-5) == (
        "(3.5, 1e-05)-DP at user level (RDP; PLD 3.1), the group's users sampled from 200 "
        "(its size noised: 71.3), sampling rate 0.025, 150 rounds; with the noised group "
        "sizes' release, (3.62, 1e-05)-DP (RDP; PLD 3.2); the same noise with 3,400 users: 0.5"
    ), "no true group size; the population, the noised size and the eps with its release"


def test_the_last_round_is_checkpointed_off_the_period(tmp_path):
    eng = engine()
    run(eng, tmp_path, rounds=3)  # checkpoint_every=2: round 3 is saved only as the last
    again = run(eng, tmp_path, rounds=3)
    assert (again.resumed_from, again.rounds_done) == (3, 3), (
        f"a finished run must resume at its end, not rerun round 3: {again.resumed_from}")


def test_a_rerun_of_a_finished_run_returns_what_its_last_round_logged(tmp_path):
    # A rerun that finds the run finished (fedlm_debug's first LM on every resume of the
    # demo) returned a fresh evaluation without the last round's eps and released metrics:
    # the LM's summary.json (`last_evaluation`) then differed from an uninterrupted run's.
    eng = engine()
    first = run(eng, tmp_path, rounds=4)
    again = run(eng, tmp_path, rounds=4)
    last = Workdir(tmp_path).read_metrics()[-1]

    def text(record):  # NaN != NaN: compared as written (summary.json sorts keys too)
        return dumps(record, sort_keys=True)

    assert text(again.evaluation) == text(first.evaluation) == text(last), (
        f"a finished run's rerun must return its last logged record: {again.evaluation}")
    assert text(again.diagnostics) == text(first.diagnostics), (
        f"and its last diagnostics: {again.diagnostics} vs {first.diagnostics}")


class _SigtermInRound:
    """The engine, with a SIGTERM to this process while round `at` runs (a preemption)."""

    def __init__(self, eng, at):
        self._engine, self._at = eng, at

    def init(self, params):
        return self._engine.init(params)

    def round_event(self):
        return self._engine.round_event()

    def round(self, state, key, *, donate=False):
        if int(state.round) + 1 == self._at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self._engine.round(state, key, donate=donate)


def test_a_sigterm_checkpoints_the_round_it_interrupts_and_a_rerun_resumes_there(tmp_path):
    eng = engine()
    whole = run(eng, tmp_path / "whole", rounds=6)
    with pytest.raises(preemption.PreemptedError) as stopped:
        run(_SigtermInRound(eng, at=3), tmp_path / "split", rounds=6)
    assert stopped.value.step == 3, f"the loop must stop after round 3, not {stopped.value.step}"
    steps = Checkpointer(tmp_path / "split" / "checkpoints").all_steps()
    assert steps[-1] == 3, f"round 3 must be saved, off the period of 2: {steps}"
    resumed = run(eng, tmp_path / "split", rounds=6)
    assert resumed.resumed_from == 3, "the rerun must resume from the preempted round"
    np.testing.assert_array_equal(np.asarray(resumed.state.params), np.asarray(whole.state.params),
                                  err_msg="resumed params differ from the uninterrupted run")
    assert resumed.ledger.to_json() == whole.ledger.to_json(), (
        "the preempted and resumed run's ledger must count each round once, as the whole one")


def test_the_user_level_privacy_text_rounds_eps_up():
    text = loop.describe_user_level_privacy(
        {"epsilon_rdp": 4.22434, "epsilon_pld": 3.0001,
         "epsilon_rdp_same_noise_if_users": {1000: 0.12341},
         "num_clients": 10, "sampling_rate": 0.1, "rounds": 1}, 1e-5)
    assert text.startswith("(4.23, 1e-05)-DP"), f"eps 4.22434 must not read 4.22: {text}"
    assert "PLD 3.01)" in text and "1,000 users: 0.124" in text, text
