"""Per-client clipping, non-finite zeroing and the adaptive-clipping noise split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event

from dpfed.federated import AdaptiveClipping, PrivateAggregator, clip_update
from dpfed.federated.aggregation import update_noise_multiplier


def test_clip_update_bounds_the_flat_norm_of_the_whole_update():
    update = {"a": jnp.full((3,), 4.0), "b": jnp.full((2, 2), 3.0)}
    clipped, norm, finite = clip_update(update, 2.0)
    flat = np.concatenate([np.ravel(x) for x in clipped.values()])
    assert np.linalg.norm(flat) == pytest.approx(2.0, rel=1e-6), "flat L2 norm must be C"
    assert float(norm) == pytest.approx(np.sqrt(48 + 36)), "the norm before clipping"
    assert bool(finite), "a finite update is finite"


def test_clip_update_zeroes_a_non_finite_update():
    clipped, norm, finite = clip_update({"a": jnp.array([1.0, jnp.nan])}, 1.0)
    assert not bool(finite), "NaN makes the update non-finite"
    np.testing.assert_array_equal(np.asarray(clipped["a"]), 0.0, err_msg="zeroed, not clipped")
    assert float(norm) == 0.0, "a zeroed update counts with norm 0"


def test_noise_split_keeps_one_gaussian_of_multiplier_z():
    z, zb = 1.0, 10.0
    zd = update_noise_multiplier(z, zb)
    assert zd**-2 + zb**-2 == pytest.approx(z**-2), "z_d^-2 + (2 sb)^-2 must equal z^-2"


def test_noise_split_is_impossible_when_the_count_noise_is_too_small():
    with pytest.raises(ValueError, match="must exceed"):
        PrivateAggregator(1.0, expected_clients=10, adaptive=AdaptiveClipping())  # 2 sb = 1


def test_adaptive_clip_grows_when_too_many_updates_are_clipped():
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    grown = float(adaptive.next_clip(jnp.float32(1.0), jnp.float32(0.1)))
    shrunk = float(adaptive.next_clip(jnp.float32(1.0), jnp.float32(0.9)))
    assert grown == pytest.approx(np.exp(0.08)), "C exp(-eta (b - gamma)) with b = 0.1"
    assert shrunk < 1.0 < grown, "C shrinks when most updates are under it"


def test_the_released_unclipped_fraction_stays_in_0_1_and_so_does_the_clip_step():
    # A Poisson cohort above its expectation, or the count's noise, can take the count
    # past m / 2: the estimate is a fraction, and C moves by at most exp(eta / 2) a round.
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    aggregator = PrivateAggregator(0.0, expected_clients=10, adaptive=adaptive)
    for count, fraction in ((8.0, 1.0), (-8.0, 0.0)):  # estimates 1.3 and -0.3
        clip, released = aggregator.next_clip(jnp.float32(1.0), jnp.float32(count),
                                              jax.random.key(0))
        assert float(released) == fraction, f"count {count}: fraction {float(released)}"
        assert float(clip) == pytest.approx(np.exp(-0.2 * (fraction - 0.5))), (
            f"count {count}: C must move as for fraction {fraction}, got {float(clip)}")


def test_default_count_stddev_is_a_twentieth_of_the_cohort():
    assert AdaptiveClipping().count_stddev(100) == pytest.approx(5.0), "sb = m / 20"


def test_count_query_gets_noise_of_std_sb_and_is_recorded_at_multiplier_two_sb():
    # sb = 100 / 20 = 5 on the count sum_i (1{||d_i|| <= C} - 1/2) (sensitivity 1/2), so
    # the released fraction (sum / 100 + 1/2) has std 0.05.
    aggregator = PrivateAggregator(1.0, expected_clients=100, adaptive=AdaptiveClipping())
    keys = jax.random.split(jax.random.key(0), 4000)
    clip, count = jnp.float32(1.0), jnp.float32(0.0)
    _, fractions = jax.vmap(lambda k: aggregator.next_clip(clip, count, k))(keys)
    count_std = float(np.std(np.asarray(fractions))) * 100
    # 4,000 draws: the sample std is within 5% of sigma with overwhelming probability.
    assert count_std == pytest.approx(5.0, rel=0.05), (
        f"the count's noise std is {count_std}, not sb = 5: the released clip norm would "
        "not carry the noise its ledger event claims")
    assert aggregator.count_mechanism.dp_event() == dp_event.GaussianDpEvent(10.0), (
        "the count query is a Gaussian of multiplier 2 sb = 10 in its ledger event")


@pytest.mark.parametrize("kwargs, field", [
    ({"target_quantile": 0.0}, "target_quantile"),
    ({"target_quantile": 1.5}, "target_quantile"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"clipped_count_stddev": 0.0}, "clipped_count_stddev"),
])
def test_adaptive_clipping_refuses_a_setting_outside_its_range_naming_it(kwargs, field):
    # E.g. a quantile of 1.5 would shrink C every round whatever the updates.
    with pytest.raises(ValueError, match=f"^{field}:? must be"):
        AdaptiveClipping(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"noise_multiplier": -1.0, "expected_clients": 10}, "noise_multiplier"),
    ({"noise_multiplier": float("inf"), "expected_clients": 10}, "noise_multiplier"),
    ({"noise_multiplier": 1.0, "expected_clients": 0}, "expected_clients"),
    ({"noise_multiplier": 1.0, "expected_clients": -5}, "expected_clients"),
])
def test_private_aggregator_refuses_bad_noise_or_cohort_naming_it(kwargs, field):
    # A cohort of 0 or -5 would divide the noised sum by it: an inf or sign-flipped mean.
    with pytest.raises(ValueError, match=f"^{field}:? must be"):
        PrivateAggregator(**kwargs)
