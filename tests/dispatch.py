"""Helpers to observe asynchronous dispatch: a slow jitted identity and a readiness check.

A host loop that dispatches step n+1 before step n is computed hands step n+1 inputs
that are not ready yet; `slow_identity` makes a step slow enough for that to show.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


@jax.jit
def slow_identity(x: jax.Array) -> jax.Array:
    """`x` after ~0.1 s of matrix products on 2 CPU cores."""
    m = jnp.full((256, 256), 1e-3, jnp.float32)
    m = jax.lax.fori_loop(0, 60, lambda _, a: a @ m, m)
    return x + (0.0 * jnp.sum(m)).astype(x.dtype)


def all_ready(tree) -> bool:
    """Whether every array of `tree` has been computed."""
    return all(x.is_ready() for x in jax.tree.leaves(tree))


def watch(step: Callable, ready: list[bool], slow_down: Callable) -> Callable:
    """`step(state, ...) -> (state, out)`, appending to `ready` whether each call's input
    state was computed, and slowing the state it returns with `slow_down`, so that the
    next call would catch it unfinished if the host did not wait."""

    def watched(state, *args, **kwargs):
        ready.append(all_ready(state))
        state, out = step(state, *args, **kwargs)
        return slow_down(state), out

    return watched


def record_progress_waits(monkeypatch, module, step_of: Callable) -> list[tuple]:
    """Replaces `module.Progress` with one that records, for each `update`, the pair
    (reported step, `step_of(wait_for)` or None when it waits for nothing); returns the list."""
    seen = []

    class Recording(module.Progress):
        def update(self, step, *, wait_for=None, **fields):
            seen.append((step, None if wait_for is None else int(step_of(wait_for))))
            super().update(step, wait_for=wait_for, **fields)

    monkeypatch.setattr(module, "Progress", Recording)
    return seen
