"""Federated evaluation: one metric per client, computed vmapped and sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated import (
    ClientData,
    client_mesh,
    evaluation,
    make_client_evaluator,
    make_example_evaluator,
    masked_mean,
    pack_clients,
    summarize,
)


def fraction_above(params, client_state, client, context):
    """Each client's fraction of examples above the threshold `params`."""
    return {"above": masked_mean((client.arrays > params).astype(jnp.float32), client.mask)}


def test_per_client_metrics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    values = rng.random((13, 9)).astype(np.float32)
    counts = rng.integers(1, 10, 13).astype(np.int32)
    evaluate = make_client_evaluator(fraction_above, clients_per_step=4)
    got = np.asarray(evaluate(jnp.float32(0.5), ClientData(values, counts))["above"])
    want = [np.mean(values[c, : counts[c]] > 0.5) for c in range(13)]
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg="each client's own fraction")


def test_one_device_and_eight_devices_agree():
    values = np.random.default_rng(1).random((10, 5)).astype(np.float32)
    data = ClientData(values, np.full(10, 5, np.int32))
    results = [
        np.asarray(make_client_evaluator(fraction_above, client_mesh(d))(jnp.float32(0.3), data)
                   ["above"])
        for d in (jax.devices()[:1], jax.devices())
    ]
    np.testing.assert_array_equal(results[0], results[1], err_msg="sharding changed a metric")


def test_per_client_metrics_come_back_on_every_device():
    # In a multi-host job a process can read only arrays it holds whole: a result split
    # over the clients axis failed there at the first evaluation (2-process run, 12-02).
    data = ClientData(np.ones((16, 5), np.float32), np.full(16, 5, np.int32))  # 2 per device
    out = make_client_evaluator(fraction_above)(jnp.float32(0.3), data)["above"]
    assert len(out.sharding.device_set) == jax.device_count(), "all 8 devices hold it"
    assert out.sharding.is_fully_replicated, f"replicated, not split: {out.sharding}"


def example_above(params, batch):
    """Whether each example of a batch is above the threshold `params`."""
    return {"above": (batch > params).astype(jnp.float32)}


def skewed_clients(seed=2):
    """13 clients of 0 to 40 examples (one empty), padding filled with 9.0 (above all)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 41, 13).astype(np.int32)
    counts[4] = 0
    values = np.full((13, 40), 9.0, np.float32)
    for c, n in enumerate(counts):
        values[c, :n] = rng.random(n)
    return ClientData(values, counts)


def test_pack_clients_keeps_real_examples_in_client_order():
    data = skewed_clients()
    packed, ids = pack_clients(data)
    assert packed.shape == (int(data.counts.sum()),), "one row per real example"
    assert np.all(packed < 1.0), "no padding row (9.0) was packed"
    np.testing.assert_array_equal(ids, np.repeat(np.arange(13), data.counts),
                                  err_msg="client by client, each example's own client")


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_example_means_equal_the_per_client_evaluator(batch_size):
    data = skewed_clients()
    got = np.asarray(make_example_evaluator(
        example_above, data, batch_size=batch_size)(jnp.float32(0.5))["above"])
    want = np.asarray(make_client_evaluator(fraction_above)(jnp.float32(0.5), data)["above"])
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=(
        "a client's mean over its packed examples must equal its masked mean; padding "
        "(9.0, above the threshold) must not count"))
    assert got[4] == 0.0, "a client without examples gets 0 (summarize leaves it out)"


def test_mean_false_gives_each_clients_sum():
    data = skewed_clients()
    got = make_example_evaluator(example_above, data, mean=False)(jnp.float32(0.5))["above"]
    want = [np.sum(data.arrays[c, : data.counts[c]] > 0.5) for c in range(13)]
    np.testing.assert_array_equal(np.asarray(got), want, err_msg="each client's count above 0.5")


def test_rows_padding_the_packed_examples_count_for_no_client():
    data = ClientData(np.zeros((3, 5), np.float32), np.array([5, 0, 4], np.int32))
    # 9 examples over 8 devices: 2 slots each, 7 of them padding (client index 0).
    got = make_example_evaluator(lambda params, b: {"one": jnp.ones(b.shape)}, data)(())
    np.testing.assert_array_equal(np.asarray(got["one"]), [1.0, 0.0, 1.0], err_msg=(
        "each client's mean of 1.0 over its own examples; padding added to client 0 "
        "would raise its mean above 1"))


def test_example_means_on_one_device_and_eight_agree():
    data = skewed_clients(3)
    results = [
        np.asarray(make_example_evaluator(example_above, data, client_mesh(d), batch_size=8)(
            jnp.float32(0.3))["above"])
        for d in (jax.devices()[:1], jax.devices())
    ]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6,
                               err_msg="splitting the examples over devices changed a mean")


def test_example_means_come_back_on_every_device():
    out = make_example_evaluator(example_above, skewed_clients())(jnp.float32(0.3))["above"]
    assert out.sharding.is_fully_replicated, f"replicated, not split: {out.sharding}"
    assert len(out.sharding.device_set) == jax.device_count(), "all 8 devices hold it"


def test_example_batches_hold_at_most_batch_size_examples():
    # The bound on memory: no device runs example_fn on more than batch_size examples.
    sizes = []

    def recording(params, batch):
        sizes.append(batch.shape[0])  # at trace time: the static batch size
        return example_above(params, batch)

    data = skewed_clients()  # 243 examples: 31 per device of 8
    make_example_evaluator(recording, data, batch_size=7)(jnp.float32(0.5))
    assert sizes and max(sizes) <= 7, f"example_fn saw batches of {sizes}, more than 7"


def test_the_packed_examples_are_split_over_the_devices_not_copied(monkeypatch):
    placed, split = [], evaluation.split_clients

    def spy(tree, mesh):
        placed.append(split(tree, mesh))
        return placed[-1]

    monkeypatch.setattr(evaluation, "split_clients", spy)
    data = skewed_clients()
    make_example_evaluator(example_above, data, batch_size=8)
    assert placed, "make_example_evaluator must place the examples with split_clients"
    for leaf in jax.tree.leaves(placed[0]):
        rows = {shard.data.shape[0] for shard in leaf.addressable_shards}
        assert rows == {leaf.shape[0] // jax.device_count()}, (
            f"each device holds its block of {leaf.shape[0]} rows, not all: {rows}")


def test_summary_skips_clients_without_data():
    stats = summarize({"acc": np.array([1.0, 0.0, 0.5])}, np.array([3, 0, 2]))
    assert stats["acc_mean"] == pytest.approx(0.75), "the empty client is left out"
    assert stats["acc_min"] == pytest.approx(0.5), "min over clients with data"


def test_summary_p10_is_the_tenth_percentile():
    stats = summarize({"acc": np.arange(11) / 10}, np.ones(11, np.int32))
    assert stats["acc_p10"] == pytest.approx(0.1), f"p10 of 0, 0.1, ..., 1: {stats}"
