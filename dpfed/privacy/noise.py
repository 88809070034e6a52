"""Gaussian noise on pytrees, calibrated to a sum's L2 sensitivity.

The accountant assumes Gaussian noise, whose tails are unbounded. `jax.random.normal`
maps a float32 uniform (steps of 2**-23) through `erf_inv`, so its draws lie in
[-5.42, 5.22]. Noise cut there makes some releases impossible under one of two
neighbouring datasets: with the neighbours' sums v apart (||v||_2 <= C, noise std sigma),
about phi(5.22) ||v||_1 / sigma <= phi(5.22) sqrt(d) C / sigma of the probability, a
delta the ledger does not count. Per participation that is 2.5e-3 for the demo's
discriminator (d = 6.6M, noise multiplier 0.5) and 1.1e-4 for the benchmark CNN (50k, at
1), against ledgers' delta of 1e-5. `standard_normal` draws from 64 random bits instead:
its tails reach 9.16 standard deviations (tail probability 2**-65), where the same bound
is 1.3e-15 and 5.6e-17 (5e-15 for 1e8 parameters at 0.5). It does not make the noise safe
against attacks on floating-point arithmetic (there is no "secure mode": WORKSPACE.md).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

PyTree = Any


def normal_from_bits(high: jax.Array, low: jax.Array) -> jax.Array:
    """The standard normal draw of 64 uniform random bits (uint32 `high`, `low`), float32.

    The top bit of `high` is the sign; the other 63 bits, k, give the tail probability
    p = (k + 1/2) 2**-64 in (0, 1/2), and the draw is -ndtri(p) with that sign. Float32
    holds p to a relative 2**-24 everywhere (it is fine near 0, where the tail is), so
    |draw| reaches -ndtri(2**-65) = 9.16.
    """
    sign = jnp.where(high >> 31 == 1, jnp.float32(-1), jnp.float32(1))
    k_high = (high & jnp.uint32(0x7FFFFFFF)).astype(jnp.float32)
    fraction = (low.astype(jnp.float32) + jnp.float32(0.5)) * jnp.float32(2.0**-32)
    tail = jnp.minimum((k_high + fraction) * jnp.float32(2.0**-32), jnp.float32(0.5))
    return sign * -ndtri(tail)


def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """N(0, 1) float32 draws whose tails reach 9.16 standard deviations (module docstring)."""
    high, low = jax.random.bits(key, (2, *shape), jnp.uint32)
    return normal_from_bits(high, low)


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: float | jax.Array) -> PyTree:
    """Adds i.i.d. N(0, stddev^2) to every coordinate; each leaf gets a fresh key.

    The noise is `standard_normal`'s (tails to 9.16 sd; `jax.random.normal`'s stop at 5.22).
    The addition is in float32 at least, then cast back to the leaf's dtype: rounding a
    noised value is post-processing, rounding the noise before adding it is not.
    A Python `stddev` (what the ledger records, as z * C) is rounded UP to float32:
    rounding to nearest took it up to a relative 2^-24 below, and a target-calibrated run
    2.9e-8 over its target eps. A `jax.Array` stddev (e.g. traced) is used as given.
    """
    scale: jax.Array | np.float32 = (
        stddev if isinstance(stddev, jax.Array) else float32_at_least(stddev))
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noised = []
    for x, k in zip(leaves, keys, strict=True):
        wide = jnp.promote_types(x.dtype, jnp.float32)
        noise = scale * standard_normal(k, x.shape)
        noised.append((x.astype(wide) + noise.astype(wide)).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, noised)


def float32_at_least(value: float) -> np.float32:
    """The smallest float32 >= `value` (NaN stays NaN; above float32's range, inf)."""
    with np.errstate(over="ignore"):
        rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return rounded


def divide_as(total: PyTree, denominator: float | jax.Array, like: PyTree) -> PyTree:
    """`total / denominator`, each leaf then cast to the dtype of the same leaf of `like`.

    The last step of a DP mean (clip, sum, noise, then divide by the *expected* count):
    the division happens in the sum's (float32) dtype and only the result is rounded to
    the params' dtype, so a low-precision params dtype never rounds or overflows the
    noised sum itself.
    """
    return jax.tree_util.tree_map(lambda t, p: (t / denominator).astype(p.dtype), total, like)
