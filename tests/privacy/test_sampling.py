"""Tests of in-jit Poisson/fixed-size sampling and the chunked sum over a sample."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.privacy import (
    bernoulli_at_most,
    bernoulli_threshold,
    chunked_sum,
    fixed_size_sample,
    poisson_chunk_size,
    poisson_sample,
)


@pytest.mark.parametrize(
    "rate", [1e-9, 1e-6, 3e-6, 2.0**-24, 0.003, 0.05, 0.1, 1 / 3, 5 / 67, 0.5, 1 - 1e-9])
def test_bernoulli_threshold_never_selects_above_the_rate(rate):
    # The ledger records q; a sampler selecting more often under-counts eps.
    # jax.random.bernoulli selects with probability ceil(q 2**23) / 2**23: 1.07 q at 1e-6.
    threshold = int(bernoulli_threshold(rate))
    exact, realised = Fraction(rate), Fraction(threshold, 2**32)
    assert realised <= exact, f"rate {rate!r}: selects with probability {float(realised)!r}"
    assert exact - realised < Fraction(1, 2**32) + exact / 2**22, (
        f"rate {rate!r}: selects with probability {float(realised)!r}, needlessly below it")


def test_bernoulli_at_most_selects_the_bits_below_the_threshold_eager_or_traced():
    key = jax.random.key(4)
    bits = np.asarray(jax.random.bits(key, (5000,), jnp.uint32))
    traced = jax.jit(lambda k, r: bernoulli_at_most(k, r, (5000,)))
    for rate in (0.0, 0.3, 1.0, 1.5):
        expected = bits < int(bernoulli_threshold(rate)) if rate < 1 else np.ones(5000, bool)
        np.testing.assert_array_equal(np.asarray(bernoulli_at_most(key, rate, (5000,))),
                                      expected, err_msg=f"rate {rate}: not the bits below t")
        np.testing.assert_array_equal(np.asarray(traced(key, jnp.float32(rate))), expected,
                                      err_msg=f"rate {rate}: a traced rate selects otherwise")


def test_a_python_rate_just_below_one_is_not_rounded_up_to_one():
    # float32(1 - 1e-9) is 1.0; key 493805 draws bits above 2**32 - 256 for record 4 (a
    # search), so that record is one a rate below 1 must be able to leave out.
    key = jax.random.key(493805)
    assert int(jax.random.bits(key, (64,), jnp.uint32)[4]) >= 2**32 - 256, "the key moved"
    assert not bool(bernoulli_at_most(key, 1 - 1e-9, (64,))[4]), (
        "a rate below 1 selected every record, as if it were 1")


def test_poisson_sample_does_not_take_a_record_that_float32_bernoulli_would():
    # Key 15270 draws bits for record 396 that fall between this module's threshold for
    # q = 5/67 and the one jax.random.bernoulli's float32 uniform implies (found by a search).
    key, rate = jax.random.key(15270), 5 / 67
    assert bool(jax.random.bernoulli(key, rate, (1000,))[396]), "the search's key moved"
    indices, count = poisson_sample(key, 1000, rate)
    taken = np.asarray(indices[: int(count)])
    assert 396 not in taken, "poisson_sample selects above its rate (float32 bernoulli)"
    np.testing.assert_array_equal(
        taken, np.flatnonzero(np.asarray(bernoulli_at_most(key, rate, (1000,)))),
        err_msg="poisson_sample must take exactly the records bernoulli_at_most selects")


def test_poisson_sample_sizes_match_rate():
    keys = jax.random.split(jax.random.key(0), 2000)
    counts = np.asarray(jax.vmap(lambda k: poisson_sample(k, 1000, 0.05)[1])(keys))
    mean, var = counts.mean(), counts.var()
    assert abs(mean - 50) < 1.0, f"mean sample size {mean} is not n*q=50"
    assert abs(var / (1000 * 0.05 * 0.95) - 1) < 0.15, f"variance {var} is not binomial"


def test_poisson_indices_are_sorted_unique_and_padded():
    indices, count = poisson_sample(jax.random.key(1), 200, 0.3)
    sel = np.asarray(indices[: int(count)])
    assert np.all(np.diff(sel) > 0), "selected indices must be unique and increasing"
    assert indices.shape == (200,), "static shape: one slot per record"


def test_fixed_size_sample_is_without_replacement():
    indices, count = fixed_size_sample(jax.random.key(2), 50, 20)
    assert int(count) == 20 and len(set(np.asarray(indices).tolist())) == 20


def _sum_of_selected(indices, count, chunk):
    values = jnp.arange(1, indices.shape[0] + 1, dtype=jnp.float32) ** 2

    def fn(idx, mask):
        return {"total": jnp.sum(values[idx] * mask), "n": jnp.sum(mask)}

    return jax.jit(lambda i, c: chunked_sum(fn, i, c, chunk))(indices, count), values


def test_chunked_sum_covers_each_selected_record_once_even_when_overflowing():
    indices, count = poisson_sample(jax.random.key(3), 97, 0.5)
    for chunk in (4, 16, 97, 200):  # chunks far smaller than the sample: many iterations
        out, values = _sum_of_selected(indices, count, chunk)
        expected = float(np.sum(np.asarray(values)[np.asarray(indices[: int(count)])]))
        assert float(out["n"]) == int(count), f"chunk={chunk}: processed {out['n']} != {count}"
        assert float(out["total"]) == expected, f"chunk={chunk}: sum covers wrong records"


def test_chunked_sum_of_empty_sample_is_zero():
    out, _ = _sum_of_selected(jnp.zeros(10, jnp.int32), jnp.int32(0), 4)
    assert float(out["n"]) == 0 and float(out["total"]) == 0


@pytest.mark.parametrize(
    "expected,multiple",
    [(0.0, 1), (-3.0, 1), (float("nan"), 1), (10.0, 0)],
)
def test_poisson_chunk_size_refuses_an_empty_expected_sample_or_a_multiple_below_one(
    expected, multiple
):
    # Unchecked, E <= 0 gives a chunk of <= 0 records (chunked_sum divides by it), NaN
    # fails in math.ceil with an unrelated message, and multiple 0 divides by zero.
    with pytest.raises(ValueError, match="need expected > 0 and multiple >= 1") as error:
        poisson_chunk_size(expected, population=100, multiple=multiple)
    assert f"got {expected}, {multiple}" in str(error.value), (
        f"the refusal must name the values given: {error.value}")
