"""The client mesh and replication helpers."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated import client_mesh, initialize_distributed, replicate
from dpfed.federated import mesh as mesh_lib
from launch import multihost
from tests import dispatch
from tests.binary import ROOT


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


@pytest.mark.slow  # two processes, ~30 s; no caller passes keys across hosts yet
def test_replicate_and_split_place_typed_keys_over_the_devices_of_every_process():
    """A 2-process job (2 CPU devices each): `jax.device_put` refuses a sharding over
    another host's devices, so keys must be placed block by block like any array."""
    port = multihost.free_port()
    env = multihost.local_env(2)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.federated.mesh_keys_process", str(port), str(i)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, f"a process failed:\n{err[-3000:]}"
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    keys = jax.random.split(jax.random.key(7), 4)
    expected = {"devices": 4, "one": float(jax.random.uniform(jax.random.key(3))),
                "many": np.asarray(jax.vmap(jax.random.uniform)(keys)).tolist()}
    for result in results:
        assert result["devices"] == 4, "the mesh spans both processes' devices"
        np.testing.assert_allclose(result["one"], expected["one"], rtol=1e-6)
        np.testing.assert_allclose(result["many"], expected["many"], rtol=1e-6)
