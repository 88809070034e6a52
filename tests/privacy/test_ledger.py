"""Tests of the privacy ledger: composition, JSON round-trip, budget guard."""

import json

import pytest
from dp_accounting import dp_event, pld, rdp

from dpfed.privacy import BudgetExceededError, PrivacyLedger, accounting
from dpfed.privacy.ledger import event_from_json, event_to_json

STEP = dp_event.PoissonSampledDpEvent(0.016, dp_event.GaussianDpEvent(1.1))


def _ledger(**kw):
    return PrivacyLedger(unit="example", neighboring_relation="add_or_remove_one", delta=1e-5, **kw)


def test_ledger_eps_equals_direct_dp_accounting():
    ledger = _ledger()
    for _ in range(30):
        ledger.record(STEP)
    other = dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(2.0))
    ledger.record(other, count=7)
    direct = dp_event.ComposedDpEvent(
        [dp_event.SelfComposedDpEvent(STEP, 30), dp_event.SelfComposedDpEvent(other, 7)]
    )
    a = rdp.RdpAccountant()
    a.compose(direct)
    # PLD on the grid of accounting.pld_interval (1e-4 of the RDP eps, at least 1e-4)
    b = pld.PLDAccountant(value_discretization_interval=accounting.pld_interval(
        a.get_epsilon(1e-5)))
    b.compose(direct)
    assert ledger.epsilon("rdp") == pytest.approx(a.get_epsilon(1e-5), rel=1e-9)
    assert ledger.epsilon("pld") == pytest.approx(b.get_epsilon(1e-5), rel=1e-9)


def test_identical_consecutive_events_are_merged():
    ledger = _ledger()
    ledger.record(STEP)
    ledger.record(STEP, count=4)
    assert ledger.entries == [(STEP, 5)], "5 identical releases should be stored once, count 5"
    assert ledger.num_releases == 5


def test_first_keeps_the_first_releases_in_order():
    other = dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(2.0))
    ledger = _ledger(target_epsilon=3.0, metadata={"z": 1.1})
    ledger.record(STEP, count=3)
    ledger.record(other, count=2)
    assert ledger.first(4).entries == [(STEP, 3), (other, 1)], "4 = all 3 of STEP, 1 of other"
    assert ledger.first(2).entries == [(STEP, 2)], "2 releases lie within the first entry"
    assert ledger.first(0).entries == [], "no release: an empty ledger"
    assert ledger.first(5).epsilon() == ledger.epsilon(), "all releases: the same eps"
    assert ledger.first(2).metadata == {"z": 1.1} and ledger.first(2).target_epsilon == 3.0
    assert ledger.num_releases == 5, "first() must not change the ledger it copies"


@pytest.mark.parametrize("releases", [-1, 6])
def test_first_refuses_more_releases_than_recorded(releases):
    ledger = _ledger()
    ledger.record(STEP, count=5)
    with pytest.raises(ValueError, match="releases"):
        ledger.first(releases)


@pytest.mark.parametrize(
    "event",
    [
        dp_event.GaussianDpEvent(1.5),
        STEP,
        dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(0.5)),
        dp_event.SelfComposedDpEvent(STEP, 3),
        dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(1.0), dp_event.GaussianDpEvent(2.0)]),
        dp_event.PoissonSampledDpEvent(
            0.1,
            dp_event.ComposedDpEvent(
                [dp_event.GaussianDpEvent(1.2), dp_event.GaussianDpEvent(3.0)]
            ),
        ),
        dp_event.NoOpDpEvent(),
    ],
)
def test_event_json_round_trip(event):
    data = json.loads(json.dumps(event_to_json(event)))
    assert event_from_json(data) == event, f"{event} did not survive a JSON round-trip"


