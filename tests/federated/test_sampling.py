"""Cohort sampling: Poisson sizes match q; fixed cohorts; chunk masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated import CohortSampler
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
