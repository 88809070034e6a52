"""Tests for dpfed.train.seeds: 64-bit root keys, and the seeds derived from them."""

import jax
import numpy as np
import pytest

from dpfed.generative import selection
from dpfed.generative.datalens import partition
from dpfed.train import seeds

_32_BIT_SEEDS = [0, 1, 7, 2**16 + 3, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1,
                 *np.random.default_rng(0).integers(0, 2**32, 8).tolist()]


@pytest.mark.parametrize("seed", _32_BIT_SEEDS)
def test_root_key_of_a_32_bit_seed_is_jax_random_key_bit_for_bit(seed):
    ours, jax_key = seeds.root_key(seed), jax.random.key(seed)
    np.testing.assert_array_equal(
        jax.random.key_data(ours), jax.random.key_data(jax_key),
        err_msg=f"seed {seed}: a run seeded before 64-bit seeds would draw other numbers")
    assert jax.random.key_impl(ours) == jax.random.key_impl(jax_key), "another PRNG impl"
    np.testing.assert_array_equal(
        jax.random.normal(jax.random.fold_in(ours, 3), (4,)),
        jax.random.normal(jax.random.fold_in(jax_key, 3), (4,)),
        err_msg=f"seed {seed}: the same key data must draw the same noise")


@pytest.mark.parametrize("low", [0, 5, 2**32 - 1])
def test_seeds_that_differ_only_in_the_high_32_bits_give_distinct_keys(low):
    # jax.random.key keeps only the low 32 bits: 2**32 + 5 would be seed 5, and a
    # 64-bit secret would have 32 bits of secrecy.
    data = {high: tuple(np.asarray(jax.random.key_data(seeds.root_key(high << 32 | low))))
            for high in (0, 1, 2**31, 2**32 - 1)}
    assert len(set(data.values())) == len(data), f"keys collide across the high half: {data}"
    assert data[2**32 - 1] == (2**32 - 1, low), "key data must be [seed >> 32, seed & 0xFFFFFFFF]"


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, True, "3"])
def test_root_key_refuses_what_is_not_a_64_bit_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        seeds.root_key(seed)


def test_root_key_takes_numpy_integers():
    np.testing.assert_array_equal(jax.random.key_data(seeds.root_key(np.uint64(2**63 + 9))),
                                  [2**31, 9], err_msg="a numpy uint64 seed must keep all bits")


def test_group_seeds_of_a_64_bit_seed_keep_64_bits_and_of_a_32_bit_one_stay_as_they_were():
    assert selection.group_seed(3, "low") == 1007328038, "group seeds of 32-bit seeds changed"
    secret = [selection.group_seed(2**40 + i, group) for i in range(4) for group in ("low", "high")]
    assert len(set(secret)) == len(secret), f"group seeds collide: {secret}"
    assert all(2**32 <= s < 2**64 for s in secret), (
        f"a group's seed derived from a 64-bit seed must not be a guessable 31-bit one: {secret}")


def test_datalens_hash_partition_takes_a_64_bit_seed_and_keeps_its_32_bit_partitions():
    images, labels = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 2
    five = partition.partition_teachers(images, labels, 4, seed=5)
    assert [p.tolist() for p in five] == [  # as with the signed 8-byte key before
        [0, 7, 8, 10, 11, 17, 19], [1, 3, 4, 12, 18], [9, 15, 16], [2, 5, 6, 13, 14]], five
    parts = partition.partition_teachers(images, labels, 4, seed=2**64 - 1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(20)), "not a partition"
    again = partition.partition_teachers(images, labels, 4, seed=2**63 + 5)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, again, strict=True)), (
        "the hash key must depend on the seed's high bits")
