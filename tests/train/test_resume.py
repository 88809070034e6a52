"""Starting or resuming a run: state and ledger restored together, the current target kept."""

import dataclasses
import math
import time

import numpy as np
import pytest
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.train.checkpoint import Checkpointer
from dpfed.train.config import ConfigError
from dpfed.train.resume import (
    Spent,
    budget_stop,
    calibrate_rest,
    checkpoint_extra,
    checkpointed_spend,
    resume_or_start,
)
from dpfed.train.run_clock import RunClock
from dpfed.train.workdir import TrainingData, Workdir

EVENT = dp_event.GaussianDpEvent(2.0)
CLOCK = RunClock(started=time.time())


@dataclasses.dataclass
class Config:
    steps: int = 10
    target_epsilon: float | None = None
    lr: float = 0.1


def ledger(target=None, releases=0):
    result = privacy.PrivacyLedger("example", "add_or_remove_one", 1e-5, target_epsilon=target)
    if releases:
        result.record(EVENT, releases)
    return result


def _eps_of(count):
    """eps at delta 1e-5 of `count` releases of EVENT."""
    return privacy.epsilon(dp_event.SelfComposedDpEvent(EVENT, count), 1e-5)


def state(step):
    return {"w": np.full(3, float(step), np.float32), "step": np.full((), step, np.int32)}


def start(path, fresh_ledger, config=None, messages=None, data=None):
    wd = Workdir(path)
    return resume_or_start(
        Checkpointer(wd.file("checkpoints")), wd, state(0), fresh_ledger,
        step_of=lambda s: int(s["step"]), total=(config or Config()).steps, event=EVENT,
        config=config or Config(), data=data,
        log=(messages.append if messages is not None else lambda _: None),
    )


DATA = TrainingData("a" * 64, "data_dir")  # the digests of two runs' training data
OTHER_DATA = TrainingData("b" * 64, "data_dir")


def checkpoint(path, step, saved_ledger, logged_past=2):
    wd = Workdir(path)
    stored = saved_ledger.to_json(with_pld=False) if saved_ledger else None
    Checkpointer(wd.file("checkpoints")).save(step, state(step), {"ledger": stored})
    for s in range(1, step + logged_past + 1):  # past the checkpoint: logged by a killed run
        wd.append_metrics({"step": s})


def test_fresh_run_starts_at_zero_with_its_own_ledger_and_pins_config(tmp_path):
    fresh = ledger(target=10.0)
    result = start(tmp_path, fresh)
    assert (result.step, result.resumed) == (0, False), "no checkpoint: a fresh start"
    assert result.ledger is fresh and result.state["w"].sum() == 0
    assert (tmp_path / "config.json").exists(), "the fresh run pins its config"


def test_fresh_run_pins_its_training_data(tmp_path):
    start(tmp_path, ledger(), data=DATA)
    assert Workdir(tmp_path).read_json("data.json") == {"sha256": DATA.sha256}, (
        "a fresh run must pin the digest its resumes are checked against")


def test_resume_on_other_training_data_is_refused_naming_the_flag(tmp_path):
    # --data_dir may change on resume (the data moved): config.json cannot see that the
    # folder now holds other data, and the checkpoint's model and ledger went on there.
    start(tmp_path, ledger(), data=DATA)
    checkpoint(tmp_path, 2, ledger(releases=2))
    with pytest.raises(ConfigError, match="differ from those of the run being resumed") as error:
        start(tmp_path, ledger(), data=OTHER_DATA)
    assert error.value.field == "data_dir", f"must name the flag to look at: {error.value}"
    assert len(Workdir(tmp_path).read_metrics()) == 4, "a refused resume must leave the logs"


def test_rerun_before_the_first_checkpoint_on_other_training_data_is_refused(tmp_path):
    # The replay would drop releases made from the first data and log others in their place.
    start(tmp_path, ledger(), data=DATA)
    Workdir(tmp_path).append_metrics({"step": 1})
    with pytest.raises(ConfigError) as error:
        start(tmp_path, ledger(), data=OTHER_DATA)
    assert error.value.field == "data_dir", f"must name the flag to look at: {error.value}"


def test_resume_restores_state_and_ledger_and_drops_later_metrics(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 4, ledger(releases=4))
    messages = []
    result = start(tmp_path, ledger(), messages=messages)
    assert (result.step, result.resumed) == (4, True)
    np.testing.assert_array_equal(result.state["w"], np.full(3, 4.0), "restored state")
    assert result.ledger.num_releases == 4, "the checkpoint's releases are kept, not recounted"
    steps = [r["step"] for r in Workdir(tmp_path).read_metrics()]
    assert steps == [1, 2, 3, 4], f"records after the checkpoint must go: {steps}"
    assert messages == [f"resumed from step 4 in {tmp_path}"]


def test_resume_adopts_the_target_of_this_invocation(tmp_path):
    Workdir(tmp_path).pin_config(Config(target_epsilon=50.0), resuming=False)
    checkpoint(tmp_path, 4, ledger(target=50.0, releases=4), logged_past=0)
    lower = _eps_of(6)  # below 50, above the eps of the 4 releases spent
    result = start(tmp_path, ledger(target=lower), config=Config(target_epsilon=lower))
    assert result.ledger.target_epsilon == lower, (
        "a resumed run must honour the target it is launched with, not the checkpoint's: "
        "keeping the old target would spend past the budget the user asked for"
    )
    assert result.ledger.num_releases == 4


