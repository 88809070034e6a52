"""Local training on one client: optimiser steps on its own data, as a `lax.scan`.

`local_training` builds the client update hook of `DpFedAvg` from a loss function. The
client starts from the broadcast shared parameters (and, optionally, its own persistent
parameters: e.g. the DPD-fVAE encoder of Pfitzner & Arnrich 2022 stays on the client),
runs `num_steps` optimiser steps on masked batches of its data, and returns the new shared
parameters; the engine turns them into the update (local - global) and privatises it.
Shared parameters get a fresh client optimiser state every round (FedAvg); the client's
own parameters keep theirs across rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpfed.federated.client_data import OneClient, local_batch_indices

PyTree = Any
# loss_fn(shared, local, batch, mask, context, key) -> (scalar loss, dict of scalar metrics).
LossFn = Callable[
    [PyTree, PyTree, PyTree, jax.Array, PyTree, jax.Array], tuple[jax.Array, dict]]


class ClientOutput(NamedTuple):
    """What a client update returns: new shared params, new client state, metrics."""

    params: PyTree
    state: PyTree
    metrics: dict[str, jax.Array]


class LocalState(NamedTuple):
    """Parameters a client keeps across rounds, and their optimiser state."""

    params: PyTree
    opt_state: PyTree


def init_local_states(
    local_params: PyTree, optimizer: optax.GradientTransformation, num_clients: int
) -> LocalState:
    """Every client starts from `local_params`: a `LocalState` with a leading client axis."""
    state = LocalState(local_params, optimizer.init(local_params))
    return jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (num_clients,) + jnp.shape(x)), state)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over the True entries of `mask` (0 when there are none)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def local_training(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: int,
    unroll: int = 2,
) -> Callable[[PyTree, PyTree, OneClient, PyTree, jax.Array], ClientOutput]:
    """A client update: `num_steps` steps of `optimizer` on batches of `batch_size`.

    Args:
      loss_fn: `loss_fn(shared, local, batch, mask, context, key) -> (loss, metrics)`;
        `batch` is the client's arrays indexed to `[batch_size, ...]`, `mask` marks the real
        examples (use `masked_mean`), `local` is the client's own parameters (`()` when
        there are none), `context` the read-only broadcast (e.g. a GAN's generator).
      optimizer: the client optimiser (e.g. `optax.sgd(client_lr)`).
      num_steps: local steps per round.
      batch_size: examples per local step.
      unroll: local steps per iteration of the `lax.scan` (`lax.scan`'s `unroll`: the
        same function; XLA may round it differently, though the benchmark CNN's floats
        stayed equal). 2, the default, was the fastest of 1, 2, 4 and 5 on 2 CPU cores in
        `benchmarks/local_unroll.py` (the benchmark CNN, 5 or 20 steps): 1.05x to 1.25x
        faster than 1 for one client, 1.09x to 1.38x for the engine's 64-client round;
        unrolled further, it gained less or lost, and compile time grew.

    Returns:
      `client_update(shared, client_state, client, context, key) -> ClientOutput`, where
      `client_state` is a `LocalState` or `()` and the metrics hold the mean local loss.
    """
    if num_steps < 1 or batch_size < 1 or unroll < 1:
        raise ValueError(f"need num_steps, batch_size, unroll >= 1, got {num_steps}, "
                         f"{batch_size}, {unroll}")

    def client_update(shared, client_state, client: OneClient, context, key) -> ClientOutput:
        max_n = jax.tree_util.tree_leaves(client.arrays)[0].shape[0]
        batch_key, step_key = jax.random.split(key)
        indices, masks = local_batch_indices(batch_key, client.count, max_n, batch_size, num_steps)
        has_local = bool(jax.tree_util.tree_leaves(client_state))
        local = client_state.params if has_local else ()
        local_opt = client_state.opt_state if has_local else optimizer.init(())

        def step(carry, inputs):
            params, opt_state = carry
            idx, mask, k = inputs
            batch = jax.tree_util.tree_map(lambda a: a[idx], client.arrays)

            def objective(p):
                return loss_fn(p[0], p[1], batch, mask, context, k)

            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
            # Separate optimiser states: the shared one restarts each round, the local persists.
            new_params, new_opt = [], []
            for g, s, p in zip(grads, opt_state, params, strict=True):
                updates, s = optimizer.update(g, s, p)
                new_params.append(optax.apply_updates(p, updates))
                new_opt.append(s)
            return (tuple(new_params), tuple(new_opt)), (loss, metrics)

        init = ((shared, local), (optimizer.init(shared), local_opt))
        keys = jax.random.split(step_key, num_steps)
        (params, opt_state), (losses, metrics) = jax.lax.scan(
            step, init, (indices, masks, keys), unroll=unroll)
        new_state = LocalState(params[1], opt_state[1]) if has_local else client_state
        metrics = {name: jnp.mean(v) for name, v in metrics.items()}
        return ClientOutput(params[0], new_state, {"loss": jnp.mean(losses), **metrics})

    return client_update
