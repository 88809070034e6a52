"""Tests of DpEvent builders, eps computation and noise calibration against dp_accounting."""

import logging

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event, pld, rdp

from dpfed.privacy import accounting
from tests import delta_warning

NeighboringRelation = dp_accounting.NeighboringRelation


def _direct(event, delta, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    a = rdp.RdpAccountant(neighboring_relation=relation)
    a.compose(event)
    return a.get_epsilon(delta)


def _direct_pld(event, delta):
    a = pld.PLDAccountant()
    a.compose(event)
    return a.get_epsilon(delta)


def test_poisson_dpsgd_event_matches_dp_accounting():
    event = accounting.dpsgd_event(1.1, 50, sampling="poisson", population=4000, expected_size=64)
    direct = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(64 / 4000, dp_event.GaussianDpEvent(1.1)), 50
    )
    eps = accounting.epsilon(event, 1e-5)
    assert eps == pytest.approx(_direct(direct, 1e-5), rel=1e-9)
    assert eps == pytest.approx(1.114, abs=2e-3), "the issue's reference value is about 1.114"


def test_fixed_size_sampling_halves_multiplier_for_replace_one():
    """Replace-one doubles a clipped sum's sensitivity: std zC is Gaussian(z/2) there."""
    event = accounting.dpsgd_event(1.1, 50, sampling="fixed", population=4000, expected_size=64)
    inner = event.event
    assert isinstance(inner, dp_event.SampledWithoutReplacementDpEvent)
    assert inner.event == dp_event.GaussianDpEvent(0.55), "multiplier must be z/2 under replace-one"
    relation = accounting.relation_for("fixed")
    naive = dp_event.SelfComposedDpEvent(
        dp_event.SampledWithoutReplacementDpEvent(4000, 64, dp_event.GaussianDpEvent(1.1)), 50
    )
    assert accounting.epsilon(event, 1e-5, relation) > _direct(naive, 1e-5, relation), (
        "the correct replace-one eps must exceed the naive (under-counted) one"
    )


def test_pld_is_reported_and_smaller_for_poisson():
    event = accounting.dpsgd_event(1.1, 10000, sampling="poisson", population=100, expected_size=1)
    eps_rdp = accounting.epsilon(event, 1e-5, accountant="rdp")
    eps_pld = accounting.epsilon(event, 1e-5, accountant="pld")
    a = pld.PLDAccountant(value_discretization_interval=accounting.pld_interval(eps_rdp))
    a.compose(event)
    assert eps_pld == pytest.approx(a.get_epsilon(1e-5), rel=1e-9)
    assert eps_rdp == pytest.approx(5.632, abs=2e-3) and eps_pld == pytest.approx(5.193, abs=2e-3)


def test_pld_unsupported_returns_none():
    event = accounting.dpsgd_event(1.0, 5, sampling="fixed", population=100, expected_size=10)
    assert accounting.epsilon(event, 1e-5, accounting.relation_for("fixed"), "pld") is None


def _adaptive_round(z_count: float, count_weight: float = 1.0) -> dp_event.DpEvent:
    """One adaptive-clipping round: the sum and the count query on one Poisson sample."""
    z_sum = (1.0 - z_count**-2) ** -0.5  # together exactly one Gaussian of multiplier 1
    return dp_event.PoissonSampledDpEvent(
        0.1,
        dp_event.ComposedDpEvent([
            dp_event.GaussianDpEvent(z_sum), dp_event.GaussianDpEvent(z_count / count_weight)
        ]),
    )


def test_pld_accounts_gaussians_composed_on_one_sample():
    """Adaptive clipping's two queries on one sample cost one Gaussian: PLD must say so."""
    event = dp_event.SelfComposedDpEvent(_adaptive_round(z_count=10.0), 20)
    single = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 20
    )
    eps_pld = accounting.epsilon(event, 1e-5, accountant="pld")
    assert eps_pld is not None, "PLD must account a Poisson-sampled composition of Gaussians"
    assert eps_pld == pytest.approx(_direct_pld(single, 1e-5), rel=1e-6), (
        "the sum and count queries together must cost exactly one Gaussian of multiplier 1"
    )
    assert accounting.epsilon(event, 1e-5) == pytest.approx(_direct(single, 1e-5), rel=1e-9), (
        "the RDP accountant already composes the pair as one Gaussian; the merge must agree"
    )