def test_ledger_json_round_trip_keeps_eps_and_fields():
    ledger = _ledger(target_epsilon=3.0, metadata={"batch_size": 64})
    ledger.record(STEP, count=100)
    ledger.record(dp_event.GaussianDpEvent(5.0))
    data = json.loads(json.dumps(ledger.to_json()))
    for key in ("epsilon_rdp", "epsilon_pld", "delta", "unit", "neighboring_relation", "events"):
        assert key in data, f"ledger.json must have key {key}"
    back = PrivacyLedger.from_json(data)
    assert back.entries == ledger.entries
    assert back.epsilon() == pytest.approx(data["epsilon_rdp"], rel=1e-12)
    assert (back.unit, back.delta, back.target_epsilon) == ("example", 1e-5, 3.0)


def test_fixed_size_ledger_reports_no_pld():
    ledger = PrivacyLedger(unit="example", neighboring_relation="replace_one", delta=1e-5)
    ledger.record(
        accounting.dpsgd_event(1.0, 10, sampling="fixed", population=100, expected_size=10)
    )
    data = ledger.to_json()
    assert data["epsilon_pld"] is None and data["pld_note"], "PLD must say it is unsupported"
    assert data["epsilon_rdp"] > 0


def test_ledger_refuses_events_it_cannot_account():
    ledger = _ledger()
    swor = dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(0.5))
    with pytest.raises(ValueError, match="not supported"):
        ledger.record(swor)  # sampling without replacement needs replace-one


def test_budget_check_refuses_events_it_cannot_account():
    # epsilon_with returned None for such an event, and check_budget compared it with the
    # target (TypeError) instead of refusing it as `record` does.
    ledger = _ledger(target_epsilon=1.0)
    swor = dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(0.5))
    with pytest.raises(ValueError, match="not supported"):
        ledger.check_budget(swor)


def test_budget_guard_stops_before_exceeding():
    ledger = _ledger(target_epsilon=1.0)
    n = ledger.affordable_count(STEP, 100000)
    assert ledger.epsilon_with(STEP, n) <= 1.0 < ledger.epsilon_with(STEP, n + 1), (
        "affordable_count must be the largest count within the budget"
    )
    ledger.record(STEP, n)
    with pytest.raises(BudgetExceededError):
        ledger.check_budget(STEP)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"unit": "row"}, "unit"),
        ({"neighboring_relation": "swap"}, "neighboring_relation"),
        ({"delta": 1.0}, "delta"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
    ],
)
def test_ledger_validates_fields(kwargs, match):
    base = {"unit": "example", "neighboring_relation": "add_or_remove_one", "delta": 1e-5}
    with pytest.raises(ValueError, match=match):
        PrivacyLedger(**{**base, **kwargs})


NAN_GAUSSIAN = dp_event.GaussianDpEvent(float("nan"))


@pytest.mark.parametrize("event", [
    NAN_GAUSSIAN,
    dp_event.PoissonSampledDpEvent(0.01, NAN_GAUSSIAN),
    dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(1.0), NAN_GAUSSIAN]),
])
def test_an_event_with_a_nan_is_refused_not_counted_as_eps_0(event):
    # dp_accounting's RDP accountant gives eps 0 for a composition holding a NaN
    # multiplier, every other event included (found by an API audit).
    ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5, target_epsilon=1.0)
    with pytest.raises(ValueError, match="NaN"):
        ledger.record(event, 1000)
    assert not ledger.entries, "a refused event must not be recorded"


@pytest.mark.parametrize("count", [0, -5, 2.5, True])
def test_a_count_that_is_not_a_whole_number_from_1_is_refused(count):
    ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5)
    with pytest.raises(ValueError, match="count"):
        ledger.record(dp_event.GaussianDpEvent(1.0), count)


@pytest.mark.parametrize("bad", [
    event_to_json(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(1.0), -5)),
    event_to_json(NAN_GAUSSIAN),
])
def test_a_ledger_json_with_a_bad_event_is_refused_like_a_live_release(bad):
    data = PrivacyLedger("example", "add_or_remove_one", 1e-5).to_json()
    data["events"] = [event_to_json(dp_event.GaussianDpEvent(1.0)), bad]
    with pytest.raises(ValueError):
        PrivacyLedger.from_json(data)


