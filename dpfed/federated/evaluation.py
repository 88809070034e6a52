"""Federated evaluation: a metric of every client on its own data, vmapped and sharded.

`metric_fn(params, client_state, client, context) -> {name: scalar}` runs for all clients
at once (a `jax.vmap` over groups of `clients_per_step` clients, the groups under
`lax.map`, the clients split over the mesh), e.g. each client's accuracy on its own
examples. Evaluation shares the parameters across clients, so the vmapped model is one
batched forward pass (no per-client weights). These per-client numbers are computed from
raw client data: a simulation diagnostic, not a DP release.

Where the metric is a mean over a client's own examples of a per-example figure (accuracy,
loss), `make_example_evaluator` computes it from all clients' real examples packed back to
back: O(total examples) model calls, where `make_client_evaluator` runs the model on every
client's `max_n` padded slots (O(clients x max_n), several times the work when a few
clients hold many examples, as in a Dirichlet label-skew split).
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
from dpfed.federated.mesh import CLIENTS, client_mesh, split_clients

PyTree = Any
MetricFn = Callable[[PyTree, PyTree, OneClient, PyTree], dict[str, jax.Array]]
ExampleFn = Callable[[PyTree, PyTree], dict[str, jax.Array]]


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


def pack_clients(data: ClientData) -> tuple[PyTree, np.ndarray]:
    """All clients' real examples back to back (leaves `[N, ...]`, N = sum of counts,
    client by client) and the int32 client index of each; padding is left out."""
    counts = np.asarray(data.counts)
    real = np.arange(data.max_n)[None, :] < counts[:, None]
    arrays = jax.tree_util.tree_map(lambda a: np.asarray(a)[real], data.arrays)
    return arrays, np.repeat(np.arange(counts.shape[0], dtype=np.int32), counts)


def make_example_evaluator(
    example_fn: ExampleFn,
    data: ClientData,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    mean: bool = True,
) -> Callable[[PyTree], dict[str, jax.Array]]:
    """Returns `evaluate(params) -> {name: [num_clients]}`: each client's mean of a
    per-example figure over its own examples of `data` (0 for a client without any), or
    with `mean=False` its sum (e.g. a count of correct examples, exact in float32 up to
    2^24).

    `example_fn(params, batch) -> {name: [b]}` takes a batch of examples (the leaves of
    `data.arrays` without their client axis). The packed examples (`pack_clients`) are
    split over the mesh's devices and run in batches of at most `batch_size`; each client's
    sums are added up over devices. The packed copy is split over the mesh once, here.
    """
    mesh = client_mesh() if mesh is None else mesh
    devices = mesh.shape[CLIENTS]
    arrays, client_ids = pack_clients(data)
    num_clients, n = data.num_clients, client_ids.shape[0]
    per_device = max(-(-n // devices), 1)
    num_batches = -(-per_device // batch_size)
    batch = -(-per_device // num_batches)  # the smallest batch that fits: least padding
    padded = devices * num_batches * batch

    def pad(a):
        return np.concatenate([a, np.zeros((padded - n, *a.shape[1:]), a.dtype)])

    placed = split_clients(  # each device holds its block of the examples only
        (jax.tree_util.tree_map(pad, arrays), pad(np.ones(n, bool)), pad(client_ids)), mesh)
    divisors = np.maximum(np.asarray(data.counts, np.float32), 1.0) if mean else np.float32(1)

    def device_body(params, arrays, real, ids):
        batches = jax.tree_util.tree_map(lambda a: a.reshape(num_batches, batch, *a.shape[1:]),
                                         arrays)
        values = jax.lax.map(lambda b: example_fn(params, b), batches)
        sums = {
            name: jax.ops.segment_sum(jnp.where(real, v.reshape(-1), 0.0), ids, num_clients)
            for name, v in values.items()
        }
        return jax.lax.psum(sums, CLIENTS)

    sharded = jax.shard_map(
        device_body, mesh=mesh, in_specs=(P(), P(CLIENTS), P(CLIENTS), P(CLIENTS)),
        out_specs=P())

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def per_client(params, arrays, real, ids):
        sums = sharded(params, arrays, real, ids)
        return {name: s / divisors for name, s in sums.items()}

    return lambda params: per_client(params, *placed)


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