def test_merged_pair_is_weaker_than_either_query_alone():
    """A louder count query (a smaller multiplier) must raise the PLD eps of the pair."""
    quiet = dp_event.SelfComposedDpEvent(_adaptive_round(z_count=10.0), 20)
    loud = dp_event.SelfComposedDpEvent(_adaptive_round(z_count=10.0, count_weight=5.0), 20)
    assert accounting.epsilon(loud, 1e-5, accountant="pld") > accounting.epsilon(
        quiet, 1e-5, accountant="pld"
    ), "the merged multiplier must include the count query's multiplier"


def test_pld_reads_a_gaussian_multiplier_under_the_relation_in_use():
    """Multiplier = std / sensitivity under the relation: the relation must not change eps.

    dp_accounting's PLD accountant alone doubles a Gaussian's sensitivity under replace-one;
    without the correction, replace-one ledgers (DataLens's balanced partitions) over-report.
    """
    event = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(5.0), 10)
    relations = (NeighboringRelation.ADD_OR_REMOVE_ONE, NeighboringRelation.REPLACE_ONE)
    pld_eps = [accounting.epsilon(event, 1e-5, r, "pld") for r in relations]
    rdp_eps = [accounting.epsilon(event, 1e-5, r, "rdp") for r in relations]
    assert pld_eps[1] == pytest.approx(pld_eps[0], rel=1e-9), (
        f"PLD eps under replace-one {pld_eps[1]} must equal add/remove's {pld_eps[0]}")
    assert rdp_eps[1] == pytest.approx(rdp_eps[0], rel=1e-12)
    assert pld_eps[0] < rdp_eps[0], "PLD must stay the tighter of the two for a Gaussian"


def test_merge_gaussians_keeps_a_noiseless_release_noiseless():
    merged = accounting.merge_gaussians(
        dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(2.0), dp_event.GaussianDpEvent(0.0)])
    )
    assert merged == dp_event.GaussianDpEvent(0.0), "a noiseless query makes the pair noiseless"


@pytest.mark.parametrize("target", [1.0, 10.0])
def test_calibration_meets_target_from_below(target):
    def make(z):
        return accounting.dpsgd_event(
            z, 300, sampling="poisson", population=4000, expected_size=256
        )

    z = accounting.calibrate_noise_multiplier(make, target, 1e-5)
    eps = accounting.epsilon(make(z), 1e-5)
    assert 0.97 * target <= eps <= target, f"calibrated eps {eps} not just below target {target}"


def test_calibration_rejects_unreachable_target():
    def make(z):
        return dp_event.GaussianDpEvent(z)  # no subsampling: tiny eps needs huge noise

    with pytest.raises(accounting.CalibrationError, match="out of reach"):
        accounting.calibrate_noise_multiplier(make, 1e-6, 1e-5, max_noise_multiplier=10.0)


@pytest.mark.parametrize("target", [float("inf"), float("nan")])
def test_calibration_refuses_a_target_that_is_not_finite(target):
    # Both reached scipy's root finder and failed with its own errors (found by an audit).
    with pytest.raises(accounting.CalibrationError, match="finite"):
        accounting.calibrate_noise_multiplier(dp_event.GaussianDpEvent, target, 1e-5)


def test_calibration_names_an_event_the_accountant_cannot_account():
    # Sampling without replacement needs replace-one; under the default add/remove-one
    # the accountant returns no eps, which was compared with the target (TypeError).
    def make(z):
        return accounting.dpsgd_event(z, 10, sampling="fixed", population=100, expected_size=10)

    with pytest.raises(ValueError, match="not supported"):
        accounting.calibrate_noise_multiplier(make, 1.0, 1e-5)


def test_sampled_event_rejects_bad_sizes():
    with pytest.raises(ValueError, match="expected_size"):
        accounting.sampled_gaussian_event(
            dp_event.GaussianDpEvent(1.0), sampling="poisson", population=10, expected_size=20
        )


def test_excluded_order_warnings_are_filtered_but_eps_is_unchanged(caplog):
    """dp_accounting's 'failed to converge ... Excluding this order' lines are dropped."""
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.074627, dp_event.GaussianDpEvent(0.5)), 50
    )
    with caplog.at_level(logging.WARNING, logger="absl"):
        eps = accounting.epsilon(event, 1e-5)
    assert not [r for r in caplog.records if "failed to converge" in str(r.msg)], (
        "the excluded-order warning should be filtered out"
    )
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    assert eps == pytest.approx(accountant.get_epsilon(1e-5)), "filtering must not change eps"


@pytest.mark.parametrize("delta", [float("nan"), 0.0, 1.0, 2.0, -1.0])
def test_epsilon_refuses_a_delta_outside_0_1(delta):
    # A NaN or >= 1 delta gave eps 0.0 (found by an API audit).
    event = dp_event.GaussianDpEvent(1.0)
    for name in ("rdp", "pld"):
        with pytest.raises(ValueError, match="delta"):
            accounting.epsilon(event, delta, accountant=name)