@pytest.mark.parametrize("recorded", [1, 2, 7])
def test_epsilon_with_equals_the_eps_after_recording_to_the_last_bit(recorded):
    # Recording merges k + n repetitions into one entry; composing k and n apart rounds
    # differently (here 3.9509477535106377 against 3.950947753510638 at k 1, n 144).
    event = dp_event.PoissonSampledDpEvent(0.0512, dp_event.GaussianDpEvent(1.1))
    for more in (1, 100, 144, 1000):
        ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5)
        ledger.record(event, recorded)
        predicted = ledger.epsilon_with(event, more)
        ledger.record(event, more)
        assert predicted == ledger.epsilon(), (
            f"{recorded} + {more}: predicted {predicted!r}, recorded {ledger.epsilon()!r}")


def test_affordable_releases_never_take_the_recorded_eps_above_the_target():
    event = dp_event.PoissonSampledDpEvent(0.0512, dp_event.GaussianDpEvent(1.1))
    ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5)
    ledger.record(event)  # a resumed checkpoint's step
    ledger.target_epsilon = ledger.epsilon_with(event, 144)
    ledger.record(event, ledger.affordable_count(event, 144))
    assert ledger.epsilon() <= ledger.target_epsilon, (
        f"recorded eps {ledger.epsilon()!r} > target {ledger.target_epsilon!r}")


def test_with_recorded_leaves_the_ledger_as_it_was():
    ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5, metadata={"n": 1})
    ledger.record(STEP)
    after = ledger.with_recorded(STEP, 3)
    after.metadata["n"] = 2
    assert ledger.num_releases == 1 and after.num_releases == 4, "the copy must record"
    assert ledger.metadata == {"n": 1}, "the copy's metadata must be its own"
    assert ledger.with_recorded(STEP, 0).entries == ledger.entries, "0 more records nothing"


def test_affordable_count_refuses_a_negative_maximum():
    ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5, target_epsilon=1.0)
    with pytest.raises(ValueError, match="max_count"):
        ledger.affordable_count(dp_event.GaussianDpEvent(1.0), -3)


def test_a_spent_ledger_affords_zero_more_of_zero_asked():
    # A rerun of a finished run with a target asks for 0 more steps; since 4e54de7 the
    # hypothetical 0-fold event was refused as a count < 1 (found by a docs audit).
    ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5, target_epsilon=10.0)
    ledger.record(dp_event.GaussianDpEvent(1.0), 3)
    assert ledger.affordable_count(dp_event.GaussianDpEvent(1.0), 0) == 0
    assert ledger.epsilon_with(dp_event.GaussianDpEvent(1.0), 0) == ledger.epsilon(), (
        "0 more releases leave eps as it is")


def test_a_checkpoint_copy_says_its_pld_eps_was_not_computed():
    ledger = PrivacyLedger("example", "add_or_remove_one", 1e-5)
    ledger.record(dp_event.GaussianDpEvent(1.0))
    note = ledger.to_json(with_pld=False)["pld_note"]
    assert "not computed" in note, f"PLD supports these events; the note must not say not: {note}"


@pytest.mark.parametrize("field", ["source_dataset_size", "sample_size"])
def test_a_ledger_json_with_a_fractional_cohort_or_population_is_refused(field):
    # dp_accounting's RDP accountant takes a fractional size under replace-one and returns
    # an eps for a mechanism that cannot exist; a tampered ledger.json must not pass.
    ledger = PrivacyLedger("example", "replace_one", 1e-5)
    ledger.record(dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(1.0)))
    data = json.loads(json.dumps(ledger.to_json()))
    data["events"][0][field] += 0.5
    with pytest.raises(ValueError, match="whole numbers"):
        PrivacyLedger.from_json(data)


@pytest.mark.parametrize("name", ["NoSuchDpEvent", "Mapping", "attr"])
def test_a_ledger_json_naming_no_dp_event_type_is_refused(name):
    # Only DpEvent classes of dp_event may be built from a stored ledger: a name that is
    # not one (or not there) must fail with a message naming it.
    with pytest.raises(ValueError, match=f"unknown DpEvent type '{name}'"):
        event_from_json({"type": name})
