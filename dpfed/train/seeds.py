"""A run's root key from its seed: 64-bit seeds, the same keys as `jax.random.key` below 2**32.

Every DP release draws its noise from `root_key(seed)`. JAX's own `jax.random.key(seed)`
takes 32 bits, and 2**32 seeds are not a secret: an attacker holding a released model
update can try every one, regenerate the noise (threefry is counter-based: a few
coordinates suffice), recognise the right seed (the difference is then a clipped sum of
bounded norm, not noise of norm ~ z C sqrt(d)) and subtract the noise. `root_key` takes
64 bits.
"""

import jax
import jax.numpy as jnp
import numpy as np

SEED_BITS = 64  # root_key takes seeds in [0, 2**64)


def root_key(seed: int) -> jax.Array:
    """The threefry key of `seed` in [0, 2**64): key data [seed >> 32, seed & 0xFFFFFFFF].

    For every seed below 2**32 it is `jax.random.key(seed)`, bit for bit, so runs seeded
    before 64-bit seeds existed draw the same numbers; `jax.random.key` of a larger seed
    keeps only its low 32 bits (2**32 + 5 would be seed 5).

    Raises:
      ValueError: `seed` is not an integer in [0, 2**64).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"a seed must be an integer, not {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**SEED_BITS:
        raise ValueError(f"a seed must be in [0, 2**{SEED_BITS}), not {seed}")
    data = np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(data))
