"""Client sampling inside jit: Poisson (default) or a fixed-size cohort, with static shapes.

Poisson sampling (each client independently with probability q) is what the DP-FedAvg
accountant assumes (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"); a fixed cohort of m clients without replacement is accounted under
replace-one with its own DpEvent (`dpfed.privacy.sampled_gaussian_event`).

Static shapes without truncation: `sample` returns all N client slots, the first `count`
being the cohort. The round walks through them in chunks of `chunk_size` clients with a
`lax.while_loop` whose trip count is ceil(count / chunk_size) (the design of
`dpfed.privacy.chunked_sum`). A Poisson cohort larger than one chunk -- an *overflow* --
takes one more pass of the loop; no sampled client is ever dropped, so the released sum is
exactly the Poisson-sampled sum the accountant describes. Truncating it instead would
change the mechanism and void the Poisson analysis.

A `Subpopulation` makes the clients those of a larger population that take part, each
by its own data alone (e.g. one group of a debugging demo): rounds sample the population
at q = m / N and account for that q, so the guarantee does not need the number of clients
taking part, which is private.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from dp_accounting import dp_event

from dpfed import privacy


@dataclasses.dataclass(frozen=True)
class Subpopulation:
    """The sampled clients are those of a larger population of users that take part.

    Each user decides from its own data alone whether it takes part (e.g. one group of a
    debugging demo: the users whose own accuracy passes a given threshold). The server
    Poisson-samples the whole population at q = clients_per_round / population; a sampled
    user who does not take part contributes nothing, so sampling the taking-part clients
    at that q is the same mechanism, and its accounting needs q alone, not how many take
    part (private: it counts users by their data). The mean divides by q x
    `members_estimate`, a public or DP estimate of that number (e.g. a noisy count,
    whose release the caller records), never by the true count.

    Attributes:
      population: the number of users N that rounds sample from (public).
      members_estimate: the estimate of how many of them take part (> 0).
    """

    population: int
    members_estimate: float

    def __post_init__(self):
        if not (privacy.is_whole_number(self.population) and self.population >= 1):
            raise ValueError(f"population must be a whole number >= 1, got {self.population}")
        if not (0 < self.members_estimate < math.inf):
            raise ValueError(
                f"members_estimate must be > 0 and finite, got {self.members_estimate}")

    def divisor(self, expected_size: float) -> float:
        """What the noised sum is divided by when rounds sample the population with
        `expected_size` users expected: q x `members_estimate`, q = expected_size / N."""
        return expected_size / self.population * self.members_estimate


@dataclasses.dataclass(frozen=True)
class CohortSampler:
    """Draws each round's cohort from `population` clients.

    Attributes:
      scheme: "poisson" (rate expected_size / population) or "fixed" (exactly
        expected_size clients, uniformly without replacement).
      population: number of clients N; 0 only with a `subpopulation` (a group no user
        takes part in: every cohort is empty, and the round releases noise alone).
      expected_size: expected cohort size (Poisson) or cohort size (fixed); the server
        divides the noised sum by this number, never by the realised count. With a
        `subpopulation`, the expected cohort of the whole population.
      subpopulation: the clients are the taking-part users of a larger population
        (Poisson only); None: they are the population.
    """

    scheme: str
    population: int
    expected_size: float
    subpopulation: Subpopulation | None = None

    def __post_init__(self):
        privacy.Sampling(self.scheme)  # validates the name
        if not 0 < self.expected_size <= self.sampled_population:
            raise ValueError(
                f"need 0 < clients per round <= {self.sampled_population} clients, "
                f"got {self.expected_size}")
        if self.scheme == privacy.Sampling.FIXED and int(self.expected_size) != self.expected_size:
            raise ValueError(f"a fixed cohort needs an integer size, got {self.expected_size}")
        if self.subpopulation is not None:
            if self.scheme != privacy.Sampling.POISSON:
                raise ValueError("a subpopulation needs Poisson sampling: a fixed cohort of "
                                 "the population holds a random number of its members")
            if self.population > self.subpopulation.population:
                raise ValueError(
                    f"{self.population} clients cannot be part of a population of "
                    f"{self.subpopulation.population}")

    @property
    def sampled_population(self) -> int:
        """The users N that q is a rate of: the subpopulation's population, or the clients."""
        return self.population if self.subpopulation is None else self.subpopulation.population

    @property
    def rate(self) -> float:
        """The sampling probability q = expected_size / sampled_population."""
        return self.expected_size / self.sampled_population

    @property
    def divisor(self) -> float:
        """What the noised sum is divided by: the expected cohort (never the realised
        count); with a subpopulation, q x its `members_estimate`."""
        if self.subpopulation is None:
            return self.expected_size
        return self.subpopulation.divisor(self.expected_size)

    def sample(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(indices, count): the first `count` entries of `indices` are the cohort."""
        if self.scheme == privacy.Sampling.POISSON:
            return privacy.poisson_sample(key, self.population, self.rate)
        return privacy.fixed_size_sample(key, self.population, int(self.expected_size))

    def dp_event(self, inner: dp_event.DpEvent) -> dp_event.DpEvent:
        """The sampled event of one round whose release on the cohort is `inner`."""
        return privacy.sampled_gaussian_event(
            inner, sampling=self.scheme, population=self.sampled_population,
            expected_size=self.expected_size)

    def default_chunk_size(self, multiple: int) -> int:
        """Clients per pass: m (fixed) or m + 3 sqrt(m) (Poisson), a multiple of `multiple`.

        A Poisson cohort above it (probability ~0.1%) costs one more pass; it is capped
        at the population rounded up. With a subpopulation, m is q times the clients.
        """
        if self.population == 0:
            return multiple
        if self.scheme == privacy.Sampling.POISSON:
            expected = (self.expected_size if self.subpopulation is None
                        else self.rate * self.population)
            return privacy.poisson_chunk_size(expected, self.population, multiple)
        return int(math.ceil(self.expected_size / multiple) * multiple)


def cohort_chunk(
    indices: jax.Array, count: jax.Array, chunk: jax.Array, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """Chunk number `chunk` of the cohort: (client indices [chunk_size], mask [chunk_size]).

    `indices` must be padded to a multiple of `chunk_size`; masked slots hold index 0.
    """
    start = chunk * chunk_size
    idx = jax.lax.dynamic_slice(indices, (start,), (chunk_size,))
    mask = start + jnp.arange(chunk_size) < count
    return jnp.where(mask, idx, 0), mask


def pad_to_multiple(indices: jax.Array, multiple: int) -> jax.Array:
    """`indices` padded with zeros to a (non-zero) length that is a multiple of `multiple`."""
    n = indices.shape[0]
    return jnp.pad(indices, (0, max(-(-n // multiple), 1) * multiple - n))
