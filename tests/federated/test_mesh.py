"""The client mesh and replication helpers."""

import jax
import numpy as np

from dpfed.federated import client_mesh, initialize_distributed, replicate


def test_client_mesh_spans_every_device_on_one_axis():
    mesh = client_mesh()
    assert mesh.axis_names == ("clients",) and mesh.size == jax.device_count(), "one axis, all"


def test_replicate_puts_a_full_copy_on_every_device():
    tree = replicate({"x": np.arange(6.0)}, client_mesh())
    shards = tree["x"].addressable_shards
    assert len(shards) == jax.device_count(), "one shard per device"
    assert all(np.array_equal(s.data, np.arange(6.0)) for s in shards), "each a full copy"


def test_distributed_initialization_is_off_by_default():
    assert initialize_distributed(False) is False, "single-host runs must not initialize"