@pytest.mark.parametrize("sampling, population", [
    ("poisson", float("inf")), ("poisson", 100.5), ("fixed", 100.5), ("fixed", float("inf")),
])
def test_a_population_that_is_not_a_whole_finite_number_is_refused(sampling, population):
    # An infinite population gave q = 0, hence eps 0 (found by an API audit).
    with pytest.raises(ValueError, match="population"):
        accounting.sampled_gaussian_event(
            dp_event.GaussianDpEvent(1.0), sampling=sampling, population=population,
            expected_size=10)


@pytest.mark.parametrize("value, whole", [
    (3, True), (3.0, True), (np.int64(3), True), (np.float32(3.0), True), (np.int32(0), True),
    (3.5, False), (np.float64(3.5), False), (float("nan"), False), (np.float32("inf"), False),
    (True, False), ("3", False), (None, False),
])
def test_whole_numbers_are_told_by_value_whatever_their_type(value, whole):
    # Populations and counts come as Python or numpy numbers (a cohort size read from an
    # array): numpy's ints have no __trunc__, so a math.trunc there would raise.
    assert accounting.is_whole_number(value) is whole, (
        f"is_whole_number({value!r}) of type {type(value).__name__} must be {whole}")


def test_a_clip_norm_that_is_not_finite_is_refused():
    for clip in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="C"):
            accounting.gaussian_sigma_for_sum(1.0, clip)


def test_fixed_size_sampling_refuses_a_size_that_is_not_whole():
    # int(2.5) would record a cohort of 2 where the caller meant another mechanism.
    with pytest.raises(ValueError, match="integer size"):
        accounting.sampled_gaussian_event(
            dp_event.GaussianDpEvent(1.0), sampling="fixed", population=10, expected_size=2.5)


@pytest.mark.parametrize(
    "rdp_eps, spacing",
    [(None, 1e-4), (float("inf"), 1e-4), (0.5, 1e-4), (100.0, 1e-4), (2763.0, 2.763e-3)],
)
def test_the_pld_grid_is_1e_4_up_to_eps_100_and_coarser_in_proportion_beyond(rdp_eps, spacing):
    # At dp_accounting's fixed 1e-4, two DP-SGD steps at z = 0.02 (RDP eps 2,763) needed
    # more than 34 GiB: the grid spans the privacy loss's range, which grows with eps.
    assert accounting.pld_interval(rdp_eps) == pytest.approx(spacing, rel=1e-12), (
        f"RDP eps {rdp_eps}: the PLD grid's spacing must be {spacing}")


def test_the_pld_eps_on_the_coarser_grid_stays_above_the_default_grids_and_close(monkeypatch):
    # The pessimistic discretisation rounds losses up at any spacing: an upper bound still.
    # (A coarser grid from eps 1, so that the 1e-4 grid's eps is quick to compare with.)
    monkeypatch.setattr(accounting, "PLD_FINE_UP_TO_EPS", 1.0)
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(0.5)), 10)
    assert accounting.pld_interval(accounting.epsilon(event, 1e-5)) > 1e-3, "a coarser grid"
    eps = accounting.epsilon(event, 1e-5, accountant="pld")
    fine = _direct_pld(event, 1e-5)
    assert fine <= eps <= fine * (1 + 1e-4), f"PLD eps {eps} on the coarser grid, {fine} on 1e-4"


def test_pld_of_an_event_it_cannot_account_computes_no_rdp_eps(monkeypatch):
    # The grid's RDP eps (~0.6 s for sampling without replacement) is wasted on a None.
    made = []
    real = rdp.RdpAccountant
    monkeypatch.setattr(rdp, "RdpAccountant", lambda *a, **k: made.append(1) or real(*a, **k))
    event = accounting.dpsgd_event(1.0, 10, sampling="fixed", population=100, expected_size=5)
    assert accounting.epsilon(event, 1e-5, accounting.relation_for("fixed"), "pld") is None
    assert not made, "an RDP eps was computed for a PLD eps that is None"


def test_an_unknown_accountant_is_refused_by_name():
    with pytest.raises(ValueError, match="'rdp' or 'pld'"):
        accounting.epsilon(dp_event.GaussianDpEvent(1.0), 1e-5, accountant="prv")


