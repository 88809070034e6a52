r"""A client's local steps as a rolled `lax.scan` against unrolled ones.

  .venv/bin/python -m benchmarks.local_unroll [--unroll=1,2,5 --local_steps=5,20 --repeats=5]

Workload: the DP-FedAvg classifier's client update (`dpfed.federated.local_training`,
the benchmark CNN with the library's default convolution, `--local_steps` SGD steps of
10 examples, 20 per client) with the scan over its local steps unrolled by each
`--unroll` (1: a loop of single steps; >= the steps: no loop). Per setting it times:
- one client: one jitted, blocking call of the client update (what a Python loop over
  clients calls once per client);
- the engine: `DpFedAvg.round` with a fixed cohort of `--clients` (clients, clipping,
  noise, server step in one jitted call);
- the compile time of each (`jit(...).lower(...).compile()`).
All settings of one --local_steps run in ONE process, alternating (one call each per
repeat), so machine load hits them alike; times are medians and "vs unroll 1" is the time
with unroll 1 over the time with this unroll (> 1: faster). The last column is the
largest difference of the engine round's new parameters from unroll 1's (the same
function: float rounding only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from benchmarks import workloads
from dpfed import models
from dpfed.federated import ClientData, DpFedAvg, DpFedAvgConfig, OneClient, local_training
from dpfed.federated.classifier import classifier_loss

_UNROLL = flags.DEFINE_list("unroll", ["1", "2", "5"], "Local steps per scan iteration.")
_STEPS = flags.DEFINE_list("local_steps", ["5", "20"], "Local SGD steps per client.")
_CLIENTS = flags.DEFINE_integer("clients", 64, "The engine's fixed cohort size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per setting (median).")
_EXAMPLES = 20
_BATCH = 10
PyTree = Any
T = TypeVar("T")


def _timed(make: Callable[[], T]) -> tuple[T, float]:
    """`make()` (a compilation) and the seconds it took."""
    start = time.perf_counter()
    made = make()
    return made, time.perf_counter() - start


def setting(
    model: nn.Module, params: PyTree, data: ClientData, steps: int, unroll: int, m: int
) -> dict:
    """The compiled one-client update and engine round of one unroll, with their inputs."""
    update = local_training(classifier_loss(model), optax.sgd(0.05), steps, _BATCH, unroll)
    first = OneClient(tuple(jnp.asarray(a[0]) for a in data.arrays), jnp.int32(_EXAMPLES))
    one_client_fn = jax.jit(lambda p, c, k: update(p, (), c, (), k).params)
    one_client, client_compile_s = _timed(
        lambda: one_client_fn.lower(params, first, jax.random.key(1)).compile())
    engine = DpFedAvg(update, optax.sgd(1.0), data, DpFedAvgConfig(
        clients_per_round=m, sampling="fixed", l2_clip=1.0, noise_multiplier=1.0))
    state = engine.init(params)
    round_fn, engine_compile_s = _timed(lambda: engine.compile(state, jax.random.key(2)))
    return {
        "one client": lambda k: one_client(params, first, k),
        "engine": lambda k: round_fn(state, k)[0].params,
        "compile": (client_compile_s, engine_compile_s),
    }


def main(argv: list[str]) -> None:
    del argv
    m = _CLIENTS.value
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; benchmark CNN "
          f"(conv auto), batch {_BATCH}; engine: {m} clients per round")
    print("| local steps | unroll | one client ms | vs unroll 1 | engine s/round | vs unroll 1 "
          "| compile s (client / engine) | largest param difference from unroll 1 |")
    print("|---|---|---|---|---|---|---|---|")
    data = workloads.mnist_shaped_clients(4 * m, _EXAMPLES)
    model = models.CNN(10, conv="auto")
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    for steps in (int(s) for s in _STEPS.value):
        unrolls = sorted({min(int(u), steps) for u in _UNROLL.value} | {1})
        runs = {u: setting(model, params, data, steps, u, m) for u in unrolls}
        key = jax.random.key(3)
        outputs = {u: jax.block_until_ready(run["engine"](key)) for u, run in runs.items()}
        times: dict[tuple[int, str], list[float]] = {
            (u, path): [] for u in unrolls for path in ("one client", "engine")}
        for r in range(_REPEATS.value):
            for u in (unrolls if r % 2 == 0 else reversed(unrolls)):
                for path in ("one client", "engine"):
                    start = time.perf_counter()
                    jax.block_until_ready(runs[u][path](jax.random.fold_in(key, r)))
                    times[u, path].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in times.items()}
        for u in unrolls:
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
                jax.tree_util.tree_leaves(outputs[u]), jax.tree_util.tree_leaves(outputs[1]),
                strict=True))
            client_c, engine_c = runs[u]["compile"]
            print(f"| {steps} | {u} | {median[u, 'one client'] * 1e3:.1f} "
                  f"| **{median[1, 'one client'] / median[u, 'one client']:.2f}x** "
                  f"| {median[u, 'engine']:.3g} "
                  f"| **{median[1, 'engine'] / median[u, 'engine']:.2f}x** "
                  f"| {client_c:.1f} / {engine_c:.1f} | {diff:.2g} |", flush=True)


if __name__ == "__main__":
    app.run(main)
