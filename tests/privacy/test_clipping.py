"""Tests of per-example clipping and the clipped gradient sum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.privacy import clip_to_norm, clipped_grad_sum, global_l2_norm


def _linear_loss(params, example):
    x, y = example
    pred = x @ params["w"] + params["b"]
    return jnp.sum((pred - y) ** 2)


def _problem(batch=12, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(dim, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(batch, dim)) * 3, jnp.float32)
    y = jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32)
    return params, (x, y)


def test_global_norm_is_norm_of_flattened_tree():
    tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    assert float(global_l2_norm(tree)) == pytest.approx(5.0), "norm of (3, 0, 4) must be 5"


def test_norm_of_a_bfloat16_tree_is_accumulated_in_float32():
    # Summed in bfloat16, the squares of 100,000 values lose ~0.3% of the norm, and a
    # "clipped" contribution then exceeds C by as much: the noise would no longer cover it.
    x = jax.random.normal(jax.random.key(0), (100_000,), jnp.bfloat16)
    exact = np.linalg.norm(np.asarray(x, np.float64))
    got = float(global_l2_norm({"a": x}))
    assert got == pytest.approx(exact, rel=1e-5), f"norm {got} of bfloat16 leaves, exact {exact}"


def test_clip_to_norm_scales_only_large_trees():
    big, norm = clip_to_norm({"a": jnp.array([3.0, 4.0])}, 1.0)
    small, _ = clip_to_norm({"a": jnp.array([0.3, 0.4])}, 1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(
        big["a"], [0.6, 0.8], rtol=1e-6, err_msg="large tree not scaled to C"
    )
    np.testing.assert_allclose(small["a"], [0.3, 0.4], rtol=1e-6, err_msg="small tree was changed")


def test_vmap_per_example_sum_equals_python_loop():
    params, batch = _problem()
    clip = 2.0
    result = clipped_grad_sum(_linear_loss, params, batch, jnp.ones(12), clip)
    expected = jax.tree_util.tree_map(jnp.zeros_like, params)
    norms = []
    for i in range(12):
        g = jax.grad(_linear_loss)(params, (batch[0][i], batch[1][i]))
        clipped, n = clip_to_norm(g, clip)
        norms.append(float(n))
        expected = jax.tree_util.tree_map(jnp.add, expected, clipped)
    for k in params:
        np.testing.assert_allclose(
            result.grad_sum[k],
            expected[k],
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"vmapped clipped sum differs from a loop for {k}",
        )
    np.testing.assert_allclose(result.norms, norms, rtol=1e-5, err_msg="per-example norms differ")


def test_every_clipped_contribution_has_norm_at_most_clip():
    params, batch = _problem(batch=20)
    clip = 0.5
    for i in range(20):
        single = jax.tree_util.tree_map(lambda x, i=i: x[i : i + 1], batch)
        result = clipped_grad_sum(_linear_loss, params, single, jnp.ones(1), clip)
        assert float(global_l2_norm(result.grad_sum)) <= clip * (1 + 1e-5), (
            f"example {i}: clipped contribution norm exceeds C={clip}"
        )
    full = clipped_grad_sum(_linear_loss, params, batch, jnp.ones(20), clip)
    assert float(jnp.min(full.norms)) > clip, "test needs gradients larger than C to be meaningful"


@pytest.mark.parametrize("microbatch", [1, 5, 7, 12, 100])
def test_chunked_equals_unchunked(microbatch):
    params, batch = _problem()
    mask = jnp.array([1] * 9 + [0] * 3)
    whole = clipped_grad_sum(_linear_loss, params, batch, mask, 1.0)
    chunked = clipped_grad_sum(_linear_loss, params, batch, mask, 1.0, microbatch_size=microbatch)
    for k in params:
        np.testing.assert_allclose(
            chunked.grad_sum[k],
            whole.grad_sum[k],
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"microbatch={microbatch} changes the sum of {k}",
        )
    np.testing.assert_allclose(chunked.norms, whole.norms, rtol=1e-5)


def test_padding_contributes_nothing():
    params, (x, y) = _problem(batch=8)
    mask = jnp.array([1, 1, 1, 1, 1, 0, 0, 0])
    garbage_x = x.at[5:].set(1e6)  # padded rows hold huge values: must not leak in
    padded = clipped_grad_sum(_linear_loss, params, (garbage_x, y), mask, 1.0)
    real = clipped_grad_sum(_linear_loss, params, (x[:5], y[:5]), jnp.ones(5), 1.0)
    for k in params:
        np.testing.assert_allclose(
            padded.grad_sum[k],
            real.grad_sum[k],
            rtol=1e-6,
            atol=1e-6,
            err_msg="padded examples changed the clipped sum",
        )
    assert np.all(np.asarray(padded.norms[5:]) == 0), "padded examples must report norm 0"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("masked", [False, True])
def test_a_non_finite_example_contributes_nothing(bad, masked):
    # 0 * NaN is NaN: one such example, even masked out, used to make the whole sum NaN,
    # so the release depended on whether that example was sampled.
    params, (x, y) = _problem(batch=6)
    broken = x.at[2, 0].set(bad)
    mask = jnp.ones(6).at[2].set(0.0 if masked else 1.0)
    got = clipped_grad_sum(_linear_loss, params, (broken, y), mask, 1.0)
    keep = np.array([0, 1, 3, 4, 5])
    want = clipped_grad_sum(_linear_loss, params, (x[keep], y[keep]), jnp.ones(5), 1.0)
    for k in params:
        np.testing.assert_allclose(got.grad_sum[k], want.grad_sum[k], rtol=1e-6, atol=1e-6,
                                   err_msg=f"a {bad} example (masked={masked}) leaked into {k}")


def test_nonpositive_clip_is_rejected():
    params, batch = _problem()
    with pytest.raises(ValueError, match="l2_clip"):
        clipped_grad_sum(_linear_loss, params, batch, jnp.ones(12), 0.0)


def test_a_bfloat16_model_gets_a_float32_sum_whose_sensitivity_stays_c():
    # The sum was cast to bfloat16 before the noise: one more example then moved it by up
    # to 4C at B ~ 500, against noise calibrated to C (found by an API audit).
    params = jnp.ones((1,), jnp.bfloat16)

    def loss(p, x):
        return jnp.sum(p.astype(jnp.float32) * x)  # each gradient is x: norm exactly 1

    xs = jnp.ones((1100, 1))
    worst = 0.0
    for b in (200, 257, 514, 777, 1023):
        mask_b = (jnp.arange(1100) < b).astype(jnp.float32)
        mask_b1 = (jnp.arange(1100) < b + 1).astype(jnp.float32)
        with_b = clipped_grad_sum(loss, params, xs, mask_b, 1.0).grad_sum
        with_b1 = clipped_grad_sum(loss, params, xs, mask_b1, 1.0).grad_sum
        assert with_b.dtype == jnp.float32, "the sum stays float32 until the noise"
        worst = max(worst, float(jnp.abs(with_b1 - with_b).max()))
    assert worst <= 1.0 + 1e-5, f"one example moved the sum by {worst} > C = 1"


@pytest.mark.parametrize("clip", [float("inf"), float("nan"), 0.0])
def test_clipped_grad_sum_refuses_a_clip_that_is_not_positive_and_finite(clip):
    params, batch = _problem()
    with pytest.raises(ValueError, match="l2_clip"):
        clipped_grad_sum(_linear_loss, params, batch, jnp.ones(12), clip)
