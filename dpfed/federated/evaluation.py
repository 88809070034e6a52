"""Federated evaluation: a metric of every client on its own data, vmapped and sharded.

`metric_fn(params, client_state, client, context) -> {name: scalar}` runs for all clients
at once (a `jax.vmap` over groups of `clients_per_step` clients, the groups under
`lax.map`, the clients split over the mesh), e.g. each client's accuracy on its own
examples. Evaluation shares the parameters across clients, so the vmapped model is one
batched forward pass (no per-client weights). These per-client numbers are computed from
raw client data: a simulation diagnostic, not a DP release.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpfed.federated.client_data import ClientData, OneClient, gather_clients
from dpfed.federated.mesh import CLIENTS, client_mesh

PyTree = Any
MetricFn = Callable[[PyTree, PyTree, OneClient, PyTree], dict[str, jax.Array]]


def make_client_evaluator(
    metric_fn: MetricFn, mesh: Mesh | None = None, clients_per_step: int = 16
) -> Callable[..., dict[str, jax.Array]]:
    """Returns jitted `evaluate(params, data, client_states=(), context=()) -> {name: [N]}`."""
    mesh = client_mesh() if mesh is None else mesh
    devices = mesh.shape[CLIENTS]

    def device_body(params, context, arrays, counts, states):
        def one(args):
            arrays, count, state = args
            return metric_fn(params, state, OneClient(arrays, count), context)

        local = counts.shape[0]
        return jax.lax.map(one, (arrays, counts, states), batch_size=min(clients_per_step, local))

    sharded = jax.shard_map(
        device_body, mesh=mesh,
        in_specs=(P(), P(), P(CLIENTS), P(CLIENTS), P(CLIENTS)), out_specs=P(CLIENTS))

    # Replicated results: in a multi-host job every process can then read all clients'.
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def evaluate(params, data: ClientData, client_states=(), context=()):
        n = data.counts.shape[0]
        padded = -(-n // devices) * devices
        idx = jnp.minimum(jnp.arange(padded), n - 1)
        chunk = gather_clients(data, idx)
        states = jax.tree_util.tree_map(lambda s: s[idx], client_states)
        out = sharded(params, context, chunk.arrays, chunk.counts, states)
        return jax.tree_util.tree_map(lambda x: x[:n], out)

    return evaluate


def summarize(per_client: dict[str, jax.Array], counts: np.ndarray | jax.Array) -> dict[str, float]:
    """Mean, 10th percentile and minimum of each per-client metric over clients with data."""
    has_data = np.asarray(counts) > 0
    out = {}
    for name, values in per_client.items():
        v = np.asarray(values, np.float64)[has_data]
        out.update({
            f"{name}_mean": float(np.mean(v)),
            f"{name}_p10": float(np.percentile(v, 10)),
            f"{name}_min": float(np.min(v)),
        })
    return out