def test_resume_adopts_new_metadata_and_records_what_changed(tmp_path):
    Workdir(tmp_path).pin_config(Config(target_epsilon=5.0), resuming=False)
    first = ledger(target=5.0, releases=4)
    first.metadata.update(noise_multiplier=1.5, dataset="mnist5k")
    checkpoint(tmp_path, 4, first, logged_past=0)  # the run ended at its last checkpoint
    fresh = ledger(target=6.0)
    fresh.metadata.update(noise_multiplier=1.2, dataset="mnist5k")
    result = start(tmp_path, fresh, config=Config(target_epsilon=6.0))
    meta = result.ledger.metadata
    assert meta["noise_multiplier"] == 1.2, "the ledger must describe this invocation's noise"
    assert meta["changed_on_resume"] == [
        {"step": 4, "noise_multiplier": 1.2, "target_epsilon": 6.0}
    ], f"the change and the step it applies from must be recorded: {meta}"


@pytest.mark.parametrize("logged_past", [1, 2])
def test_resume_that_would_replay_logged_steps_with_other_noise_is_refused(tmp_path, logged_past):
    # Steps 5 (and 6) were logged by the killed run at z 1.5; replaying them at z 1.2 would
    # reuse their noise draws at another scale, and the logged releases would be in no ledger.
    Workdir(tmp_path).pin_config(Config(target_epsilon=5.0), resuming=False)
    first = ledger(target=5.0, releases=4)
    first.metadata.update(noise_multiplier=1.5)
    checkpoint(tmp_path, 4, first, logged_past=logged_past)
    fresh = ledger(target=6.0)
    fresh.metadata.update(noise_multiplier=1.2)
    last = 4 + logged_past
    with pytest.raises(ConfigError, match=f"up to step {last}") as error:
        start(tmp_path, fresh, config=Config(target_epsilon=6.0))
    assert error.value.field == "noise_multiplier", error.value.field
    steps = [r["step"] for r in Workdir(tmp_path).read_metrics()]
    assert steps == list(range(1, last + 1)), (
        f"a refused resume must leave the metrics alone: {steps}")
    same = ledger(target=6.0)
    same.metadata.update(noise_multiplier=1.5)  # the same mechanism replays what was logged
    assert start(tmp_path, same, config=Config(target_epsilon=6.0)).ledger.num_releases == 4


@pytest.mark.parametrize(
    "config, field",
    [
        (Config(steps=5), "steps"),  # asked to end at step 5
        (Config(target_epsilon=_eps_of(5) * 1.0001), "target_epsilon"),  # affords 5 steps
    ],
)
def test_resume_that_would_end_before_logged_steps_is_refused(tmp_path, config, field):
    # The killed run logged steps 5-6 (releases) after its checkpoint at step 4; a run
    # ending at step 5 would never record step 6 in its ledger.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 4, ledger(releases=4), logged_past=2)
    fresh = ledger(target=config.target_epsilon)
    with pytest.raises(ConfigError, match="up to step 6") as error:
        start(tmp_path, fresh, config=config)
    assert error.value.field == field, f"the error must name --{field}: {error.value.field}"
    steps = [r["step"] for r in Workdir(tmp_path).read_metrics()]
    assert steps == [1, 2, 3, 4, 5, 6], f"a refused resume must leave the metrics alone: {steps}"


def test_rerun_of_a_finished_run_with_fewer_steps_ends_where_it_is(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 10, ledger(releases=10), logged_past=0)  # finished at step 10
    result = start(tmp_path, ledger(), config=Config(steps=5))
    assert (result.step, result.last) == (10, 10), (
        f"nothing to run and nothing lost: got step {result.step}, last {result.last}")


def test_rerun_before_the_first_checkpoint_replays_what_was_logged_once(tmp_path):
    # Killed after logging steps 1-2, before any checkpoint: the same command replays them.
    wd = Workdir(tmp_path)
    wd.pin_config(Config(), resuming=False)
    for step in (1, 2):
        wd.append_metrics({"step": step})
    result = start(tmp_path, ledger())
    assert (result.step, result.resumed) == (0, False), "no checkpoint: from step 0"
    assert wd.read_metrics() == [], "the replay logs steps 1-2 again: the old records must go"


def test_rerun_before_the_first_checkpoint_with_other_settings_is_refused(tmp_path):
    # No checkpointed ledger tells which mechanism made the logged releases: any change
    # (here the target, resumable after a checkpoint) could replay them with other noise.
    wd = Workdir(tmp_path)
    wd.pin_config(Config(), resuming=False)
    wd.append_metrics({"step": 1})
    with pytest.raises(ConfigError) as error:
        start(tmp_path, ledger(target=3.0), config=Config(target_epsilon=3.0))
    assert error.value.field == "target_epsilon", error.value.field
    assert len(wd.read_metrics()) == 1, "a refused rerun must leave the metrics alone"


