"""Federated evaluation: one metric per client, computed vmapped and sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated import ClientData, client_mesh, make_client_evaluator, masked_mean, summarize


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


def test_summary_skips_clients_without_data():
    stats = summarize({"acc": np.array([1.0, 0.0, 0.5])}, np.array([3, 0, 2]))
    assert stats["acc_mean"] == pytest.approx(0.75), "the empty client is left out"
    assert stats["acc_min"] == pytest.approx(0.5), "min over clients with data"


def test_summary_p10_is_the_tenth_percentile():
    stats = summarize({"acc": np.arange(11) / 10}, np.ones(11, np.int32))
    assert stats["acc_p10"] == pytest.approx(0.1), f"p10 of 0, 0.1, ..., 1: {stats}"
