"""Sampling of records (examples or clients) inside jit, with static shapes.

Poisson sampling draws each of n records with probability q; the sample size is
random. To keep shapes static without truncating the sample (truncation would break
the Poisson analysis), the selected indices are gathered into a length-n array and
processed in fixed-size chunks by a `lax.while_loop` whose trip count is
ceil(count / chunk): every sampled record is processed exactly once, whatever the
realised size, and nothing recompiles.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# The largest float32 below 1: the highest rate whose threshold fits in 32 bits.
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


def bernoulli_threshold(rate: jax.Array | float) -> jax.Array:
    """uint32 t such that P(uniform 32-bit draw < t) = t / 2**32 never exceeds `rate`.

    `rate` is taken to float32 and one step down (`nextafter`), so t / 2**32 <= rate
    whatever the rounding to float32 did, and rate - t / 2**32 < 2**-32 + 2**-22 rate. A
    rate >= 1 has no threshold below 2**32: `bernoulli_at_most` selects everything then.
    """
    rate = jnp.nan_to_num(jnp.asarray(rate, jnp.float32), nan=0.0)
    below = jnp.clip(jnp.nextafter(rate, jnp.float32(0)), 0.0, _BELOW_ONE)
    return jnp.floor(below * jnp.float32(2.0**32)).astype(jnp.uint32)


def bernoulli_at_most(key: jax.Array, rate: jax.Array | float, shape: tuple[int, ...]) -> jax.Array:
    """Independent draws, True with probability at most `rate` (bool `shape`).

    A DP sampling step must not select more often than the rate its ledger records.
    `jax.random.bernoulli` compares a float32 uniform, which takes the values k 2**-23, with
    the rate, so it selects with probability ceil(rate 2**23) / 2**23 >= rate: 7% above a
    rate of 1e-6, 2**-23 (= 119 x the rate) at 1e-9, under-counting eps. Here 32 random bits
    are compared with `bernoulli_threshold(rate)`: the probability is within 2**-32 +
    2**-22 rate of `rate` and never above it (a lower rate than accounted is only more
    private). The bits are those `jax.random.bernoulli` draws for the same key, so the
    two select the same records except for bits in the sliver between their thresholds.
    """
    bits = jax.random.bits(key, shape, jnp.uint32)
    # A Python rate is compared exactly (1 - 1e-9 is not 1); a traced one in its dtype.
    everything = rate >= 1 if isinstance(rate, int | float) else jnp.asarray(rate) >= 1
    return (bits < bernoulli_threshold(rate)) | everything


def poisson_sample(key: jax.Array, population: int, rate: float) -> tuple[jax.Array, jax.Array]:
    """Each of `population` records independently with probability `rate` (at most: see
    `bernoulli_at_most`).

    Returns (indices [population] int32, count): the first `count` entries are the
    sampled indices in increasing order; the rest are padding (0).
    """
    selected = bernoulli_at_most(key, rate, (population,))
    count = jnp.sum(selected, dtype=jnp.int32)
    (indices,) = jnp.nonzero(selected, size=population, fill_value=0)
    return indices.astype(jnp.int32), count


def poisson_chunk_size(expected: float, population: int | None = None, multiple: int = 1) -> int:
    """Records per pass over a Poisson sample of `expected` size: E + 3 sqrt(E), capped at
    `population`, rounded up to a multiple of `multiple`. A larger sample (probability
    ~0.1%) takes one more pass of `chunked_sum`: it is never truncated.

    Raises:
      ValueError: `expected` not > 0 or `multiple` < 1.
    """
    if not expected > 0 or multiple < 1:
        raise ValueError(f"need expected > 0 and multiple >= 1, got {expected}, {multiple}")
    size = math.ceil(expected + 3 * math.sqrt(expected))
    if population is not None:
        size = min(size, population)
    return int(math.ceil(size / multiple) * multiple)


def fixed_size_sample(key: jax.Array, population: int, size: int) -> tuple[jax.Array, jax.Array]:
    """A uniformly random subset of exactly `size` records, without replacement."""
    indices = jax.random.choice(key, population, (size,), replace=False)
    return indices.astype(jnp.int32), jnp.asarray(size, jnp.int32)


def chunked_sum(
    fn: Callable[[jax.Array, jax.Array], PyTree],
    indices: jax.Array,
    count: jax.Array,
    chunk_size: int,
) -> PyTree:
    """sum over chunks of fn(index_chunk [chunk_size], mask_chunk [chunk_size]).

    Covers indices[:count] exactly once; `fn` must give zero contribution where mask is
    False. Calls `fn` ceil(count / chunk_size) times, and at least once (an all-False
    mask when count == 0).
    """
    n = indices.shape[0]
    padded = -(-n // chunk_size) * chunk_size
    indices = jnp.pad(indices, (0, padded - n))
    offsets = jnp.arange(chunk_size)

    def chunk(i):
        start = i * chunk_size
        idx = jax.lax.dynamic_slice(indices, (start,), (chunk_size,))
        return idx, (start + offsets) < count

    num_chunks = (count + chunk_size - 1) // chunk_size
    # The first chunk runs outside the loop: XLA on CPU runs a while-loop body several
    # times slower than the same ops at top level, and with a chunk of about
    # E[size] + 3 sd the loop over overflow chunks almost never runs.
    first = fn(*chunk(0))

    def body(carry):
        i, acc = carry
        out = fn(*chunk(i))
        return i + 1, jax.tree_util.tree_map(jnp.add, acc, out)

    _, total = jax.lax.while_loop(lambda c: c[0] < num_chunks, body, (jnp.int32(1), first))
    return total