def test_unchanged_resume_records_no_change(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    first = ledger(releases=4)
    first.metadata.update(features=(8, 16))  # a tuple comes back from JSON as a list
    checkpoint(tmp_path, 4, first)
    fresh = ledger()
    fresh.metadata.update(features=(8, 16))
    meta = start(tmp_path, fresh).ledger.metadata
    assert "changed_on_resume" not in meta, f"nothing changed, yet: {meta}"


def test_checkpointed_spend_reads_step_and_ledger_without_state(tmp_path):
    wd = Workdir(tmp_path)
    assert checkpointed_spend(Checkpointer(wd.file("checkpoints")), wd, Config()) is None, (
        "fresh run")
    wd.pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 3, ledger(releases=3))
    spent = checkpointed_spend(Checkpointer(wd.file("checkpoints")), wd, Config())
    assert spent.step == 3 and spent.ledger.num_releases == 3, f"read {spent}"


def test_checkpointed_spend_of_a_non_private_checkpoint_is_none(tmp_path):
    checkpoint(tmp_path, 3, None)
    wd = Workdir(tmp_path)
    assert checkpointed_spend(Checkpointer(wd.file("checkpoints")), wd, Config()) is None


def test_checkpointed_spend_refuses_a_changed_setting_before_reading_the_ledger(tmp_path):
    # A calibration composes the ledger with this invocation's events: under a changed
    # sampling (another neighbouring relation) the accountant raised instead.
    wd = Workdir(tmp_path)
    wd.pin_config(Config(lr=0.1), resuming=False)
    checkpoint(tmp_path, 3, ledger(releases=3))
    with pytest.raises(ConfigError) as error:
        checkpointed_spend(Checkpointer(wd.file("checkpoints")), wd, Config(lr=0.2))
    assert error.value.field == "lr", f"must name the changed field: {error.value}"


def test_checkpointed_spend_refuses_other_training_data_before_reading_the_ledger(tmp_path):
    # A calibration on other data (another size) may find the target out of reach and
    # name --target_epsilon instead of the data.
    wd = Workdir(tmp_path)
    start(tmp_path, ledger(), data=DATA)
    checkpoint(tmp_path, 3, ledger(releases=3))
    with pytest.raises(ConfigError) as error:
        checkpointed_spend(Checkpointer(wd.file("checkpoints")), wd, Config(), OTHER_DATA)
    assert error.value.field == "data_dir", f"must name the flag to look at: {error.value}"


def _step(z):
    return dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z))


def _calibrate(total, spent, target):
    relation = privacy.relation_for("poisson")
    return calibrate_rest(_step, total, spent, target, 1e-5, relation)


def test_calibrate_rest_of_a_fresh_run_calibrates_all_steps():
    z = _calibrate(50, None, 2.0)
    direct = privacy.calibrate_noise_multiplier(
        lambda z: dp_event.SelfComposedDpEvent(_step(z), 50), 2.0, 1e-5)
    assert z == direct, f"a fresh run calibrates its {50} steps: {z} vs {direct}"


@pytest.mark.parametrize("new_target", [1.5, 3.0])
def test_calibrate_rest_ends_a_resumed_run_at_its_new_target(new_target):
    z_first = _calibrate(50, None, 2.0)
    spent = ledger(releases=0)
    spent.record(_step(z_first), 20)
    z = _calibrate(50, Spent(20, spent), new_target)
    spent.record(_step(z), 30)
    eps = spent.epsilon()
    assert new_target * 0.99 <= eps <= new_target, (
        f"20 steps at z {z_first:.4f} then 30 at z {z:.4f} reach eps {eps:.4f}: the rest of "
        f"the run must be calibrated against what is spent to end at {new_target}"
    )
    assert (z > z_first) == (new_target < 2.0), "a lower target needs more noise"


def test_calibrate_rest_keeps_the_checkpoints_z_when_nothing_changed():
    # A recalibration of the remaining 30 steps lands a few 1e-5 away from the first z:
    # the same command must replay the killed run's steps with its exact noise.
    z_first = _calibrate(50, None, 2.0)
    spent = ledger(releases=0)
    spent.metadata["noise_multiplier"] = z_first
    spent.record(_step(z_first), 20)
    assert _calibrate(50, Spent(20, spent), 2.0) == z_first, (
        "an unchanged resume must keep the checkpoint's noise multiplier"
    )


def test_calibrate_rest_recalibrates_when_the_kept_z_would_overspend():
    z_first = _calibrate(50, None, 2.0)
    spent = ledger(releases=0)
    spent.metadata["noise_multiplier"] = z_first
    spent.record(_step(z_first), 20)
    z = _calibrate(60, Spent(20, spent), 2.0)  # 10 more steps at the same target
    assert z > z_first, f"60 steps at the target of 50 need more noise: {z} vs {z_first}"


def test_calibrate_rest_recalibrates_when_the_kept_z_would_underspend_a_raised_target():
    # The checkpoint's z still meets a target raised from 2.0 to 2.1, but the rest of the
    # run needs ~5% less noise to end there: beyond KEEP_NOISE_TOLERANCE (1%), so the z is
    # recalibrated, and the run ends at its new target, not below it.
    z_first = _calibrate(50, None, 2.0)
    spent = ledger(releases=0)
    spent.metadata["noise_multiplier"] = z_first
    spent.record(_step(z_first), 20)
    z = _calibrate(50, Spent(20, spent), 2.1)
    spent.record(_step(z), 30)
    eps = spent.epsilon()
    assert z < z_first and 2.1 * 0.99 <= eps <= 2.1, (
        f"a raised target must be met with less noise: z {z:.4f} (checkpoint's "
        f"{z_first:.4f}) ends at eps {eps:.4f}, not 2.1")


