"""dpfed.privacy.audit: canary directions, their insertion into a clipped sum, the scores
of a model's change, and the eps estimate and lower bound from them."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.privacy import audit
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
    candidates = np.asarray(audit.draw(key, params, 2 * count).values)
    inserted, held_out = (np.asarray(c.values) for c in audit.draw_pair(key, params, count))
    rows = {row.tobytes(): i for i, row in enumerate(candidates)}
    assert len(rows) == 2 * count, "two candidate directions collided"
    inside = [rows[row.tobytes()] for row in inserted]
    outside = [rows[row.tobytes()] for row in held_out]
    assert sorted(inside + outside) == list(range(2 * count)), (
        "the inserted and held-out sets are not a partition of the 2k candidates")
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
    assert (figures["rounds"], figures["rate"], figures["delta"]) == (4, 0.5, DELTA)


def test_sampled_gaussian_epsilon_of_one_unsampled_round_is_the_gaussian_mechanisms():
    exact = dp_accounting.get_epsilon_gaussian(1.0, DELTA)  # 4.377
    assert audit.sampled_gaussian_epsilon(2.0, 2.0, 1.0, 1, DELTA) == pytest.approx(
        exact, abs=0.01), "multiplier noise_std / shift = 1, q = 1, one round"
    assert audit.sampled_gaussian_epsilon(1.0, 0.0, 1.0, 1, DELTA) == 0.0
