r"""The benchmark CNN's gradient with `nn.max_pool` against `layers.max_pool_2x2`.

  .venv/bin/python -m benchmarks.max_pool [--clients=16,64 --repeats=7]

Workload: what the DP-FedAvg engine vmaps, the gradient of the benchmark CNN (patch
convolutions) on a batch of 10 MNIST-shaped examples, for m clients at once, each with its
own parameters; once with `flax.linen.max_pool` (XLA's `reduce_window`, whose gradient is
a select-and-scatter) and once with `dpfed.models.layers.max_pool_2x2` (a reshape and a
max, whose gradient is an elementwise select). Both run in one process, alternating;
figures are medians; the ratio is nn.max_pool's time / max_pool_2x2's. It also prints the
largest difference between the two gradients (0 unless a window holds tied values from
different inputs).
"""

from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from dpfed import models
from dpfed.models import layers

_CLIENTS = flags.DEFINE_list("clients", ["16", "64"], "Clients vmapped together (m).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per pool and size (median).")
_BATCH = flags.DEFINE_integer("batch", 10, "Examples per client.")

POOLS = {
    "nn.max_pool": lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)),
    "max_pool_2x2": layers.max_pool_2x2,
}


def clients_gradient(pool: str, m: int, batch: int):
    """A jitted gradient of m clients' losses (vmapped), with its parameters and data."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((m, batch, 28, 28, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, (m, batch)).astype(np.int32))
    model = models.CNN(10, conv="patches", pool=POOLS[pool])
    params = jax.vmap(lambda k: model.init(k, x[0]))(jax.random.split(jax.random.key(0), m))

    def loss(p, xb, yb):
        logits = model.apply(p, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    return jax.jit(jax.vmap(jax.grad(loss))), (params, x, y)


def main(argv: list[str]) -> None:
    del argv
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; batch {_BATCH.value}")
    print("| clients | nn.max_pool ms | max_pool_2x2 ms | ratio | largest gradient difference |")
    print("|---|---|---|---|---|")
    for m in (int(c) for c in _CLIENTS.value):
        runs = {pool: clients_gradient(pool, m, _BATCH.value) for pool in POOLS}
        grads = {pool: jax.block_until_ready(fn(*args)) for pool, (fn, args) in runs.items()}
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            *(jax.tree_util.tree_leaves(g) for g in grads.values()), strict=True))
        times: dict[str, list[float]] = {pool: [] for pool in POOLS}
        for r in range(_REPEATS.value):
            for pool in (POOLS if r % 2 == 0 else reversed(POOLS)):
                fn, args = runs[pool]
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[pool].append(time.perf_counter() - start)
        slow, fast = (statistics.median(times[pool]) for pool in POOLS)
        print(f"| {m} | {slow * 1e3:.2f} | {fast * 1e3:.2f} | **{slow / fast:.2f}x** "
              f"| {diff:.2g} |", flush=True)


if __name__ == "__main__":
    app.run(main)
