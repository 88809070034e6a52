"""Local batches drawn inside jit: only real examples, epochs over shuffled data."""

import jax
import numpy as np

from dpfed.federated import local_batch_indices


def draw(count, max_n=10, batch=4, steps=5, seed=0):
    idx, mask = local_batch_indices(jax.random.key(seed), count, max_n, batch, steps)
    return np.asarray(idx), np.asarray(mask)


def test_batches_never_index_padding():
    idx, mask = draw(count=7)
    assert idx.max() < 7, f"padding rows (>= count 7) were drawn: {idx.max()}"
    assert mask.all(), "a client with >= B examples fills every batch"


def test_local_steps_cycle_through_the_clients_examples_as_epochs():
    idx, _ = draw(count=6, batch=3, steps=4)  # 12 draws over 6 examples = 2 epochs
    counts = np.bincount(idx.reshape(-1), minlength=6)
    np.testing.assert_array_equal(counts, 2, err_msg="every example twice in two epochs")


def test_a_client_smaller_than_a_batch_masks_the_rest():
    idx, mask = draw(count=2, batch=5, steps=3)
    assert mask.sum(1).tolist() == [2, 2, 2], "each batch holds the 2 real examples once"
    assert set(idx[mask].tolist()) == {0, 1}, "only the real examples are unmasked"


def test_an_empty_client_has_fully_masked_batches():
    _, mask = draw(count=0)
    assert not mask.any(), "a client without data trains on nothing"


def test_the_key_shuffles_the_clients_examples():
    orders = [draw(count=8, max_n=8, batch=8, steps=1, seed=seed)[0][0].tolist() for seed in (0, 1)]
    assert sorted(orders[0]) == list(range(8)), f"one epoch holds each example once: {orders[0]}"
    assert orders[0] != orders[1], f"two keys gave the same batch order {orders[0]}"


def test_an_engine_refuses_counts_that_do_not_match_the_arrays():
    import optax
    import pytest

    from dpfed.federated import ClientData, DpFedAvg, DpFedAvgConfig
    from tests.federated import toy

    rows = np.ones((10, 1, 3), np.float32)
    config = DpFedAvgConfig(clients_per_round=4, l2_clip=1.0, noise_multiplier=0.0)
    for counts, match in [(np.ones(12, np.int32), "num_clients=12"),  # 2 clients without data
                          (np.full(10, 2, np.int32), "max_n=1")]:  # counts past the slots
        with pytest.raises(ValueError, match=match):
            DpFedAvg(toy.add_own_vector, optax.sgd(1.0), ClientData(rows, counts), config)