def test_calibrate_rest_of_a_finished_run_reports_the_z_its_last_steps_used():
    # Resumed to 50 steps at a raised target, then rerun: no step is left to calibrate.
    z_first = _calibrate(20, None, 1.0)
    spent = ledger(releases=0)
    spent.record(_step(z_first), 20)
    z_rest = _calibrate(50, Spent(20, spent), 2.0)
    spent.metadata["noise_multiplier"] = z_rest
    spent.record(_step(z_rest), 30)
    assert _calibrate(50, Spent(50, spent), 2.0) == z_rest, (
        "a rerun of a finished run runs no step: the z to report is the one its last steps "
        "used, not a fresh calibration of all 50 steps"
    )


def test_calibrate_rest_falls_back_when_the_checkpoint_spent_the_target():
    spent = ledger(releases=0)
    spent.record(_step(0.5), 40)  # far beyond eps 2
    assert _calibrate(50, Spent(40, spent), 2.0) == _calibrate(50, None, 2.0), (
        "nothing can be afforded: the fresh z is returned and budget_stop ends the run"
    )


def test_resume_under_changed_setting_is_refused(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 2, ledger(releases=2))
    with pytest.raises(ConfigError) as error:
        start(tmp_path, ledger(), config=Config(lr=0.2))
    assert error.value.field == "lr"


def test_private_run_cannot_resume_a_non_private_checkpoint(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 2, None)
    with pytest.raises(ValueError, match="non-private"):
        start(tmp_path, ledger())


def test_non_private_run_cannot_resume_a_private_checkpoint(tmp_path):
    # Resumed without a ledger, the run would drop the checkpoint's spent eps and release
    # its later steps in no ledger, its summary calling a DP-trained model non-private.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 2, ledger(releases=2))
    with pytest.raises(ValueError, match="written by a private run"):
        start(tmp_path, None)


def test_budget_stop_counts_the_restored_releases():
    target = _eps_of(7) * 1.0001
    assert budget_stop(ledger(target, releases=4), EVENT, 4, 20, log=print) == 7, (
        "4 spent + 3 more fit a target of 7 releases"
    )


def test_a_finished_run_that_ended_at_its_target_can_be_rerun():
    # A resumed run whose last step lands exactly on the target: the ledger's eps must be
    # the eps budget_stop allowed, or the rerun is refused as over the target.
    event = dp_event.PoissonSampledDpEvent(0.0512, dp_event.GaussianDpEvent(1.1))
    spent = privacy.PrivacyLedger("example", "add_or_remove_one", 1e-5)
    spent.record(event)
    spent.target_epsilon = spent.epsilon_with(event, 144)
    assert budget_stop(spent, event, 1, 145, log=print) == 145, "all 144 steps are affordable"
    spent.record(event, 144)
    assert budget_stop(spent, event, 145, 145, log=print) == 145, "the rerun must run"


def test_budget_stop_divides_by_events_per_step():
    target = _eps_of(7) * 1.0001
    assert budget_stop(ledger(target), EVENT, 0, 20, events_per_step=2) == 3, (
        "7 releases of 2 per step: 3 whole steps"
    )


def test_budget_stop_caps_the_steps_left_in_releases_not_steps():
    # 7 releases fit the target and 3 steps of 2 releases are left: all 3 steps (6
    # releases) fit. Capping at 3 releases would stop after step 1.
    target = _eps_of(7) * 1.0001
    assert budget_stop(ledger(target), EVENT, 0, 3, events_per_step=2) == 3, (
        "the steps left are 6 releases, all affordable")


def test_budget_stop_without_target_runs_to_the_end():
    assert budget_stop(ledger(None, releases=4), EVENT, 4, 20) == 20
    assert budget_stop(None, None, 4, 20) == 20


def test_budget_stop_refuses_a_fresh_run_that_cannot_afford_one_step():
    with pytest.raises(ConfigError) as error:
        budget_stop(ledger(_eps_of(1) * 0.99), EVENT, 0, 20, key="round")
    assert error.value.field == "target_epsilon" and "one round" in error.value.message, (
        "a fresh run whose first step already exceeds the target must not release its "
        f"untrained state under a DP label: {error.value}")


def test_budget_stop_refuses_a_fresh_run_that_affords_part_of_one_step():
    # Two releases a step (DataLens's events_per_step): a target that affords one of them
    # affords no step, and the run would release its untrained state under a DP label.
    with pytest.raises(ConfigError) as error:
        budget_stop(ledger(_eps_of(1) * 1.0001), EVENT, 0, 20, events_per_step=2)
    assert error.value.field == "target_epsilon" and "one step" in error.value.message, (
        f"one release of a two-release step is not a step: {error.value}")


def test_budget_stop_lets_a_fresh_run_afford_exactly_one_step():
    assert budget_stop(ledger(_eps_of(1) * 1.0001), EVENT, 0, 20) == 1


def test_budget_stop_refuses_a_target_below_what_the_checkpoint_spent():
    # Before, the run ended at once and released its model at eps(5) under target eps(3).
    with pytest.raises(ConfigError) as error:
        budget_stop(ledger(_eps_of(3), releases=5), EVENT, 5, 20)
    assert error.value.field == "target_epsilon" and "already spent" in error.value.message, (
        f"a lowered target cannot take back what was spent: {error.value}")


