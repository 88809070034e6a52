"""DP mechanisms that both add the noise and yield the DpEvent describing it.

A mechanism object is the only place where a noise std is derived from a clip norm,
so the noise added and the event recorded in the ledger cannot disagree.
"""

import dataclasses
from typing import Any

import jax
from dp_accounting import dp_event

from dpfed.privacy import accounting
from dpfed.privacy.noise import add_gaussian_noise

PyTree = Any


@dataclasses.dataclass(frozen=True)
class GaussianSumMechanism:
    """Releases a sum of contributions each clipped to L2 norm `l2_clip`.

    Adds N(0, (noise_multiplier * l2_clip)^2) to every coordinate of the *sum*. Under
    add/remove-one the sum's sensitivity is l2_clip, so the event is
    `GaussianDpEvent(noise_multiplier)`. Frozen and hashable: usable as a static jit arg.
    """

    l2_clip: float
    noise_multiplier: float

    def __post_init__(self):
        accounting.gaussian_sigma_for_sum(self.noise_multiplier, self.l2_clip)  # validates

    @property
    def stddev(self) -> float:
        """The std of the noise added to each coordinate of the sum: z * C."""
        return accounting.gaussian_sigma_for_sum(self.noise_multiplier, self.l2_clip)

    def privatize(self, clipped_sum: PyTree, key: jax.Array) -> PyTree:
        """The noised sum (jittable)."""
        return add_gaussian_noise(clipped_sum, key, self.stddev)

    def dp_event(self) -> dp_event.DpEvent:
        """One release, in add/remove-one units (see accounting.sampled_gaussian_event)."""
        return dp_event.GaussianDpEvent(self.noise_multiplier)