def test_calibration_refuses_a_z_the_solver_returns_above_the_target(monkeypatch):
    # The last check of calibrate_noise_multiplier: a solver answer with too little noise
    # (here half the safe z) must raise, never be returned as calibrated.
    calibrate = dp_accounting.calibrate_dp_mechanism
    monkeypatch.setattr(
        dp_accounting, "calibrate_dp_mechanism", lambda *a, **k: 0.5 * calibrate(*a, **k))
    with pytest.raises(accounting.CalibrationError, match="above the target"):
        accounting.calibrate_noise_multiplier(dp_event.GaussianDpEvent, 1.0, 1e-5)


def test_calibration_refuses_a_z_the_solver_returns_a_hair_above_the_target(monkeypatch):
    # The check above has no tolerance: 0.1% too little noise is refused as half is.
    low = 0.999 * accounting.calibrate_noise_multiplier(dp_event.GaussianDpEvent, 1.0, 1e-5)
    assert 1.0 < accounting.rdp_epsilon(dp_event.GaussianDpEvent(low), 1e-5) < 1.01, (
        "the test needs a z whose eps is just above the target")
    monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism", lambda *a, **k: low)
    with pytest.raises(accounting.CalibrationError, match="above the target"):
        accounting.calibrate_noise_multiplier(dp_event.GaussianDpEvent, 1.0, 1e-5)


@pytest.mark.parametrize("delta, warns", [(1 / 1438, True), (0.5, True), (0.99 / 1438, False)])
def test_a_delta_of_at_least_one_over_the_population_is_warned_about(caplog, delta, warns):
    # delta >= 1/N admits a mechanism that releases one of the N units in the clear.
    with caplog.at_level(logging.WARNING):
        warned = accounting.warn_if_delta_too_large(delta, 1438, "example")
    warnings = delta_warning.warnings_logged(caplog)
    expected = [delta_warning.expected_warning(delta, 1438, "example")]
    assert (warned, warnings) == ((True, expected) if warns else (False, [])), (
        f"delta={delta} with N=1438: {'one warning' if warns else 'no warning'} expected, "
        f"got {warnings}")


@pytest.mark.parametrize(
    "value,digits,text",
    [
        (4.22434, 4, "4.225"),  # like the acceptance run's eps 4.22429; to nearest "4.224"
        (4.22434, 3, "4.23"),
        (10.00049, 4, "10.01"),  # a target of 10 missed must not read as met
        (34.2, 3, "34.2"),  # already at its digits: unchanged
        (9.99961, 4, "10"),
        (1e-5, 3, "1e-05"),
        (123456.7, 3, "1.24e+05"),
        (0.0, 4, "0"),
        (float("inf"), 4, "inf"),
    ],
)
def test_format_upper_rounds_up_to_its_digits(value, digits, text):
    got = accounting.format_upper(value, digits)
    assert got == text, f"{value!r} at {digits} digits: {got!r}, expected {text!r}"
    assert float(got) >= value, f"{got!r} reads below {value!r}"


@pytest.mark.parametrize("value", [None, float("nan")])
def test_format_upper_gives_the_missing_text_for_no_value(value):
    assert accounting.format_upper(value, missing="—") == "—"


def test_format_upper_never_reads_below_its_value():
    rng = np.random.default_rng(0)
    for value in rng.lognormal(0.0, 4.0, 2000):
        for digits in (3, 4):
            text = accounting.format_upper(float(value), digits)
            assert float(text) >= value, f"{value!r} reads {text!r}"
            assert float(text) <= value * (1 + 10.0 ** (1 - digits)), f"{value!r} -> {text!r}"


def test_format_upper_can_leave_a_missing_value_out():
    assert accounting.format_upper(None, 3, None) is None, "a progress field must be left out"


_MIXED = dp_event.ComposedDpEvent([
    dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 40),
    dp_event.PoissonSampledDpEvent(0.01, dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(1.3), dp_event.GaussianDpEvent(9.0)])),
    dp_event.SelfComposedDpEvent(dp_event.ComposedDpEvent([
        dp_event.GaussianDpEvent(30.0),
        dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(50.0), 2)]), 3),
    dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 7),
])


@pytest.mark.parametrize("event", [
    _MIXED,
    dp_event.ComposedDpEvent([_MIXED, dp_event.NonPrivateDpEvent()]),
    dp_event.ComposedDpEvent([]),
])
def test_rdp_eps_is_dp_accountings_to_the_bit(event):
    # eps sums each event's RDP curve, computed once (`accounting._RDP_OF`), as the
    # accountant sums them: the same eps exactly, also after the curves are remembered.
    direct = _direct(event, 1e-5)
    assert accounting.epsilon(event, 1e-5) == direct, "computing the curves"
    assert accounting.epsilon(event, 1e-5) == direct, "with the remembered curves"