def test_budget_stop_refuses_a_target_just_below_what_the_checkpoint_spent():
    # 1% under the spent eps: no tolerance may let a run finish above its target.
    with pytest.raises(ConfigError) as error:
        budget_stop(ledger(_eps_of(5) * 0.99, releases=5), EVENT, 5, 20)
    assert error.value.field == "target_epsilon", (
        f"a ledger 1% over its target must be refused: {error.value}")


def test_budget_stop_refuses_a_target_one_ulp_below_what_the_checkpoint_spent():
    # No tolerance at all: a run may not finish even a rounding error above its target.
    spent = ledger(releases=5)
    spent.target_epsilon = math.nextafter(spent.epsilon(), 0.0)
    with pytest.raises(ConfigError) as error:
        budget_stop(spent, EVENT, 5, 20)
    assert error.value.field == "target_epsilon", (
        f"a ledger one ulp over its target must be refused: {error.value}")


def test_budget_stop_of_a_finished_run_is_where_it_ended():
    # A rerun of a finished run: 0 steps left (it raised a ValueError since 4e54de7).
    assert budget_stop(ledger(_eps_of(9), releases=5), EVENT, 20, 20) == 20


def test_budget_stop_says_when_the_checkpoint_spent_the_whole_target():
    messages = []
    last = budget_stop(ledger(_eps_of(5) * 1.0001, releases=5), EVENT, 5, 20, log=messages.append)
    assert last == 5, "no further step once the target is spent"
    assert "already spends" in messages[0], messages


def test_a_refused_resume_leaves_the_pinned_config_as_it_was(tmp_path):
    Workdir(tmp_path).pin_config(Config(target_epsilon=50.0), resuming=False)
    checkpoint(tmp_path, 4, ledger(target=50.0, releases=4), logged_past=0)
    lower = _eps_of(2)  # below what the checkpoint spent
    with pytest.raises(ConfigError):
        start(tmp_path, ledger(target=lower), config=Config(target_epsilon=lower))
    pinned = Workdir(tmp_path).read_json("config.json")
    assert pinned["target_epsilon"] == 50.0, f"the refused target was pinned: {pinned}"


OTHER = dp_event.GaussianDpEvent(1.0)  # another run's noise


def _log_eps(path, steps, eps_of=_eps_of):
    wd = Workdir(path)
    for s in steps:
        wd.append_metrics({"step": s, "epsilon_rdp": eps_of(s)})
    return wd


def test_rerun_without_checkpoints_of_logs_made_with_other_noise_is_refused(tmp_path):
    # E.g. checkpoints/ deleted after a resume that recalibrated z: the fresh run's one z
    # would replay steps whose releases were made with another noise.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    other_eps = lambda s: privacy.epsilon(dp_event.SelfComposedDpEvent(OTHER, s), 1e-5)  # noqa: E731
    wd = _log_eps(tmp_path, (2, 4), other_eps)
    with pytest.raises(ConfigError, match="another mechanism") as error:
        start(tmp_path, ledger())
    assert error.value.field == "workdir", error.value.field
    assert len(wd.read_metrics()) == 2, "a refused rerun must leave the metrics alone"


