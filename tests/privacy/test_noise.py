"""Tests of the Gaussian noise and of the mechanism that pairs noise with its DpEvent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from scipy import stats

from dpfed.privacy import GaussianSumMechanism, add_gaussian_noise, divide_as
from dpfed.privacy.noise import float32_at_least, normal_from_bits, standard_normal


def test_noise_std_equals_z_times_clip():
    """Catches a factor 2 or sqrt(2) error in the noise scale (std z*C on the sum)."""
    mech = GaussianSumMechanism(l2_clip=0.7, noise_multiplier=1.3)
    zeros = {"a": jnp.zeros((200, 500)), "b": jnp.zeros((1000,))}
    noised = mech.privatize(zeros, jax.random.key(0))
    flat = np.concatenate([np.ravel(noised["a"]), np.ravel(noised["b"])])
    expected = 0.7 * 1.3
    assert abs(flat.std() / expected - 1) < 0.02, (
        f"empirical std {flat.std():.4f} is not z*C={expected:.4f}"
    )
    assert abs(flat.mean()) < 0.01, "noise must be zero-mean"


def test_normal_from_bits_reaches_beyond_nine_standard_deviations_both_ways():
    # jax.random.normal's draws stop at ~5.4 sd: noise cut there makes some releases
    # impossible under a neighbouring dataset, a delta the ledger does not count.
    top = float(normal_from_bits(jnp.uint32(0), jnp.uint32(0)))
    bottom = float(normal_from_bits(jnp.uint32(2**31), jnp.uint32(0)))
    assert top == pytest.approx(stats.norm.isf(2.0**-65), rel=1e-6), (
        f"the largest draw is {top}, not the quantile of tail probability 2**-65 (9.16)")
    assert bottom == -top, f"the smallest draw {bottom} is not minus the largest {top}"


def test_normal_from_bits_is_the_normal_quantile_of_its_63_bits():
    rng = np.random.default_rng(0)
    low = rng.integers(0, 2**32, 4000, dtype=np.uint64)
    # Small high words reach into the far tail, as random ones rarely do.
    high = np.concatenate([rng.integers(0, 2**32, 3000, dtype=np.uint64),
                           np.repeat(np.array([0, 1, 2**31, 2**31 + 1], np.uint64), 250)])
    k = (high & 0x7FFFFFFF) * 2.0**32 + low  # exact below 2**53: the tail's draws
    sign = np.where(high >> 31 == 1, -1.0, 1.0)
    expected = sign * stats.norm.isf((k + 0.5) * 2.0**-64)
    got = np.asarray(normal_from_bits(jnp.asarray(high, jnp.uint32), jnp.asarray(low, jnp.uint32)))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6,
                               err_msg="a draw is not the normal quantile of its bits")


def test_standard_normal_draws_are_standard_normal():
    z = np.asarray(standard_normal(jax.random.key(0), (2**20,)))
    assert stats.kstest(z, "norm").pvalue > 0.01, "the draws do not follow N(0, 1) (KS test)"
    beyond = int(np.sum(np.abs(z) > 3))
    expected = z.size * 2 * stats.norm.sf(3)  # 2,831; binomial sd 53
    assert abs(beyond - expected) < 5 * np.sqrt(expected), (
        f"{beyond} draws beyond 3 sd, expected {expected:.0f}: the tails have the wrong weight")


def test_added_noise_is_standard_normal_times_stddev_with_a_key_per_leaf():
    tree = {"a": jnp.zeros(1000), "b": jnp.zeros((3, 4))}
    key = jax.random.key(7)
    noised = add_gaussian_noise(tree, key, 2.0)
    keys = jax.random.split(key, 2)
    for leaf, k in zip(("a", "b"), keys, strict=True):
        np.testing.assert_array_equal(
            np.asarray(noised[leaf]), np.asarray(2.0 * standard_normal(k, tree[leaf].shape)),
            err_msg=f"leaf {leaf}: the noise is not the wide-tailed sampler's")


def test_a_python_stddev_is_rounded_up_to_float32_never_down():
    # A z calibrated to eps 1 (DP-SGD, N 500, B 336, 2,672 steps, delta 1e-5) whose
    # nearest float32 is below it: rounded to nearest, the noise fell short of the
    # recorded z, and eps came out 2.9e-8 over the target.
    z = 140.53651800017875
    assert float(np.float32(z)) < z, "the test needs a z whose nearest float32 is below it"
    key = jax.random.key(0)
    noised = add_gaussian_noise(jnp.zeros(64), key, z)
    draws = standard_normal(jax.random.split(key, 1)[0], (64,))
    scale = np.nextafter(np.float32(z), np.float32(np.inf))
    np.testing.assert_array_equal(
        np.asarray(noised), np.asarray(draws * scale),
        err_msg="the draws must be scaled by the smallest float32 >= the recorded std")


@pytest.mark.parametrize("value", [1.0, 0.1, 140.53651800017875, 1e-30, 3.4e38, 0.0])
def test_float32_at_least_is_the_smallest_float32_not_below(value):
    got = float32_at_least(value)
    assert got.dtype == np.float32 and float(got) >= value, f"{got!r} < {value!r}"
    below = np.nextafter(got, np.float32(-np.inf))
    assert float(below) < value, f"{below!r} is a smaller float32 >= {value!r}"


def test_float32_at_least_keeps_nan_and_overflows_to_inf():
    assert np.isnan(float32_at_least(float("nan"))), "NaN must stay NaN"
    assert float32_at_least(1e39) == np.inf, "beyond float32's range the std must be inf"


def test_each_leaf_gets_independent_noise():
    tree = {"a": jnp.zeros(5000), "b": jnp.zeros(5000)}
    noised = add_gaussian_noise(tree, jax.random.key(1), 1.0)
    corr = np.corrcoef(np.asarray(noised["a"]), np.asarray(noised["b"]))[0, 1]
    assert abs(corr) < 0.05, f"leaves share noise (correlation {corr:.3f})"


def test_noise_is_deterministic_given_key():
    tree = {"a": jnp.zeros(10)}
    a = add_gaussian_noise(tree, jax.random.key(3), 1.0)["a"]
    b = add_gaussian_noise(tree, jax.random.key(3), 1.0)["a"]
    np.testing.assert_array_equal(a, b, err_msg="same key must give the same noise")


def test_mechanism_event_is_gaussian_with_its_multiplier():
    mech = GaussianSumMechanism(l2_clip=2.0, noise_multiplier=0.9)
    assert mech.dp_event() == dp_event.GaussianDpEvent(0.9)
    assert mech.stddev == pytest.approx(1.8)


@pytest.mark.parametrize(
    "clip,z", [(-1.0, 1.0), (0.0, 1.0), (1.0, -0.5), (float("inf"), 1.0), (float("nan"), 1.0)])
def test_mechanism_rejects_bad_parameters(clip, z):
    with pytest.raises(ValueError):
        GaussianSumMechanism(l2_clip=clip, noise_multiplier=z)


def test_a_bfloat16_leaf_is_noised_in_float32_then_rounded():
    x = {"w": jnp.full((4096,), 1.0, jnp.bfloat16)}
    key = jax.random.key(3)
    noised = add_gaussian_noise(x, key, 1e-3)["w"]
    wide = add_gaussian_noise({"w": x["w"].astype(jnp.float32)}, key, 1e-3)["w"]
    assert noised.dtype == jnp.bfloat16, "the leaf keeps its dtype"
    np.testing.assert_array_equal(
        np.asarray(noised), np.asarray(wide.astype(jnp.bfloat16)),
        err_msg="the noised value must be the float32 sum rounded once, not a sum of rounded "
        "noise")


def test_divide_as_divides_in_the_sums_dtype_then_casts_to_the_params_dtype():
    # A float16 params tree: a sum of 1e5 is out of float16's range (max 65504), its mean
    # over 1,000 is not. Casting before dividing would give inf.
    total = {"w": jnp.array([1.0e5, 3.0], jnp.float32)}
    params = {"w": jnp.zeros(2, jnp.float16)}
    mean = divide_as(total, 1000.0, params)
    assert mean["w"].dtype == jnp.float16, "the mean must take the params' dtype"
    np.testing.assert_allclose(
        np.asarray(mean["w"], np.float32), [100.0, 0.003], rtol=1e-3,
        err_msg="the division must precede the cast to the params' dtype")
