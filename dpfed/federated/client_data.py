"""Client data on the device: padded per-client arrays, counts, and local batches.

Every client's examples sit in one array `[num_clients, max_n, ...]` (zero padding past
the client's count), so a cohort is a gather and local batches are drawn inside jit with
masks (DESIGN.md, principle 3). Padding never enters a batch: batch positions index only
the first `count` examples, and positions beyond a short client's count are masked out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpfed.data.partition import FederatedData

PyTree = Any


class ClientData(NamedTuple):
    """The federated dataset: padded arrays with a leading client axis, and counts.

    Attributes:
      arrays: a pytree whose leaves are `[num_clients, max_n, ...]` (e.g. (images, labels)).
      counts: `[num_clients]` int32, how many leading rows of each client are real.
    """

    arrays: PyTree
    counts: jax.Array | np.ndarray

    @property
    def num_clients(self) -> int:
        """How many clients the data holds (the length of `counts`)."""
        return int(self.counts.shape[0])

    @property
    def max_n(self) -> int:
        """Each client's padded example count (the arrays' second axis)."""
        return int(jax.tree_util.tree_leaves(self.arrays)[0].shape[1])


class OneClient(NamedTuple):
    """What a client update sees: its own padded arrays (`[max_n, ...]`) and its count."""

    arrays: PyTree
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count: python/mypy#3950

    @property
    def mask(self) -> jax.Array:
        """`[max_n]` bool, True for the client's real examples."""
        max_n = jax.tree_util.tree_leaves(self.arrays)[0].shape[0]
        return jnp.arange(max_n) < self.count


def check_client_data(data: ClientData) -> ClientData:
    """`data`, after checking that every leaf is `[num_clients, max_n, ...]` and that
    every count lies in [0, max_n]. A mismatch is silent inside jit: a client index past
    the arrays gathers fill values, a count past max_n repeats the last slot.

    Raises:
      ValueError: naming the leaf or the count that breaks the layout.
    """
    counts = np.asarray(data.counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(
            f"counts must be an integer [num_clients], got {counts.dtype} {counts.shape}")
    leaves = jax.tree_util.tree_leaves(data.arrays)
    if not leaves:
        raise ValueError("arrays hold no leaf")
    expected = (counts.shape[0], leaves[0].shape[1] if leaves[0].ndim > 1 else None)
    for leaf in leaves:
        if leaf.ndim < 2 or tuple(leaf.shape[:2]) != expected:
            raise ValueError(
                f"every leaf must be [num_clients={expected[0]}, max_n={expected[1]}, ...] "
                f"like counts and the first leaf, got shape {leaf.shape}")
    if counts.size and (counts.min() < 0 or counts.max() > expected[1]):
        raise ValueError(f"counts must lie in [0, max_n={expected[1]}], got "
                         f"[{counts.min()}, {counts.max()}]")
    return data


def from_federated(federated: FederatedData) -> ClientData:
    """`ClientData` with arrays `(images, labels)` from a `dpfed.data.FederatedData`."""
    return ClientData(
        arrays=(np.asarray(federated.images), np.asarray(federated.labels)),
        counts=np.asarray(federated.counts, np.int32),
    )


def gather_clients(data: ClientData, indices: jax.Array) -> ClientData:
    """The clients `indices` (any shape `[k]`) as a `ClientData` of k clients."""
    arrays = jax.tree_util.tree_map(lambda a: jnp.take(a, indices, axis=0), data.arrays)
    return ClientData(arrays, jnp.take(data.counts, indices, axis=0))


def local_batch_indices(
    key: jax.Array, count: jax.Array, max_n: int, batch_size: int, num_steps: int
) -> tuple[jax.Array, jax.Array]:
    """Positions of `num_steps` local batches over one client's `count` examples.

    The client's real examples are shuffled once and read in that order, cycling
    (epochs): step s takes shuffled positions s*B .. s*B+B-1 modulo `count`. When the
    client has fewer than B examples, the batch holds each once and masks the rest.

    Returns:
      (indices [num_steps, B] int32 into the padded `[max_n]` axis, mask [num_steps, B]).
    """
    real = jnp.arange(max_n) < count
    order = jnp.argsort(jnp.where(real, jax.random.uniform(key, (max_n,)), 2.0))
    slot = jnp.arange(num_steps)[:, None] * batch_size + jnp.arange(batch_size)[None, :]
    positions = slot % jnp.maximum(count, 1)
    mask = jnp.broadcast_to(jnp.arange(batch_size)[None, :] < count, slot.shape)
    return order[positions].astype(jnp.int32), mask