def test_rerun_without_checkpoints_of_logs_made_with_this_noise_replays_them(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    wd = _log_eps(tmp_path, (2, 4, 6))
    result = start(tmp_path, ledger())
    assert result.step == 0 and wd.read_metrics() == [], "the same noise: replayed from 0"


def test_the_first_logged_step_can_reveal_a_change_of_noise(tmp_path):
    # Logs whose last eps matches (a recalibration to the same target) but whose first
    # does not: checking the last record alone would miss the other noise.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _log_eps(tmp_path, (2, 4, 6), lambda s: _eps_of(s) * (1.01 if s == 2 else 1.0))
    with pytest.raises(ConfigError, match="at step 2"):
        start(tmp_path, ledger())


def test_the_last_logged_step_can_reveal_a_change_of_noise(tmp_path):
    # Logs whose first eps matches this run's noise but whose last does not (the killed
    # run's noise changed after step 4): checking the first record alone would miss it.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _log_eps(tmp_path, (2, 4, 6), lambda s: _eps_of(s) * (1.01 if s == 6 else 1.0))
    with pytest.raises(ConfigError, match="at step 6"):
        start(tmp_path, ledger())


def test_logs_of_noise_that_differs_in_its_last_digits_are_refused(tmp_path):
    # A recalibrated z differs from the first in its last digits (`calibrate_rest`), and
    # so do the eps it logs: 1e-6 relative here. Logged and replayed eps of the same
    # mechanism agree to float rounding; any looser tolerance replays other noise.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _log_eps(tmp_path, (2, 4), lambda s: _eps_of(s) * (1 + 1e-6))
    with pytest.raises(ConfigError, match="another mechanism"):
        start(tmp_path, ledger())


def test_resume_from_another_runs_checkpoint_is_refused(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _log_eps(tmp_path, (2, 4))
    other = ledger()
    other.record(OTHER, 4)
    Checkpointer(Workdir(tmp_path).file("checkpoints")).save(
        4, state(4), {"ledger": other.to_json(with_pld=False)})
    with pytest.raises(ConfigError, match="not this run's") as error:
        start(tmp_path, ledger())
    assert error.value.field == "workdir", error.value.field


def test_a_checkpoint_whose_ledger_agrees_only_with_earlier_records_is_refused(tmp_path):
    # The ledger of another run that changed its noise after step 2: its first releases
    # give the eps logged at step 2, not the one logged at step 4, the checkpoint's step.
    # The last record up to the checkpoint must be checked, not the first.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _log_eps(tmp_path, (2, 4))
    other = ledger(releases=2)
    other.record(OTHER, 2)
    Checkpointer(Workdir(tmp_path).file("checkpoints")).save(
        4, state(4), {"ledger": other.to_json(with_pld=False)})
    with pytest.raises(ConfigError, match="at step 4, but the ledger of the checkpoint"):
        start(tmp_path, ledger())


def test_resume_accepts_logs_that_match_the_ledger_in_pieces(tmp_path):
    # Records up to the checkpoint against its ledger's first releases; records past it
    # against the ledger extended by the replay: both agree to float rounding.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _log_eps(tmp_path, (2, 4, 6, 7))
    Checkpointer(Workdir(tmp_path).file("checkpoints")).save(  # after step 5: no record
        5, state(5), {"ledger": ledger(releases=5).to_json(with_pld=False)})
    result = start(tmp_path, ledger())
    assert result.step == 5 and result.ledger.num_releases == 5


def test_logged_eps_are_checked_in_releases_of_events_per_step(tmp_path):
    # DataLens records `events_per_step` aggregations a step: a record at step s was
    # logged after s * events_per_step releases.
    wd = Workdir(tmp_path)
    wd.pin_config(Config(), resuming=False)
    _log_eps(tmp_path, (1, 2, 3), lambda s: _eps_of(3 * s))
    Checkpointer(wd.file("checkpoints")).save(
        2, state(2), {"ledger": ledger(releases=6).to_json(with_pld=False)})
    result = resume_or_start(
        Checkpointer(wd.file("checkpoints")), wd, state(0), ledger(),
        step_of=lambda s: int(s["step"]), total=10, event=EVENT, events_per_step=3,
        config=Config(), log=lambda _: None)
    assert result.step == 2, "records at steps 2 and 3 agree with 6 and 9 releases"


def test_rerun_before_the_first_checkpoint_without_config_json_is_refused(tmp_path):
    # config.json alone tells how the logged releases were made when no checkpoint is left.
    wd = Workdir(tmp_path)
    wd.append_metrics({"step": 1})
    with pytest.raises(ConfigError, match="config.json is missing") as error:
        start(tmp_path, ledger())
    assert error.value.field == "workdir", error.value.field


def _finished_ledger_json(path, **metadata):
    finished = ledger(releases=10)
    finished.metadata.update(metadata)
    Workdir(path).write_json("ledger.json", finished.to_json(with_pld=False))


def test_rerun_without_checkpoints_of_the_same_finished_run_replays_it(tmp_path):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _finished_ledger_json(tmp_path, noise_multiplier=2.0)
    fresh = ledger()
    fresh.metadata.update(noise_multiplier=2.0)
    assert start(tmp_path, fresh).step == 0, "the same mechanism: replayed from step 0"


@pytest.mark.parametrize("metadata", [
    {"noise_multiplier": 1.0},  # another z
    {"noise_multiplier": 2.0, "changed_on_resume": [{"step": 5, "noise_multiplier": 2.0}]},
])
def test_rerun_without_checkpoints_of_another_ledger_json_is_refused(tmp_path, metadata):
    # metrics.jsonl emptied too: ledger.json alone says how the finished run's releases
    # were made, and a replay with another z (or one z for a run that changed its z on
    # a resume) would overwrite it with a ledger of other releases.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    _finished_ledger_json(tmp_path, **metadata)
    fresh = ledger()
    fresh.metadata.update(noise_multiplier=2.0)
    with pytest.raises(ConfigError, match="ledger.json records releases made") as error:
        start(tmp_path, fresh)
    assert error.value.field == "workdir", error.value.field


@pytest.mark.parametrize("text", [
    '{"unit": "exa',  # truncated: not JSON
    "[]",  # JSON, not an object
    "{}",  # an object without a ledger's fields
    '{"unit": "example", "neighboring_relation": "add_or_remove_one", "delta": 1e-05, '
    '"events": [{"type": "NoSuchDpEvent"}]}',  # an event that is not a DpEvent
])
def test_rerun_without_checkpoints_over_an_unreadable_ledger_json_is_refused(tmp_path, text):
    # With no checkpoint, ledger.json alone says how the finished run's releases were made;
    # a damaged one cannot say, so a replay (which would overwrite it) must be refused.
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    (tmp_path / "ledger.json").write_text(text)
    with pytest.raises(ConfigError, match="ledger.json is unreadable") as error:
        start(tmp_path, ledger())
    assert error.value.field == "workdir", error.value.field
    assert (tmp_path / "ledger.json").read_text() == text, "a refused rerun must not touch it"


def test_rerun_without_checkpoints_or_metrics_of_a_finished_run_checks_its_config(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_config(Config(), resuming=False)
    wd.write_summary({"steps": 10})
    with pytest.raises(ConfigError) as error:
        start(tmp_path, ledger(), config=Config(lr=0.5))
    assert error.value.field == "lr", f"a replay under another lr must be refused: {error.value}"


def _checkpoint_counting_records(path, step, saved_ledger, logged_past=2):
    """Records 1..step, a checkpoint that counts them (as the trainers save), then records
    a killed run logged after it."""
    wd = Workdir(path)
    for s in range(1, step + 1):
        wd.append_metrics({"step": s})
    extra = checkpoint_extra(saved_ledger, wd, CLOCK)
    Checkpointer(wd.file("checkpoints")).save(step, state(step), extra)
    for s in range(step + 1, step + logged_past + 1):
        wd.append_metrics({"step": s})


def _noise(z, target=6.0):
    result = ledger(target=target)
    result.metadata.update(noise_multiplier=z)
    return result


def test_checkpoint_extra_holds_the_ledger_and_the_count_of_records(tmp_path):
    wd = Workdir(tmp_path)
    for s in (1, 2, 3):
        wd.append_metrics({"step": s})
    extra = checkpoint_extra(ledger(releases=3), wd, CLOCK)
    assert extra["metrics_records"] == 3, f"3 records logged before the checkpoint: {extra}"
    assert privacy.PrivacyLedger.from_json(extra["ledger"]).num_releases == 3, "the ledger"
    assert checkpoint_extra(None, wd, CLOCK)["ledger"] is None, "a non-private run stores none"


def test_a_resume_starts_its_clock_from_the_checkpoints_wall_seconds(tmp_path):
    wd = Workdir(tmp_path)
    wd.pin_config(Config(), resuming=False)
    clock = RunClock(started=time.time() - 40.0, earlier=100.0)
    extra = checkpoint_extra(ledger(releases=4), wd, clock)
    Checkpointer(wd.file("checkpoints")).save(4, state(4), extra)
    earlier = start(tmp_path, ledger()).earlier_seconds
    assert 140.0 <= earlier < 150.0, (
        f"the checkpoint held the run's ~140 s (100 s earlier + 40 s of its invocation): {earlier}")


def test_a_fresh_run_and_an_old_checkpoint_have_no_earlier_seconds(tmp_path):
    assert start(tmp_path / "fresh", ledger()).earlier_seconds == 0.0, "a fresh run"
    Workdir(tmp_path / "old").pin_config(Config(), resuming=False)
    checkpoint(tmp_path / "old", 4, ledger(releases=4), logged_past=0)  # no figure, as before
    assert start(tmp_path / "old", ledger()).earlier_seconds == 0.0, "no figure: 0 s"


def test_resume_over_removed_records_with_other_noise_is_refused(tmp_path):
    # metrics.jsonl emptied by hand: the killed run's records after the checkpoint (step 5
    # and 6, at z 1.5) are gone with it, so the check on logged steps cannot see them; at
    # z 1.2 their replay would leave those releases in no ledger.
    Workdir(tmp_path).pin_config(Config(target_epsilon=5.0), resuming=False)
    _checkpoint_counting_records(tmp_path, 4, _noise(1.5, target=5.0))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="lost 4 record") as error:
        start(tmp_path, _noise(1.2), config=Config(target_epsilon=6.0))
    assert error.value.field == "workdir", error.value.field


def test_resume_over_removed_records_with_the_same_noise_goes_on_and_says_so(tmp_path):
    # The same mechanism replays the same releases: counted once, nothing is uncounted.
    Workdir(tmp_path).pin_config(Config(target_epsilon=5.0), resuming=False)
    _checkpoint_counting_records(tmp_path, 4, _noise(1.5, target=5.0))
    # Steps 1 and 2 removed; 5 and 6, logged after the checkpoint, do not make up for them.
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in (3, 4, 5, 6)))
    messages = []
    result = start(tmp_path, _noise(1.5), config=Config(target_epsilon=6.0), messages=messages)
    assert result.step == 4 and result.ledger.num_releases == 0, "resumed at the checkpoint"
    assert any("lost 2 record(s)" in m for m in messages), (
        f"the resume must say that records the checkpoint saw are gone: {messages}")


