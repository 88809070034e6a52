"""TopAgg (DataLens, Wang et al. CCS 2021): votes, thresholding, sensitivity, noise, event."""

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from hypothesis import strategies as st

from dpfed.generative.datalens import TopAgg, teacher_vote

_vote = jax.jit(teacher_vote, static_argnums=2)
_votes = jax.jit(jax.vmap(teacher_vote, in_axes=(0, 0, None, None)), static_argnums=2)


def test_aggregate_of_hand_made_votes_without_noise():
    votes = jnp.array(
        [
            [1, 1, -1, 0, 0, 1],
            [1, 0, -1, 1, 0, -1],
            [1, 1, -1, 0, -1, 0],
            [1, -1, 0, -1, 1, 0],
        ],
        jnp.float32,
    )  # sums: 4, 1, -3, 0, 0, 0
    for beta, expected in ((0.5, [1, 0, -1, 0, 0, 0]), (0.2, [1, 1, -1, 0, 0, 0])):
        topagg = TopAgg(k=3, b=1.0, sigma=0.0, beta=beta)  # threshold beta * 4
        got = jax.jit(topagg.aggregate)(votes, jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_vote_has_exactly_k_nonzeros_in_plus_minus_one():
    grads = jax.random.normal(jax.random.key(0), (64, 100))
    grads = grads.at[:, :30].set(0.0)  # ties at zero must not add or drop non-zeros
    keys = jax.random.split(jax.random.key(1), 64)
    for k in (1, 80):
        votes = np.asarray(_votes(grads, keys, k, 0.5))
        assert set(np.unique(votes)) <= {-1.0, 0.0, 1.0}
        np.testing.assert_array_equal((votes != 0).sum(axis=1), k)


def test_vote_keeps_the_top_k_coordinates_and_signs_large_gradients():
    grad = jnp.array([0.1, -5.0, 0.2, 3.0, -0.05, 4.0])
    vote = np.asarray(_vote(grad, jax.random.key(0), 3, 1.0))
    # |g| >= b: P(+1) = 1/2 + clip(g)/2b is 0 or 1, so the sign is deterministic.
    np.testing.assert_array_equal(vote, [0, -1, 0, 1, 0, 1])


def test_stochastic_sign_is_unbiased_for_clipped_gradient():
    grad = jnp.array([0.5, -0.25, 2.0, 0.0])
    keys = jax.random.split(jax.random.key(3), 20000)
    votes = _votes(jnp.broadcast_to(grad, (20000, 4)), keys, 4, 1.0)
    np.testing.assert_allclose(np.asarray(votes.mean(axis=0)), [0.5, -0.25, 1.0, 0.0], atol=0.02)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    shape=st.sampled_from([(8, 1), (8, 3), (8, 8), (33, 5), (33, 20)]),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_two_votes_of_one_teacher_differ_by_at_most_sqrt_4k(shape, data, seed):
    dim, k = shape
    floats = st.floats(-10, 10, allow_nan=False, width=32)
    grad_a = data.draw(hnp.arrays(np.float32, dim, elements=floats))
    grad_b = data.draw(hnp.arrays(np.float32, dim, elements=floats))
    b = data.draw(st.floats(1e-3, 10))
    key_a, key_b = jax.random.split(jax.random.key(seed))
    vote_a = _vote(jnp.asarray(grad_a), key_a, k, b)
    vote_b = _vote(jnp.asarray(grad_b), key_b, k, b)
    distance = float(jnp.linalg.norm(vote_a - vote_b))
    assert distance <= math.sqrt(4 * k) + 1e-6
    assert TopAgg(k=k, b=b, sigma=1.0, beta=0.1).sensitivity == pytest.approx(math.sqrt(4 * k))


def test_sensitivity_bound_is_attained():
    grad = jnp.array([3.0, -2.0, 1.0, 0.0])
    k = 3
    a = _vote(grad, jax.random.key(0), k, 0.1)
    b = _vote(-grad, jax.random.key(0), k, 0.1)
    assert float(jnp.linalg.norm(a - b)) == pytest.approx(math.sqrt(4 * k))


def test_noise_std_on_the_vote_sum_is_sigma():
    topagg = TopAgg(k=5, b=1.0, sigma=37.0, beta=0.1)
    vote_sum = jnp.full((200, 784), 3.0)
    noisy = jax.jit(topagg.privatize)(vote_sum, jax.random.key(11))
    residual = np.asarray(noisy - vote_sum).ravel()
    assert residual.mean() == pytest.approx(0.0, abs=0.3)
    assert residual.std() == pytest.approx(37.0, rel=0.01)


def test_event_is_gaussian_with_multiplier_sigma_over_sqrt_4k():
    topagg = TopAgg(k=300, b=1e-4, sigma=800.0, beta=0.8)
    assert topagg.noise_multiplier == pytest.approx(800.0 / math.sqrt(1200))
    assert topagg.dp_event() == dp_event.GaussianDpEvent(800.0 / math.sqrt(1200))


@pytest.mark.parametrize(
    "kwargs",
    # k = 2.5, NaN or True passed `k < 1` before: a wrong or NaN event (found by an audit).
    [dict(k=0), dict(k=2.5), dict(k=math.nan), dict(k=True), dict(b=0.0), dict(sigma=-1.0),
     dict(sigma=math.inf), dict(beta=-0.1)],
)
def test_invalid_parameters_are_refused(kwargs):
    args = dict(k=3, b=1.0, sigma=1.0, beta=0.5) | kwargs
    with pytest.raises(ValueError):
        TopAgg(**args)
