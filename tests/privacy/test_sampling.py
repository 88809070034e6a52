"""Tests of in-jit Poisson/fixed-size sampling and the chunked sum over a sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.privacy import chunked_sum, fixed_size_sample, poisson_chunk_size, poisson_sample


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