def test_one_removed_record_is_enough_to_refuse_other_noise(tmp_path):
    # Step 1's record removed, none logged after the checkpoint: only the count of records
    # can tell; a single lost record may hide a killed run's release as well as four.
    Workdir(tmp_path).pin_config(Config(target_epsilon=5.0), resuming=False)
    _checkpoint_counting_records(tmp_path, 4, _noise(1.5, target=5.0), logged_past=0)
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in (2, 3, 4)))
    with pytest.raises(ConfigError, match="lost 1 record") as error:
        start(tmp_path, _noise(1.2), config=Config(target_epsilon=6.0))
    assert error.value.field == "workdir", error.value.field


@pytest.mark.parametrize("before, after", [
    ([], []),  # every record, none logged after the checkpoint
    ([], [{"step": 4}]),  # one repeated by hand: more than the checkpoint saw, not "lost -1"
    # `Workdir.metrics_records` counts every line and `truncate_logs` keeps lines without
    # the key: one logged before the checkpoint is one the checkpoint saw
    ([{"note": "before step 1"}], []),
], ids=["all", "one_repeated", "one_without_the_key"])
def test_a_resume_with_no_record_missing_finds_none_lost(tmp_path, before, after):
    Workdir(tmp_path).pin_config(Config(target_epsilon=5.0), resuming=False)
    for record in before:
        Workdir(tmp_path).append_metrics(record)
    _checkpoint_counting_records(tmp_path, 4, _noise(1.5, target=5.0), logged_past=0)
    for record in after:
        Workdir(tmp_path).append_metrics(record)
    messages = []
    result = start(tmp_path, _noise(1.2), config=Config(target_epsilon=6.0), messages=messages)
    assert result.step == 4, "no record the checkpoint saw is missing: a new z may go on"
    assert not any("lost" in m for m in messages), f"nothing was lost: {messages}"


