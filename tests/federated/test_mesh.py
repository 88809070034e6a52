"""The client mesh and replication helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated import client_mesh, initialize_distributed, replicate
from dpfed.federated import mesh as mesh_lib
from tests import dispatch


def test_client_mesh_spans_every_device_on_one_axis():
    mesh = client_mesh()
    assert mesh.axis_names == ("clients",) and mesh.size == jax.device_count(), "one axis, all"


def test_replicate_puts_a_full_copy_on_every_device():
    tree = replicate({"x": np.arange(6.0)}, client_mesh())
    shards = tree["x"].addressable_shards
    assert len(shards) == jax.device_count(), "one shard per device"
    assert all(np.array_equal(s.data, np.arange(6.0)) for s in shards), "each a full copy"


def test_split_clients_gives_each_device_its_block_only():
    values = np.arange(16.0).reshape(8, 2)
    shards = mesh_lib.split_clients({"x": values}, client_mesh())["x"].addressable_shards
    blocks = sorted((s.index[0].start, s.data.tolist()) for s in shards)
    assert blocks == [(d, [values[d].tolist()]) for d in range(8)], (
        f"device d holds row d alone, not a copy of all rows: {blocks[:2]}")


def test_distributed_initialization_is_off_by_default():
    assert initialize_distributed(False) is False, "single-host runs must not initialize"


def test_split_cpu_checks_its_count_and_refuses_after_jax_started():
    jax.devices()  # the backend is up
    mesh_lib.split_cpu(0)  # 0 leaves JAX alone: no error, whenever it is called
    with pytest.raises(ValueError, match="count"):
        mesh_lib.split_cpu(-1)
    with pytest.raises(RuntimeError, match="before backends are initialized"):
        mesh_lib.split_cpu(2)


def test_host_loops_wait_for_each_step_only_on_several_cpu_devices(monkeypatch):
    assert jax.default_backend() == "cpu" and jax.local_device_count() == 8, "conftest's CPU"
    assert mesh_lib.waits_for_each_step(), "8 CPU devices: XLA:CPU can deadlock unless waited on"
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    assert not mesh_lib.waits_for_each_step(), "one CPU device keeps asynchronous dispatch"
    monkeypatch.setattr(jax, "local_device_count", lambda: 8)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not mesh_lib.waits_for_each_step(), "accelerators keep asynchronous dispatch"


def test_settle_returns_the_tree_computed_on_several_cpu_devices():
    tree = {"x": dispatch.slow_identity(jnp.ones(3))}
    settled = mesh_lib.settle(tree)
    assert dispatch.all_ready(settled), "on 8 CPU devices settle must wait for the arrays"
    np.testing.assert_array_equal(settled["x"], np.ones(3), err_msg="settle changes nothing")
