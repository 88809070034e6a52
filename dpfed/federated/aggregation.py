"""Private aggregation of client updates: per-client clipping, noise, adaptive clipping.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): clip each client's whole update (flat L2) to C, zero updates with non-finite
values, *sum*, add N(0, (zC)^2), divide by the *expected* cohort size. Adaptive clipping
(Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping") also releases the noised fraction b of clients with ||update|| <= C and moves
C geometrically towards the target quantile: C <- C exp(-eta (b - gamma)).

Both releases go through `dpfed.privacy.GaussianSumMechanism`, which adds the noise and
yields the DpEvent recorded in the ledger:
- the update sum is privatised in units of C (the sum divided by C has sensitivity 1), so
  the same mechanism serves a fixed and an adaptive (traced) clip norm;
- the count query sum_i (1{||d_i|| <= C} - 1/2) has sensitivity 1/2 and std sb, hence
  noise multiplier 2 sb; the update then gets z_d = (z^-2 - (2 sb)^-2)^(-1/2), so that the
  pair costs exactly one Gaussian mechanism of multiplier z.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.train.config import require_finite_floats

PyTree = Any


def clip_update(
    delta: PyTree, l2_clip: jax.Array | float | None
) -> tuple[PyTree, jax.Array, jax.Array]:
    """One client's update clipped to flat L2 norm `l2_clip` (None: no clipping).

    An update with a non-finite value (or whose norm overflows float32) is replaced by
    zeros (P0's public code does the same), so it contributes nothing.

    Returns:
      (clipped update, norm before clipping (0 for a zeroed update), finite flag).
    """
    norm = privacy.global_l2_norm(delta)
    finite = jnp.isfinite(norm)
    if l2_clip is not None:
        delta, _ = privacy.clip_to_norm(delta, l2_clip)
    zeroed = jax.tree_util.tree_map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), delta)
    return zeroed, jnp.where(finite, norm, 0.0), finite


def update_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """z_d with z_d^-2 + z_b^-2 = z^-2: the update's share of a total multiplier z."""
    if noise_multiplier == 0:
        return 0.0
    if count_noise_multiplier <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping: the count query's noise multiplier 2*sb = "
            f"{count_noise_multiplier:.4g} must exceed the total noise multiplier z = "
            f"{noise_multiplier:.4g}; raise clipped_count_stddev or clients per round")
    return (noise_multiplier**-2 - count_noise_multiplier**-2) ** -0.5


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. (2021) quantile tracking of the clip norm (defaults as in TFF/P0).

    The clip norm of round 0 is the engine's `l2_clip`.

    Attributes:
      target_quantile: gamma, the fraction of unclipped updates aimed at.
      learning_rate: eta of the geometric update.
      clipped_count_stddev: sb, std of the noise on the count query; None means
        0.05 * expected clients per round (the paper's m / 20).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    clipped_count_stddev: float | None = None

    def __post_init__(self):
        require_finite_floats(self)
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev > 0:
            raise ValueError(f"clipped_count_stddev must be > 0, got {self.clipped_count_stddev}")

    def count_stddev(self, expected_clients: float) -> float:
        """sb: the given value, or expected_clients / 20."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return 0.05 * expected_clients

    def next_clip(self, clip: jax.Array, unclipped_fraction: jax.Array) -> jax.Array:
        """C exp(-eta (b - gamma)): grows when fewer than gamma are unclipped."""
        return clip * jnp.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile))


@dataclasses.dataclass(frozen=True)
class PrivateAggregator:
    """Turns the cohort's clipped sums into the noised average update (and next clip).

    Attributes:
      noise_multiplier: z, the total noise multiplier of a round (0: no noise).
      expected_clients: the divisor of the noised sum (q N for Poisson, m for fixed).
      adaptive: adaptive clipping settings, or None for a fixed clip norm.
    """

    noise_multiplier: float
    expected_clients: float
    adaptive: AdaptiveClipping | None = None

    def __post_init__(self):
        require_finite_floats(self)  # an expected_clients of inf averaged every update to 0
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.expected_clients > 0:
            raise ValueError(f"expected_clients must be > 0, got {self.expected_clients}")
        self.update_mechanism  # noqa: B018  validates the noise split early

    @property
    def count_mechanism(self) -> privacy.GaussianSumMechanism | None:
        """The count query: sensitivity 1/2, std sb (None without adaptive clipping/noise)."""
        if self.adaptive is None or self.noise_multiplier == 0:
            return None
        sb = self.adaptive.count_stddev(self.expected_clients)
        return privacy.GaussianSumMechanism(l2_clip=0.5, noise_multiplier=2 * sb)

    @property
    def update_mechanism(self) -> privacy.GaussianSumMechanism:
        """The update sum in units of C (sensitivity 1), multiplier z or z_d."""
        count = self.count_mechanism
        z = self.noise_multiplier
        if count is not None:
            z = update_noise_multiplier(z, count.noise_multiplier)
        return privacy.GaussianSumMechanism(l2_clip=1.0, noise_multiplier=z)

    def dp_event(self) -> dp_event.DpEvent | None:
        """One round's release on the cohort (unsampled); None when nothing is noised."""
        if self.noise_multiplier == 0:
            return None
        update = self.update_mechanism.dp_event()
        if self.count_mechanism is None:
            return update
        return dp_event.ComposedDpEvent([update, self.count_mechanism.dp_event()])

    def noised_mean(self, clipped_sum: PyTree, clip: jax.Array, key: jax.Array) -> PyTree:
        """(sum + N(0, (z_d C)^2)) / expected_clients, computed as C * privatize(sum / C)."""
        unit_sum = jax.tree_util.tree_map(lambda s: s / clip, clipped_sum)
        noised = self.update_mechanism.privatize(unit_sum, key)
        return jax.tree_util.tree_map(lambda s: s * (clip / self.expected_clients), noised)

    def next_clip(
        self, clip: jax.Array, below_minus_half_sum: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(next C, noised unclipped fraction b) from sum_i (1{||d_i|| <= C} - 1/2).

        Without adaptive clipping, C is unchanged and b is NaN.
        """
        if self.adaptive is None:
            return clip, jnp.float32(jnp.nan)
        total = below_minus_half_sum
        if self.count_mechanism is not None:
            total = self.count_mechanism.privatize(total, key)
        fraction = jnp.clip(total / self.expected_clients + 0.5, 0.0, 1.0)
        return self.adaptive.next_clip(clip, fraction), fraction
