"""Local training: steps on the client's own masked batches; client-kept parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpfed.federated import LocalState, OneClient, init_local_states, local_training, masked_mean


def mean_loss(shared, local, batch, mask, context, key):
    """0.5 |shared + local - x|^2 averaged over the real examples of the batch."""
    residual = shared + (local if isinstance(local, jax.Array) else 0.0) - batch
    return masked_mean(0.5 * jnp.sum(residual**2, -1), mask), {}


# batch 3 > the client's 2 examples: an example repeats in a masked slot, which must not count.
@pytest.mark.parametrize("batch_size", [2, 3])
def test_local_sgd_on_a_quadratic_moves_towards_the_client_mean(batch_size):
    data = jnp.array([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])  # row 3 is padding
    client = OneClient(data, jnp.int32(2))
    update = local_training(mean_loss, optax.sgd(0.5), num_steps=3, batch_size=batch_size)
    out = update(jnp.zeros(2), (), client, (), jax.random.key(0))
    # Each full-batch step halves the distance to the mean (2, 3): 1 - 0.5^3 of the way.
    np.testing.assert_allclose(np.asarray(out.params), [1.75, 2.625], rtol=1e-6,
                               err_msg="3 steps of lr 0.5 towards the mean of the 2 real rows")
    assert float(out.metrics["loss"]) == pytest.approx(3.84375), (
        "the mean of the 3 steps' losses (7.5, 2.625, 1.40625) is reported")


def test_client_parameters_and_their_optimizer_state_persist():
    optimizer = optax.adam(0.1)
    states = init_local_states(jnp.zeros(2), optimizer, num_clients=3)
    assert states.params.shape == (3, 2), "one row of local params per client"
    update = local_training(mean_loss, optimizer, num_steps=2, batch_size=1)
    state = jax.tree_util.tree_map(lambda x: x[0], states)
    client = OneClient(jnp.array([[1.0, 1.0]]), jnp.int32(1))
    out = update(jnp.zeros(2), state, client, (), jax.random.key(0))
    assert isinstance(out.state, LocalState), "the client's own state comes back"
    assert int(out.state.opt_state[0].count) == 2, "its Adam step count carries over"
    assert float(jnp.abs(out.state.params).sum()) > 0, "its own params were trained"


def test_local_training_needs_a_step_and_a_batch():
    with pytest.raises(ValueError, match="num_steps"):
        local_training(mean_loss, optax.sgd(0.1), num_steps=0, batch_size=2)


def test_local_training_refuses_an_unroll_below_one():
    with pytest.raises(ValueError, match="unroll"):
        local_training(mean_loss, optax.sgd(0.1), num_steps=2, batch_size=2, unroll=0)


@pytest.mark.parametrize("unroll", [2, 3, 5])  # 3 does not divide the 5 steps
def test_unrolled_local_steps_give_the_rolled_result(unroll):
    data = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [9.0, 9.0]])
    client = OneClient(data, jnp.int32(3))
    state = jax.tree_util.tree_map(
        lambda x: x[0], init_local_states(jnp.ones(2), optax.adam(0.1), num_clients=1))
    outs = [
        local_training(mean_loss, optax.adam(0.1), num_steps=5, batch_size=2, unroll=u)(
            jnp.zeros(2), state, client, (), jax.random.key(7))
        for u in (1, unroll)
    ]
    for rolled, unrolled in zip(*(jax.tree_util.tree_leaves(o) for o in outs), strict=True):
        np.testing.assert_allclose(
            np.asarray(unrolled), np.asarray(rolled), rtol=1e-6,
            err_msg=f"unroll={unroll} runs the same 5 steps (batches, keys, both optimiser "
                    "states) as a rolled scan")


def test_masked_mean_averages_the_masked_rows_only():
    values = jnp.array([1.0, 2.0, 6.0])
    assert float(masked_mean(values, jnp.array([True, True, False]))) == 1.5, (
        "the mean of the two masked-in rows is 1.5: masked rows must not count in the divisor"
    )
    assert float(masked_mean(values, jnp.zeros(3, bool))) == 0.0, "no rows: 0"
