"""dpfed.privacy.audit: canary directions, their insertion into a clipped sum, the scores
of a model's change, and the eps estimate and lower bound from them."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_privacy import auditing
from scipy import stats

from dpfed.privacy import audit, fdp_audit
from tests.privacy.canaries import dense

DELTA = 1e-5


def _zeros(dim):
    return jnp.zeros((dim,), jnp.float32)


def test_a_direction_is_unit_with_one_coordinate_in_each_block():
    dim, support = 10_000, 100
    canaries = audit.draw(jax.random.key(0), _zeros(dim), 50, support=support)
    norms = np.linalg.norm(dense(canaries, dim), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6, err_msg="a canary direction is not unit")
    blocks = np.asarray(canaries.coords) // (dim // support)
    assert (blocks == np.arange(support)).all(), "coordinate j of a direction is not in block j"


def test_a_model_smaller_than_the_support_gets_dense_sign_directions():
    canaries = audit.draw(jax.random.key(1), {"w": jnp.zeros((5, 6))}, 4, support=1024)
    assert canaries.coords.shape == (4, 30), "a 30-parameter model: all 30 coordinates"
    np.testing.assert_allclose(np.abs(np.asarray(canaries.values)), 30**-0.5, rtol=1e-6)


def test_a_direction_of_several_rows_has_the_support_and_equal_norm_in_each_row():
    rows, width, support = 4, 500, 20
    canaries = audit.draw(jax.random.key(7), _zeros(rows * width), 30, support=support,
                          rows=rows)
    by_row = dense(canaries, rows * width).reshape(30, rows, width)
    assert (np.count_nonzero(by_row, axis=2) == support).all(), "support coordinates a row"
    np.testing.assert_allclose(np.linalg.norm(by_row, axis=2), rows**-0.5, rtol=1e-6,
                               err_msg="each row of a unit direction must have norm 1/sqrt(rows)")
    with pytest.raises(ValueError, match="rows"):
        audit.draw(jax.random.key(7), _zeros(10), 3, rows=4)


def test_one_row_is_the_draw_of_the_whole_space():
    one = audit.draw(jax.random.key(8), _zeros(3_000), 7, support=64, rows=1)
    default = audit.draw(jax.random.key(8), _zeros(3_000), 7, support=64)
    np.testing.assert_array_equal(np.asarray(one.coords), np.asarray(default.coords),
                                  err_msg="rows=1 must keep every trainer's directions")
    coords = np.arange(64) * (3_000 // 64) + np.asarray(jax.random.randint(
        jax.random.split(jax.random.key(8))[0], (7, 64), 0, 3_000 // 64))
    np.testing.assert_array_equal(np.asarray(one.coords), coords,
                                  err_msg="the draw of a run started before rows existed")


def test_all_rounds_run_holds_the_counts_the_ledgers_eps_and_the_family_alone():
    ledger = {"delta": DELTA, "epsilon_rdp": 4.7, "epsilon_pld": 4.4}
    family = {"rounds": 30, "rate": 1.0, "noise_multiplier": 6.0, "shift": 1.02,
              "noise_std": 6.1, "epsilon_estimate": 3.9, "epsilon_lower_bound": 0.5,
              "epsilon_lower_bound_fdp": 1.1, "significance": 0.05, "delta": DELTA}
    figures = audit.all_rounds_run(21, 19, ledger, family)
    assert figures == {"inserted": 21, "held_out": 19, "ledger_epsilon_rdp": 4.7,
                       "ledger_epsilon_pld": 4.4, "all_rounds": family}, figures
    line = audit.report_line({"audit": figures})
    for words in ("not for release", "30 steps", "1.020", "1.100", "4.4"):
        assert words in line, f"report.md's line must say {words!r}: {line}"


def test_estimate_of_gaussian_scores_one_std_apart_is_the_gaussian_mechanisms_eps():
    rng = np.random.default_rng(0)
    result = audit.estimate(rng.normal(1.0, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000), DELTA)
    exact = dp_accounting.get_epsilon_gaussian(1.0, DELTA)
    assert abs(result.mu - 1) < 0.05, result
    assert abs(result.epsilon_estimate - exact) < 0.3, (
        f"estimate {result.epsilon_estimate:.3f} vs the exact eps {exact:.3f} of mu = 1")
    assert 0 < result.epsilon_lower_bound < exact, result


def test_estimate_of_inserted_scores_that_spread_more_reads_it_in_the_two_variance_fit():
    rng = np.random.default_rng(1)
    result = audit.estimate(rng.normal(1.0, 1.5, 20_000), rng.normal(0.0, 1.0, 20_000), DELTA)
    one_std = dp_accounting.get_epsilon_gaussian(1.0, DELTA)
    two_stds = audit.gaussian_pair_epsilon((1.0, 1.5), (0.0, 1.0), DELTA)
    assert abs(result.epsilon_estimate - one_std) < 0.3, f"the shift alone reads mu = 1: {result}"
    assert abs(result.epsilon_estimate_two_variances - two_stds) < 1.0, (
        f"the fit of each set's own std must give ~{two_stds:.2f}: {result}")


@pytest.mark.parametrize("inside, outside, match", [
    ([1.0], [0.0, 0.1], "at least 2"),
    ([1.0, np.nan], [0.0, 0.1], "NaN or inf"),
])
def test_estimate_refuses_too_few_or_non_finite_scores(inside, outside, match):
    with pytest.raises(ValueError, match=match):
        audit.estimate(inside, outside, DELTA)



@pytest.mark.parametrize("weight", [0.5, -0.5])
def test_insert_adds_weight_times_each_direction_sampled_at_rate_one(weight):
    dim = 3_000
    canaries = audit.draw(jax.random.key(2), _zeros(dim), 5, support=64)
    base = {"a": jnp.ones((dim - 1000,)), "b": jnp.full((1000,), 2.0)}
    got = audit.insert(canaries, base, weight, 1.0, jax.random.key(3))
    flat = np.concatenate([np.asarray(got["a"]), np.asarray(got["b"])])
    expected = np.concatenate([np.ones(dim - 1000), np.full(1000, 2.0)])
    expected += weight * dense(canaries, dim).sum(0)
    np.testing.assert_allclose(flat, expected, atol=1e-6,
                               err_msg="the sum must gain weight * u_c for every canary")


def test_insert_at_rate_zero_adds_nothing():
    canaries = audit.draw(jax.random.key(4), _zeros(500), 5)
    got = audit.insert(canaries, _zeros(500), 1.0, 0.0, jax.random.key(5))
    assert not np.any(np.asarray(got)), "a canary sampled at rate 0 took part"


def test_scores_are_the_cosines_of_the_change_with_each_direction():
    dim = 2_000
    canaries = audit.draw(jax.random.key(6), _zeros(dim), 3, support=50)
    rows = dense(canaries, dim)
    change = 2.0 * rows[0] + np.random.default_rng(0).normal(size=dim) * 0.001
    got = np.asarray(audit.scores(canaries, _zeros(dim), jnp.asarray(change, jnp.float32)))
    expected = rows @ change / np.linalg.norm(change)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert got[0] > 0.99, "the change along direction 0 must score ~1 on it"


def test_gaussian_epsilon_is_zero_without_a_shift_and_grows_with_it():
    assert audit.gaussian_epsilon(0.0, DELTA) == 0.0
    assert audit.gaussian_epsilon(-1.0, DELTA) == 0.0
    assert audit.gaussian_epsilon(1.0, DELTA) == pytest.approx(
        dp_accounting.get_epsilon_gaussian(1.0, DELTA)), "mu = 1 is the Gaussian mechanism z = 1"
    assert audit.gaussian_epsilon(2.0, DELTA) > audit.gaussian_epsilon(1.0, DELTA)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_two_gaussians_of_one_std_are_the_gaussian_mechanism(mu):
    got = audit.gaussian_pair_epsilon((3.0 + 2 * mu, 2.0), (3.0, 2.0), DELTA)
    assert got == pytest.approx(dp_accounting.get_epsilon_gaussian(1 / mu, DELTA), rel=1e-4), (
        f"outputs {mu} stds apart must give the eps of a Gaussian mechanism of z = 1/{mu}")


@pytest.mark.parametrize("inserted, held_out", [
    ((1.0, 1.5), (0.0, 1.0)),  # the inserted scores spread more
    ((1.0, 0.7), (0.0, 1.0)),  # less
    ((0.0, 2.0), (0.0, 1.0)),  # no shift: the spread alone tells them apart
])
def test_two_gaussians_eps_leaves_delta_of_their_divergence(inserted, held_out):
    eps = audit.gaussian_pair_epsilon(inserted, held_out, DELTA)
    x = np.linspace(-40, 40, 2_000_001)
    p, q = (np.exp(-0.5 * ((x - m) / s) ** 2) / (s * np.sqrt(2 * np.pi)) for m, s in (
        inserted, held_out))
    step = x[1] - x[0]
    divergence = max(np.sum(np.maximum(p - np.exp(eps) * q, 0)) * step,
                     np.sum(np.maximum(q - np.exp(eps) * p, 0)) * step)
    assert divergence == pytest.approx(DELTA, rel=1e-3), (
        f"at the returned eps {eps:.4f} the hockey-stick divergence (numerical integral) is "
        f"{divergence:.3g}, not delta {DELTA}")


def test_two_gaussians_eps_is_zero_for_equal_ones_and_inf_for_a_point_mass_shift():
    assert audit.gaussian_pair_epsilon((1.0, 1.0), (1.0, 1.0), DELTA) == 0.0
    assert audit.gaussian_pair_epsilon((1.0, 0.0), (0.0, 0.0), DELTA) == np.inf
    assert audit.gaussian_pair_epsilon((0.0, 0.0), (0.0, 0.0), DELTA) == 0.0


def test_a_model_that_did_not_move_shows_no_canary():
    result = audit.estimate(np.zeros(10), np.zeros(10), DELTA)
    assert (result.mu, result.epsilon_estimate) == (0.0, 0.0), (
        f"all scores 0 (no change) must give mu 0 and eps 0, not {result}")


def _inserted_positions(key, count, params):
    """[2 count] bools: which of `draw`'s candidates `draw_pair` inserted (checking that
    the two sets are exactly the candidates, each once)."""
    candidates = np.asarray(audit.draw(jax.random.split(key)[0], params, 2 * count).values)
    inserted, held_out = (np.asarray(c.values) for c in audit.draw_pair(key, params, count))
    rows = {row.tobytes(): i for i, row in enumerate(candidates)}
    assert len(rows) == 2 * count, "two candidate directions collided"
    inside = [rows.get(row.tobytes(), -1) for row in inserted]
    outside = [rows.get(row.tobytes(), -1) for row in held_out]
    assert sorted(inside + outside) == list(range(2 * count)), (
        "the inserted and held-out sets are not a partition of the 2k candidates drawn "
        "from the key split off for the directions")
    return np.isin(np.arange(2 * count), inside)


def test_draw_pair_inserts_each_candidate_by_its_own_fair_coin():
    params, count, draws = _zeros(200), 10, 200
    positions = np.stack([_inserted_positions(jax.random.key(seed), count, params)
                          for seed in range(draws)])
    rate = positions.mean(axis=0)
    # Each position's rate has std 0.035 over 200 draws; a fixed split gives 0 or 1.
    assert np.all(np.abs(rate - 0.5) < 0.15), (
        f"candidate i is not inserted with probability 1/2, independently of i: {rate}")
    sizes = positions.sum(axis=1)
    assert len(set(sizes.tolist())) > 3, (
        f"the inserted count is always {set(sizes.tolist())}: not independent coins")
    pair_corr = np.corrcoef(positions[:, 0], positions[:, 1])[0, 1]
    assert abs(pair_corr) < 0.3, f"two candidates' coins are correlated ({pair_corr:.2f})"


def _hand_made():
    """Two 2-coordinate directions in 6 parameters and a mean with known projections."""
    half = 2**-0.5
    canaries = audit.Canaries(jnp.array([[0, 3], [1, 5]], jnp.int32),
                              jnp.array([[half, half], [half, -half]], jnp.float32))
    mean = {"a": jnp.array([0.1, 0.2, 9.0], jnp.float32),
            "b": jnp.array([0.3, 9.0, -0.1], jnp.float32)}
    # <mean, u> = (0.1 + 0.3) / sqrt2 and (0.2 + 0.1) / sqrt2; s = <mean, u> * 8 / 0.5.
    return canaries, mean, np.array([0.4, 0.3]) * half * 16


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_observe_adds_each_rounds_standardised_projection_and_its_llr(rate):
    canaries, mean, s = _hand_made()
    sigma = 2.0
    sums = audit.observe(audit.RoundScores.zeros(2), canaries, mean, jnp.float32(0.5), 8.0,
                         rate, sigma)
    sums = audit.observe(sums, canaries, mean, jnp.float32(0.5), 8.0, rate, sigma)
    llr = np.log((1 - rate) + rate * np.exp((s - 0.5) / sigma**2))
    np.testing.assert_allclose(sums.sum, 2 * s, rtol=1e-6, err_msg="s is not <mean, u> m / C")
    np.testing.assert_allclose(sums.sum_sq, 2 * s**2, rtol=1e-6)
    np.testing.assert_allclose(sums.llr, 2 * llr, rtol=1e-5,
                               err_msg="not log((1 - q) + q exp((s - 1/2) / sigma^2))")


def test_all_rounds_figures_of_hand_made_sums():
    # Two inserted then three held-out candidates, 4 rounds at q = 0.5.
    sums = audit.RoundScores(sum=jnp.array([3.0, 1.0, 0.5, -0.5, 0.0]),
                             sum_sq=jnp.array([9.0, 9.0, 4.0, 3.0, 5.0]),
                             llr=jnp.array([2.0, 1.0, 0.0, -1.0, 0.5]))
    figures = audit.all_rounds(sums, inserted=2, rounds=4, rate=0.5, noise_multiplier=1.0,
                               delta=DELTA)
    assert figures["shift"] == pytest.approx((2.0 - 0.0) / (4 * 0.5))
    assert figures["noise_std"] == pytest.approx(np.sqrt(12.0 / 11)), (
        "the held-out s pooled over candidates and rounds: 12 values, sum 0, sum of squares 12")
    assert figures["epsilon_estimate"] == pytest.approx(audit.sampled_gaussian_epsilon(
        np.sqrt(12.0 / 11), 1.0, 0.5, 4, DELTA))
    assert figures["epsilon_lower_bound"] == audit.lower_bound([2.0, 1.0], [0.0, -1.0, 0.5], DELTA)
    assert figures["epsilon_lower_bound_fdp"] == audit.lower_bound_in_family(
        [2.0, 1.0], [0.0, -1.0, 0.5], 4, 0.5, 1.0, DELTA), "the llr scores in the ledger's family"
    assert (figures["rounds"], figures["rate"], figures["delta"]) == (4, 0.5, DELTA)


def test_sampled_gaussian_epsilon_of_one_unsampled_round_is_the_gaussian_mechanisms():
    exact = dp_accounting.get_epsilon_gaussian(1.0, DELTA)  # 4.377
    assert audit.sampled_gaussian_epsilon(2.0, 2.0, 1.0, 1, DELTA) == pytest.approx(
        exact, abs=0.01), "multiplier noise_std / shift = 1, q = 1, one round"
    assert audit.sampled_gaussian_epsilon(1.0, 0.0, 1.0, 1, DELTA) == 0.0


@pytest.mark.parametrize("noise", [0.5, 1.0, 2.0])
def test_the_grid_curve_of_one_gaussian_lies_just_below_the_exact_one(noise):
    alpha = np.concatenate([np.geomspace(1e-12, 1e-2, 200), np.linspace(0.01, 1.0, 200)])
    exact = stats.norm.cdf(stats.norm.ppf(1 - alpha) - 1 / noise)  # G_{1/noise}
    grid = fdp_audit.trade_off(*fdp_audit.trade_off_lines(1, 1.0, noise), alpha)
    assert np.max(grid - exact) < 1e-9, (
        "the curve built from the PLD's (eps, delta) pairs lies above the Gaussian's exact "
        "one: a claim stronger than the mechanism's")
    # Measured: at most 1.7e-6 below (noise 0.5), from the eps grid's spacing.
    assert np.max(exact - grid) < 1e-5, "the grid curve is needlessly far below the exact one"


def _gaussian_scores(count, shift, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(shift, 1.0, count), rng.normal(0.0, 1.0, count)


def _best_of_the_fixed_tests(method, inserted, held_out):
    """jax_privacy's `CanaryScoreAuditor.<method>` at each of `fdp_audit.tests` (guess the
    top j), at the Bonferroni level over them: the best."""
    guesses = fdp_audit.tests(inserted.size + held_out.size)
    top = np.sort(np.concatenate([inserted, held_out]))[::-1]
    bound = getattr(auditing.CanaryScoreAuditor(inserted, held_out), method)
    return max(bound(audit.SIGNIFICANCE / guesses.size, DELTA,
                     threshold_strategy=auditing.Explicit(top[j - 1])) for j in guesses)


def test_with_the_gaussian_family_the_bound_is_jax_privacys_f_dp_one():
    inserted, held_out = _gaussian_scores(200, 1.5)
    # jax_privacy's exact-Gaussian recursion, at each of the same tests.
    expected = _best_of_the_fixed_tests("epsilon_one_run_fdp", inserted, held_out)
    assert expected > 1.0, expected  # a real rejection, not two zeros
    # One round of Gaussian(s), and 4 unsampled rounds of Gaussian(2 s): both the family of
    # Gaussian mechanisms (4 compose to one of multiplier 2 s / sqrt(4) = s).
    for rounds, noise in [(1, 1.0), (4, 2.0)]:
        got = audit.lower_bound_in_family(inserted, held_out, rounds, 1.0, noise, DELTA)
        # The grid curve lies below the exact one (<= 2e-6) and the bisection reports the
        # upper end of an s interval 0.5% wide, so ours is at most ~1% lower and never
        # higher (beyond the PLD's and brentq's ~1e-6 in eps).
        assert expected * 0.99 - 1e-3 <= got <= expected + 1e-3, (
            f"{rounds} round(s): ours {got:.4f} against jax_privacy's {expected:.4f} with "
            "the Gaussian family")


def test_the_one_run_bound_corrects_over_tests_fixed_before_the_scores():
    inserted, held_out = _gaussian_scores(1000, 2.0, seed=2)
    # Steinke et al.'s bound at each guess "the top j were inserted", j fixed by the count.
    expected = _best_of_the_fixed_tests("epsilon_one_run", inserted, held_out)
    assert expected > 1.0, expected  # a real rejection, not two zeros
    got = audit.lower_bound(inserted, held_out, DELTA)
    # jax_privacy's default divides the level by the thresholds on the scores' ROC hull (a
    # count the scores choose): it reads more than the union bound over fixed tests proves.
    assert got == pytest.approx(expected, rel=1e-9), (
        f"lower bound {got:.4f}, where the best of the fixed tests at their Bonferroni "
        f"level proves {expected:.4f}")


def test_the_f_dp_bound_grows_with_the_separation_and_is_zero_without_it():
    inserted, held_out = _gaussian_scores(1000, 0.0, seed=1)
    bounds = [audit.lower_bound_in_family(inserted + shift, held_out, 1, 1.0, 1.0, DELTA)
              for shift in (0.0, 0.5, 1.0, 2.0)]
    assert bounds[0] == 0.0, f"identical score distributions proved eps >= {bounds[0]:.3f}"
    assert 0 < bounds[1] < bounds[2] < bounds[3], f"not increasing with the shift: {bounds}"


@pytest.mark.parametrize("rounds, rate", [
    (1, 1.0),
    # slow: ~5 s; the fast suite keeps (1, 1.0) and the 20-round curve's blow-up and
    # larger-curve tests below; the slow wide scan repeats (20, 0.1)
    pytest.param(20, 0.1, marks=pytest.mark.slow)])
def test_a_claim_is_rejected_from_some_noise_multiplier_on(rounds, rate):
    # The bisection on s needs it: "f_s-DP" is stronger the larger s is.
    noises = np.geomspace(0.3, 6.0, 15)
    for guesses, correct in [(100, 80), (400, 300), (1000, 700)]:
        rejected = [fdp_audit.rejects(
            fdp_audit.blow_up_inverse(*fdp_audit.trade_off_lines(rounds, rate, noise)), 2000,
            guesses, correct, 0.05 / 64) for noise in noises]
        assert rejected == sorted(rejected) and any(rejected) and not all(rejected), (
            f"{correct} of {guesses}: rejections along s {noises.round(2)}: {rejected}")


@pytest.mark.parametrize("rounds, rate, noise", [(1, 1.0, 1.0), (20, 0.1, 0.8)])
def test_a_larger_curve_leaves_both_masses_of_the_recursion_larger(rounds, rate, noise):
    # (4) of fdp_audit's docstring, proven there: the soundness of a data-chosen s* rests
    # on it. Nested curves by construction: B keeps a random few of A's lines, so A's
    # curve and its blow-up inverse are pointwise the larger.
    epsilons, deltas = fdp_audit.trade_off_lines(rounds, rate, noise)
    larger = fdp_audit.blow_up_inverse(epsilons, deltas)
    rng = np.random.default_rng(rounds)
    guesses_tested = fdp_audit.tests(2000)
    flipped = moved = 0
    for trial in range(60):
        kept = rng.random(epsilons.size) < rng.choice([0.002, 0.01, 0.05])
        smaller = fdp_audit.blow_up_inverse(epsilons[kept], deltas[kept])
        guesses = int(rng.choice(guesses_tested[guesses_tested >= 50]))
        correct = int(rng.integers(3 * guesses // 4, guesses + 1))
        level = float(rng.choice([0.05 / 54, 0.05, 0.5]))
        big = fdp_audit._masses(larger, 2000, guesses, correct, level)
        small = fdp_audit._masses(smaller, 2000, guesses, correct, level)
        assert big[0] >= small[0] and big[1] >= small[1], (
            f"trial {trial}, {correct} of {guesses} at level {level:.2g}: the larger curve's "
            f"(right, wrong) masses {big} fall below the smaller's {small}")
        moved += sum(big) > sum(small)
        flipped += (fdp_audit.rejects(larger, 2000, guesses, correct, level)
                    and not fdp_audit.rejects(smaller, 2000, guesses, correct, level))
    assert moved >= 10 and flipped >= 3, (
        f"of 60 trials only {moved} move the masses apart and {flipped} the verdicts: too easy")


@pytest.mark.slow
@pytest.mark.parametrize("rounds, rate", [(1, 1.0), (20, 0.1), (150, 0.237)])
def test_rejection_is_monotone_along_the_noise_multiplier_on_a_wide_scan(rounds, rate):
    # Rejection is monotone in the curve (proven, fdp_audit's docstring); this scan checks
    # that the computed curves nest along s too, so the bisection finds the smallest s*:
    # 48 (guesses, correct) pairs by 25 multipliers from 0.25 to 8, in three families.
    inverses = [fdp_audit.blow_up_inverse(*fdp_audit.trade_off_lines(rounds, rate, noise))
                for noise in np.geomspace(0.25, 8.0, 25)]
    level = audit.SIGNIFICANCE / fdp_audit.tests(2000).size
    switches = 0
    for guesses in [5, 20, 60, 150, 400, 800, 1200, 2000]:
        for right in [0.55, 0.65, 0.75, 0.85, 0.95, 1.0]:
            correct = round(right * guesses)
            rejected = [fdp_audit.rejects(inverse, 2000, guesses, correct, level)
                        for inverse in inverses]
            assert rejected == sorted(rejected), (
                f"{correct} of {guesses} guesses: a claim rejected at some multiplier but not "
                f"at a larger one: {rejected}")
            switches += any(rejected) and not all(rejected)
    assert switches >= 10, f"only {switches} pairs change verdict within the scan: too easy"


def test_a_final_model_moved_along_the_inserted_directions_rejects_the_family():
    dim = 20_000
    inserted, held_out = audit.draw_pair(jax.random.key(7), _zeros(dim), 400)
    family = {"rounds": 1, "rate": 1.0, "noise_multiplier": 1.0, "delta": DELTA,
              "significance": audit.SIGNIFICANCE}
    along = jnp.asarray(dense(inserted, dim).sum(0), jnp.float32)
    ledger = {"delta": DELTA, "epsilon_rdp": 4.7, "epsilon_pld": 4.4}

    def final_model_bound(final):
        figures = audit.audit_run((inserted, held_out), _zeros(dim), final, ledger, family)
        return figures["all_rounds"]["final_model_epsilon_lower_bound_fdp"]

    got = final_model_bound(along)
    assert got > audit.sampled_gaussian_epsilon(1.0, 1.0, 1.0, 1, DELTA), (
        f"the inserted directions alone moved the model, yet the bound is {got:.3f}")
    away = jnp.asarray(dense(held_out, dim).sum(0), jnp.float32)
    assert final_model_bound(away) == 0.0, (
        "a model moved along the held-out directions proved a canary's presence")


@pytest.mark.parametrize("rounds, rate, noise", [(1, 1.0, 1.0), (20, 0.1, 0.8)])
def test_the_blow_up_inverse_inverts_one_minus_the_curve(rounds, rate, noise):
    # The recursion reads the curve through it: x -> 1 - f(x), inverted, where f decreases.
    lines = fdp_audit.trade_off_lines(rounds, rate, noise)
    alpha = np.concatenate([np.geomspace(1e-9, 1e-2, 50), np.linspace(0.01, 0.999, 100)])
    curve = fdp_audit.trade_off(*lines, alpha)
    alpha = alpha[curve > 0]
    inverse = fdp_audit.blow_up_inverse(*lines)
    got = np.array([inverse(1 - f) for f in curve[curve > 0]])
    np.testing.assert_allclose(got, alpha, rtol=1e-6, atol=1e-12,
                               err_msg="not the inverse of 1 - trade_off")


@pytest.mark.parametrize("rounds, rate, noise",
                         [(1, 1.0, 1.0), (20, 0.1, 1.0), (300, 0.064, 0.917)])
def test_the_curves_lines_hold_the_ledgers_eps_at_delta(rounds, rate, noise):
    epsilons, deltas = fdp_audit.trade_off_lines(rounds, rate, noise)
    first = epsilons[np.argmax(deltas <= DELTA)]  # the least eps of a line with delta_i <= DELTA
    ledger = audit.sampled_gaussian_epsilon(noise, 1.0, rate, rounds, DELTA)  # 4.38, 3.59, 8.99
    spacing = epsilons[1] - epsilons[0]
    assert ledger - 1e-3 <= first <= ledger + spacing + 1e-3, (
        f"the curve's lines reach delta {DELTA} at eps {first:.4f}, the ledger's PLD at "
        f"{ledger:.4f}: not the ledger's mechanism")


def test_tied_scores_count_against_the_guesser():
    # A model that did not move scores every candidate 0: all tied. Broken for the
    # guesser (inserted first), the top j would all be right and reject any claim.
    correct = fdp_audit.correct_guesses(np.zeros(5), np.zeros(5), np.arange(1, 11))
    assert correct.tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5], (
        f"at a tie the held-out candidates must come first: {correct.tolist()}")
    bound = audit.lower_bound_in_family(np.zeros(50), np.zeros(50), 1, 1.0, 1.0, DELTA)
    assert bound == 0.0, f"scores that tell nothing apart proved eps >= {bound:.3f}"



def test_the_coins_are_independent_of_the_directions():
    # Drawn from a key that also drew the directions' signs (stop 67's mutation audit:
    # fold_in(key, 1) is the sign key split(key)[1]), coin i was sign i of the flattened
    # draw, and an auditor knowing the directions knew which were inserted.
    params, count, draws = _zeros(200), 10, 100
    agree = []
    for seed in range(draws):
        key = jax.random.key(seed)
        coins = _inserted_positions(key, count, params)
        signs = np.asarray(audit.draw(jax.random.split(key)[0], params, 2 * count).values)
        agree.append(coins == (signs.ravel()[:2 * count] > 0))
    rate = float(np.mean(agree))
    # 2,000 pairs: std 0.011 if independent; 1.0 where the coins are the signs' bits.
    assert abs(rate - 0.5) < 0.05, (
        f"coin i equals the sign of the directions' i-th coordinate in {rate:.1%} of draws")
