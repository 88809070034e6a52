"""Toy clients for engine tests: client c's update is a vector stored in its data."""

import jax
import jax.numpy as jnp
import numpy as np

from dpfed.federated import ClientData, ClientOutput

__all__ = ["ClientOutput", "add_own_vector", "count_visits", "params_of", "vector_clients"]


def vector_clients(deltas: np.ndarray) -> ClientData:
    """Client c holds one row, deltas[c]; its update (with `add_own_vector`) is that row."""
    deltas = np.asarray(deltas, np.float32)
    return ClientData(arrays=deltas[:, None, :], counts=np.ones(len(deltas), np.int32))


def add_own_vector(shared, client_state, client, context, key):
    """Client update: local params = shared + the client's own vector (a known update)."""
    del context, key
    new = shared + client.arrays[0]
    return ClientOutput(new, client_state, {"norm": jnp.linalg.norm(client.arrays[0])})


def count_visits(shared, client_state, client, context, key):
    """Client update that leaves the params alone and counts its visits in its state."""
    del client, context, key
    return ClientOutput(shared, client_state + 1, {})


def params_of(dim: int) -> jax.Array:
    return jnp.zeros((dim,), jnp.float32)