def test_releases_a_killed_replay_had_not_logged_again_still_bind_the_next_resume(tmp_path):
    # Run A logged steps 5-6 at z 1.5 past its checkpoint at 4. Run B resumed (truncating
    # them) and was killed before its replay logged them again. Run C must still replay
    # them at z 1.5: at z 1.2 it would release steps 5-6 twice, counted once.
    Workdir(tmp_path).pin_config(Config(target_epsilon=6.0), resuming=False)
    checkpoint(tmp_path, 4, _noise(1.5), logged_past=2)
    start(tmp_path, _noise(1.5), config=Config(target_epsilon=6.0))  # B, then killed
    assert [r["step"] for r in Workdir(tmp_path).read_metrics()] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="up to step 6") as error:
        start(tmp_path, _noise(1.2), config=Config(target_epsilon=6.0))
    assert error.value.field == "noise_multiplier", (
        f"steps 5-6 were released at z 1.5 and would be replayed at 1.2: {error.value}")
    with pytest.raises(ConfigError, match="up to step 6"):  # nor may C end before them
        start(tmp_path, _noise(1.5), config=Config(steps=5, target_epsilon=6.0))


def test_releases_not_logged_again_bind_only_until_a_replay_logs_past_them(tmp_path):
    Workdir(tmp_path).pin_config(Config(target_epsilon=10.0), resuming=False)
    checkpoint(tmp_path, 4, _noise(1.5, target=10.0), logged_past=2)
    start(tmp_path, _noise(1.5, target=10.0), config=Config(target_epsilon=10.0))
    wd = Workdir(tmp_path)
    for s in (5, 6, 7):  # the replay logs steps 5-7, then a checkpoint at 7
        wd.append_metrics({"step": s})
    Checkpointer(wd.file("checkpoints")).save(
        7, state(7), {"ledger": ledger(releases=7).to_json(with_pld=False)})
    result = start(tmp_path, _noise(1.2, target=10.0), config=Config(target_epsilon=10.0))
    assert result.step == 7, "every logged release is covered by the checkpoint of step 7"
    assert [r["step"] for r in wd.read_released()] == list(range(1, 8)), (
        "steps 5-6 were logged again: they must not be released twice in the record")


def test_logged_steps_are_replayed_with_the_noise_that_logged_them_not_the_checkpoints(
    tmp_path,
):
    # A finished at step 4 with z 1.5; B extended it at z 1.2 (a recalibration from step
    # 4), logged steps 5-6 (ledger.json: z 1.2) and was killed before a checkpoint. B's
    # own command must resume: it replays them with the z that made them.
    wd = Workdir(tmp_path)
    wd.pin_config(Config(target_epsilon=6.0), resuming=False)
    checkpoint(tmp_path, 4, _noise(1.5, target=5.0), logged_past=2)
    b = _noise(1.2)
    b.record(EVENT, 6)
    wd.write_json("ledger.json", b.to_json(with_pld=False))
    result = start(tmp_path, _noise(1.2), config=Config(target_epsilon=6.0))
    assert result.step == 4, "B's command replays steps 5-6 with their own z"
    with pytest.raises(ConfigError, match="noise_multiplier=1.2"):  # A's z would not
        start(Workdir(tmp_path).path, _noise(1.5), config=Config(target_epsilon=6.0))


def test_resume_without_config_json_is_refused(tmp_path):
    # A copied checkpoints/ (or a deleted config.json) would continue under any flags.
    checkpoint(tmp_path, 4, ledger(releases=4), logged_past=0)
    with pytest.raises(ConfigError, match="config.json is missing") as error:
        start(tmp_path, ledger(), config=Config(lr=0.5))
    assert error.value.field == "workdir", error.value.field


@pytest.mark.parametrize("name, value", [("delta", 1e-7), ("unit", "user")])
def test_resume_with_a_ledger_of_other_accounting_terms_is_refused(tmp_path, name, value):
    Workdir(tmp_path).pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 4, ledger(releases=4), logged_past=0)
    with pytest.raises(ConfigError, match=f"has {name}"):
        start(tmp_path, dataclasses.replace(ledger(), **{name: value}))


def test_a_run_accounted_outside_its_ledger_may_not_end_before_logged_steps(tmp_path):
    # DPD-fVAE's local DP keeps a ledger per client (`ledger` None here): its logged
    # rounds 5-6 are releases too, which a run ending at 5 would leave uncounted.
    wd = Workdir(tmp_path)
    wd.pin_config(Config(), resuming=False)
    checkpoint(tmp_path, 4, None, logged_past=2)
    with pytest.raises(ConfigError, match="up to step 6"):
        resume_or_start(
            Checkpointer(wd.file("checkpoints")), wd, state(0), None,
            step_of=lambda s: int(s["step"]), total=5, config=Config(steps=5),
            log=lambda _: None, private=True)
    result = resume_or_start(  # a non-private run may: no ledger under-counts
        Checkpointer(wd.file("checkpoints")), wd, state(0), None,
        step_of=lambda s: int(s["step"]), total=5, config=Config(steps=5), log=lambda _: None)
    assert (result.step, result.last) == (4, 5), result
