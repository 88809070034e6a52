"""Gaussian noise on pytrees, calibrated to a sum's L2 sensitivity."""

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: float | jax.Array) -> PyTree:
    """Adds i.i.d. N(0, stddev^2) to every coordinate; each leaf gets a fresh key.

    The addition is in float32 at least, then cast back to the leaf's dtype: rounding a
    noised value is post-processing, rounding the noise before adding it is not.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noised = []
    for x, k in zip(leaves, keys, strict=True):
        wide = jnp.promote_types(x.dtype, jnp.float32)
        noise = stddev * jax.random.normal(k, x.shape, jnp.float32)
        noised.append((x.astype(wide) + noise.astype(wide)).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, noised)


def divide_as(total: PyTree, denominator: float | jax.Array, like: PyTree) -> PyTree:
    """`total / denominator`, each leaf then cast to the dtype of the same leaf of `like`.

    The last step of a DP mean (clip, sum, noise, then divide by the *expected* count):
    the division happens in the sum's (float32) dtype and only the result is rounded to
    the params' dtype, so a low-precision params dtype never rounds or overflows the
    noised sum itself.
    """
    return jax.tree_util.tree_map(lambda t, p: (t / denominator).astype(p.dtype), total, like)
