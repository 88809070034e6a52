"""The device mesh of federated work: one `clients` axis over every device of the job.

A laptop, one GPU host and a TPU pod run the same code: the cohort axis is split over
`client_mesh()`; in a multi-host job (`initialize_distributed`) `jax.devices()` lists
the devices of all hosts, so the same mesh spans the pod.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
CLIENTS = "clients"


def client_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `clients` over `devices` (default: all devices of the job)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (CLIENTS,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Copies every leaf of `tree` to every device of `mesh` (also across hosts).

    Each process must pass the same values (they are built from the same seed and data).
    """
    return _place(tree, NamedSharding(mesh, PartitionSpec()))


def split_clients(tree: PyTree, mesh: Mesh) -> PyTree:
    """Splits every leaf of `tree` along its first axis over the mesh's `clients` axis:
    each device holds one block (also across hosts). The first axes must divide evenly.

    Each process must pass the same values (they are built from the same seed and data).
    """
    return _place(tree, NamedSharding(mesh, PartitionSpec(CLIENTS)))


def _place(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """`tree` with every leaf placed by `sharding`, each process giving its own blocks."""

    def from_host(value: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def put(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # A typed key is placed as its raw key data (one trailing axis more), which each
            # process gives block by block like any array: `jax.device_put` refuses a
            # sharding over other hosts' devices.
            if len(sharding.spec) > leaf.ndim:
                raise ValueError(
                    f"cannot split a key array of shape {leaf.shape} along {sharding.spec}")
            placed = from_host(np.asarray(jax.random.key_data(leaf)))
            return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(leaf))
        return from_host(np.asarray(leaf))

    return jax.tree_util.tree_map(put, tree)


def split_cpu(count: int) -> None:
    """Makes JAX's CPU backend `count` devices (0: leave JAX's default / XLA_FLAGS).

    On a CPU-only machine a mesh over several CPU devices runs its shards' small
    computations side by side, on different cores, where one device would run them one
    after another (DataLens's teachers: 1.55x the steps per second with 2 devices on 2
    cores, WORKSPACE.md). Results then differ from a 1-device run by float rounding only.
    The DP-FedAvg engine gains nothing from it (WORKSPACE.md). Host loops on several CPU
    devices must wait for each step (`waits_for_each_step`). Accelerator backends are
    untouched. Must run before any other JAX call.

    Raises:
      ValueError: `count` < 0.
      RuntimeError: a JAX backend is already initialised.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count:
        jax.config.update("jax_num_cpu_devices", count)


def waits_for_each_step() -> bool:
    """Whether a host loop must wait for each step's results before dispatching the next.

    True on a CPU backend split into several devices. There XLA:CPU (jax 0.10.2)
    deadlocks when the host queues tens of multi-device programs with collectives ahead
    of the devices: one device never joins a round's all-reduce (the demo's command on 2
    CPU devices stopped at rounds 29 and 42, before its first evaluation read a result;
    waiting for each round, it ran through on 2, 3 and 8 devices: WORKSPACE.md). One
    device and accelerators keep asynchronous dispatch.
    """
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def settle(tree: PyTree) -> PyTree:
    """`tree`, waited for (`jax.block_until_ready`) where `waits_for_each_step()`.

    What a host loop calls on the results of each jitted step before dispatching the next.
    """
    return jax.block_until_ready(tree) if waits_for_each_step() else tree


def initialize_distributed(
    enabled: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when `enabled` (a multi-host job); returns enabled.

    On Cloud TPU VMs and SLURM every argument can stay None (JAX reads them from the
    environment); elsewhere pass the coordinator `host:port`, process count and id.
    Must run before any other JAX call.
    """
    if enabled:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    return enabled
