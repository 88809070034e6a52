"""Tests of the Gaussian noise and of the mechanism that pairs noise with its DpEvent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event

from dpfed.privacy import GaussianSumMechanism, add_gaussian_noise, divide_as


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
