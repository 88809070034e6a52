"""Gaussian noise on pytrees, calibrated to a sum's L2 sensitivity."""

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: float | jax.Array) -> PyTree:
    """Adds i.i.d. N(0, stddev^2) to every coordinate; each leaf gets a fresh key."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noised = [
        x + (stddev * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noised)
