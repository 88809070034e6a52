"""Cohort sampling: Poisson sizes match q; fixed cohorts; chunk masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated import CohortSampler, Subpopulation
from dpfed.federated.sampling import cohort_chunk, pad_to_multiple


def test_poisson_cohort_sizes_match_the_sampling_rate():
    sampler = CohortSampler("poisson", population=200, expected_size=20)
    keys = jax.random.split(jax.random.key(0), 2000)
    counts = np.asarray(jax.vmap(lambda k: sampler.sample(k)[1])(keys))
    q, n = 0.1, 200
    mean_err = 4 * np.sqrt(n * q * (1 - q) / len(counts))
    assert abs(counts.mean() - n * q) < mean_err, f"mean cohort {counts.mean()} != qN = 20"
    assert abs(counts.var() / (n * q * (1 - q)) - 1) < 0.15, "variance should be Nq(1-q)"


def test_poisson_cohort_lists_distinct_clients_first():
    sampler = CohortSampler("poisson", population=50, expected_size=10)
    indices, count = sampler.sample(jax.random.key(1))
    chosen = np.asarray(indices)[: int(count)]
    assert len(set(chosen.tolist())) == int(count), "sampled clients must be distinct"


def test_fixed_sampling_needs_an_integer_cohort():
    with pytest.raises(ValueError, match="integer"):
        CohortSampler("fixed", population=50, expected_size=2.5)


def test_more_clients_per_round_than_clients_is_refused():
    with pytest.raises(ValueError, match="clients per round"):
        CohortSampler("poisson", population=5, expected_size=6)


def test_default_chunk_leaves_room_for_poisson_fluctuations():
    sampler = CohortSampler("poisson", population=1000, expected_size=64)
    assert sampler.default_chunk_size(8) == 88, "64 + 3 sqrt(64) = 88, a multiple of 8"
    assert CohortSampler("fixed", 1000, 64).default_chunk_size(8) == 64, "fixed: exactly m"


def test_cohort_chunks_cover_the_cohort_once_and_mask_the_rest():
    indices = pad_to_multiple(jnp.arange(10, 20), 4)  # 12 slots, count 7
    seen = []
    for chunk in range(3):
        idx, mask = cohort_chunk(indices, jnp.int32(7), jnp.int32(chunk), 4)
        seen += np.asarray(idx)[np.asarray(mask)].tolist()
    assert seen == list(range(10, 17)), f"chunks should list the 7 sampled clients once: {seen}"


def test_a_subpopulation_divides_by_q_times_the_members_estimate():
    sampler = CohortSampler("poisson", 30, 20, Subpopulation(population=100, members_estimate=25))
    assert sampler.rate == 0.2, "q = clients per round / the population, not / the clients"
    assert sampler.divisor == pytest.approx(5.0), "the mean divides by q x the estimate"
    assert CohortSampler("poisson", 30, 6).divisor == 6, "without one: the expected cohort"


def test_a_subpopulation_chunk_fits_the_clients_expected_cohort():
    sampler = CohortSampler("poisson", 400, 10, Subpopulation(1000, 400))
    assert sampler.default_chunk_size(1) == 10, "q N = 4 clients: 4 + 3 sqrt(4) = 10"


@pytest.mark.parametrize("clients, estimate, match", [
    (101, 50.0, "part of a population"), (50, 0.0, "members_estimate"),
    (50, float("inf"), "members_estimate")])
def test_an_impossible_subpopulation_is_refused(clients, estimate, match):
    with pytest.raises(ValueError, match=match):
        CohortSampler("poisson", clients, 10, Subpopulation(100, estimate))