def test_rdp_eps_of_replace_one_events_is_dp_accountings_to_the_bit():
    event = dp_event.ComposedDpEvent([
        accounting.dpsgd_event(1.0, 30, sampling="fixed", population=500, expected_size=20),
        dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(4.0), 5)])
    relation = NeighboringRelation.REPLACE_ONE
    for _ in range(2):
        assert accounting.epsilon(event, 1e-6, relation) == _direct(event, 1e-6, relation)


def test_an_event_the_rdp_accountant_cannot_account_gives_none_every_time():
    event = accounting.dpsgd_event(1.0, 10, sampling="fixed", population=100, expected_size=5)
    for _ in range(2):  # add/remove-one: sampling without replacement is not supported
        assert accounting.epsilon(event, 1e-5) is None, "unsupported: no eps"


def test_an_rdp_curve_remembered_under_one_relation_does_not_answer_for_another():
    # Sampling without replacement has an RDP curve under replace-one only: remembered
    # there, it must not give an eps under add/remove-one, where the accountant has none.
    event = accounting.dpsgd_event(1.0, 10, sampling="fixed", population=101, expected_size=5)
    relation = NeighboringRelation.REPLACE_ONE
    assert accounting.epsilon(event, 1e-5, relation) == _direct(event, 1e-5, relation)
    assert accounting.epsilon(event, 1e-5) is None, (
        "the replace-one curve answered for add/remove-one: the memo must key on the relation")


def test_each_events_rdp_curve_is_computed_once(monkeypatch):
    # A ledger asks for eps at each evaluation, ledger.json and checkpoint with one more
    # round each time: the sampled Gaussian's curve (~0.5 s) must not be computed again.
    monkeypatch.setattr(accounting, "_RDP_OF", accounting._Memo(16))  # none remembered
    calls = []
    real = rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian
    monkeypatch.setattr(
        rdp.rdp_privacy_accountant, "_compute_rdp_poisson_subsampled_gaussian",
        lambda *a, **k: calls.append(1) or real(*a, **k))
    step = dp_event.PoissonSampledDpEvent(0.0123, dp_event.GaussianDpEvent(0.987))
    eps = [accounting.epsilon(dp_event.SelfComposedDpEvent(step, n), 1e-5) for n in (5, 6, 50)]
    assert len(calls) == 1, f"the curve of one event was computed {len(calls)} times"
    assert eps == sorted(eps) and eps[0] < eps[2], f"more rounds, more eps: {eps}"
    assert eps[1] == _direct(dp_event.SelfComposedDpEvent(step, 6), 1e-5)


def test_a_pld_eps_is_computed_once_per_composition(monkeypatch):
    monkeypatch.setattr(accounting, "_PLD_EPS_OF", accounting._Memo(16))  # none remembered
    composed = []
    real = pld.PLDAccountant.compose
    monkeypatch.setattr(pld.PLDAccountant, "compose",
                        lambda self, *a, **k: composed.append(1) or real(self, *a, **k))
    step = dp_event.PoissonSampledDpEvent(0.0234, dp_event.GaussianDpEvent(1.234))
    first = accounting.epsilon(dp_event.SelfComposedDpEvent(step, 4), 1e-5, accountant="pld")
    again = accounting.epsilon(dp_event.SelfComposedDpEvent(step, 4), 1e-5, accountant="pld")
    more = accounting.epsilon(dp_event.SelfComposedDpEvent(step, 5), 1e-5, accountant="pld")
    assert first == again < more, (first, again, more)
    assert len(composed) == 2, f"two compositions composed {len(composed)} times"
    assert again == _direct_pld(dp_event.SelfComposedDpEvent(step, 4), 1e-5)


def test_a_pld_eps_is_remembered_per_delta():
    # A ledger reports eps at its own delta; a PLD eps remembered without it would answer
    # every later delta with the first one's eps (every other test asks at 1e-5).
    event = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(3.0), 2)
    loose = accounting.epsilon(event, 1e-5, accountant="pld")
    tight = accounting.epsilon(event, 1e-7, accountant="pld")
    assert tight == _direct_pld(event, 1e-7) > loose, (
        f"PLD eps at delta 1e-7 ({tight}) must be dp_accounting's, above delta 1e-5's ({loose})")


def test_the_memo_forgets_its_oldest_entries_beyond_its_size():
    memo = accounting._Memo(2)
    for key in "abc":
        memo[key] = key
    assert list(memo) == ["b", "c"], f"kept {list(memo)}"
