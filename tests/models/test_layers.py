"""Tests of the patch convolutions (dpfed.models.layers)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from dpfed.models import layers


@pytest.mark.parametrize("stride,kernel", [(1, (3, 3)), (2, (3, 3)), (1, (2, 2)), (2, (4, 4))])
def test_patch_conv_equals_flax_same_conv(stride, kernel):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    params = nn.Conv(5, kernel, strides=stride, padding="SAME").init(jax.random.key(1), x)
    want = nn.Conv(5, kernel, strides=stride, padding="SAME").apply(params, x)
    got = layers.Conv(5, kernel, strides=stride).apply(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                               err_msg="im2col conv differs from nn.Conv (SAME)")


def test_patch_conv_has_the_parameter_tree_of_nn_conv():
    x = np.zeros((1, 8, 8, 2), np.float32)
    want = jax.tree_util.tree_map(np.shape, nn.Conv(4, (3, 3)).init(jax.random.key(0), x))
    got = jax.tree_util.tree_map(np.shape, layers.Conv(4, (3, 3)).init(jax.random.key(0), x))
    assert got == want, f"layers.Conv params {got} differ from nn.Conv's {want}"


def test_patches_are_ordered_kernel_row_column_channel():
    x = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
    patches = layers.extract_patches(x, (3, 3), (1, 1))
    assert patches.shape == (2, 3, 3, 18), f"patch shape {patches.shape}"
    # The centre pixel's patch is its whole 3x3 neighbourhood, row-major, channels last.
    np.testing.assert_array_equal(patches[1, 1, 1], x[1].reshape(-1),
                                  err_msg="patch layout is not (kh, kw, C)")


def test_conv_gradients_match_nn_conv():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = nn.Conv(4, (3, 3)).init(jax.random.key(1), x)

    def loss(module):
        return jax.grad(lambda p: (module.apply(p, x) ** 2).sum())(params)

    want, got = loss(nn.Conv(4, (3, 3))), loss(layers.Conv(4, (3, 3)))
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4,
                                   err_msg="patch conv gradient differs from nn.Conv's")


@pytest.mark.parametrize(("backend", "want"), [("gpu", "patches"), ("tpu", "xla")])
def test_auto_conv_follows_the_backend(monkeypatch, backend, want):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert layers.resolve_conv("auto") == want, (
        f"on {backend} 'auto' should pick {want} (GPU: patches measured faster under vmap)")


def test_auto_conv_is_patches_on_cpu_and_bad_names_fail():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_conv("auto") == "patches", "CPU backends should use patches"
    assert layers.resolve_conv("xla") == "xla"
    with pytest.raises(ValueError, match="unknown conv"):
        layers.resolve_conv("winograd")


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (4, 2, 7, 5, 1)])
def test_max_pool_2x2_equals_nn_max_pool(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    flat = x.reshape((-1, *shape[-3:]))
    want = nn.max_pool(flat, (2, 2), strides=(2, 2)).reshape((*shape[:-3], -1))
    got = layers.max_pool_2x2(x).reshape((*shape[:-3], -1))
    np.testing.assert_array_equal(got, want, err_msg="the pool's values differ from nn.max_pool")


def test_max_pool_2x2_gradient_equals_nn_max_pool_without_ties():
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    weights = jax.random.normal(jax.random.key(3), (2, 3, 3, 3))
    want = jax.grad(lambda v: (nn.max_pool(v, (2, 2), strides=(2, 2)) * weights).sum())(x)
    got = jax.grad(lambda v: (layers.max_pool_2x2(v) * weights).sum())(x)
    np.testing.assert_array_equal(got, want, err_msg="the gradient must go to each window's max")


def test_max_pool_2x2_shares_a_tie_and_keeps_the_window_total():
    grad = jax.grad(lambda v: layers.max_pool_2x2(v).sum())(np.ones((1, 2, 2, 1), np.float32))
    np.testing.assert_array_equal(grad.ravel(), [0.25] * 4,
                                  err_msg="a tied window shares its gradient equally")
