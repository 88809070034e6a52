r"""Time of one DP-FedAvg round: the engine vs a Python loop over clients.

  .venv/bin/python -m benchmarks.fed_round [--clients_per_round=16,64,256 --repeats=3]

Workload: the benchmark CNN (conv32-pool-conv64-pool-dense10) on MNIST-shaped 28x28x1
clients of --examples_per_client examples, --local_steps SGD steps of --local_batch_size,
a fixed cohort of m clients out of 4 x max(m), clip 1.0, noise multiplier 1.0.

- engine: `DpFedAvg.round`, one jitted call: cohort sampling, the clients (per device a
  `lax.scan` over groups of `--clients_per_device_step` clients, vmapped within a group;
  the cohort split over all devices), clipping, sum, noise, server step.
- loop: how FedJAX-style loops and many FL simulators run a round: the cohort drawn by
  one jitted call, then a Python loop that calls ONE jitted client update (the same
  `local_training` function, indexing the client's data and folding its key inside jit)
  once per sampled client, then a jitted clip-and-add into the running sum, then one
  jitted noise + server step. Its host work is the dispatch of 2 calls per client.

`--conv=xla,patches` runs the CNN with `nn.Conv` and with `dpfed.models.layers.Conv`
(the same function as patches @ kernel): XLA:CPU runs convolutions inside loops (the
client's `scan` over local steps, the engine's loop over clients) several times slower
than at top level, so the patch CNN's round is much faster on CPU in BOTH paths; the
"speedup" column is the engine's round time with `nn.Conv` over its time with each conv.
On a GPU too the engine is faster with patches (2.7x to 8.1x on an H200, WORKSPACE.md):
vmapped over clients with their own kernels, `nn.Conv` becomes grouped convolutions.
"one client" is the median time of one blocking call of the loop's jitted client update:
m x that is the compute floor of the loop, so loop / engine cannot exceed the loop's
per-client overhead when a client's work is compute-bound, as a CNN's is on 2 CPU cores.
"vmapped clients alone" is one jitted call of the same client update over the m clients
(and the engine's padding slots), whose data is gathered beforehand, grouped as the engine
groups them (`vmap` over `clients_per_device_step` clients, the groups one after another;
no sampling, gather, clipping, noise or server step), on one device: on one device the
engine's round minus it is what the round's other work costs.

Both paths run in ONE process, alternating (one round each per repeat), so machine load
hits them alike; figures are medians, the ratio is loop / engine (of the medians; beside
it the range of the repeats' own ratios, which holds it for an odd --repeats). Memory:
the XLA buffer sizes (arguments + outputs + temporaries) of the compiled engine round and
of the compiled client update, the RSS high-water growth while each path warms up (host),
and on an accelerator the device's peak bytes in use after the engine's warm-up
(`memory_stats`: cumulative over the run, sizes in increasing order, so the engine's peak
at that size).
Ceiling: the round's FLOPs (XLA:CPU's count of one local step x steps x m, on any
backend: `roofline.cpu_flops`; counted with `nn.Conv`, the fewest: patches add their
extraction's FLOPs) at the best rate
this run measured (`benchmarks.roofline`: a large float32 matmul) against the loop's
time, i.e. the most loop / engine could be on this machine whatever the engine's code;
"engine GFLOP/s" is the rate the engine reached.
Each size's table row is printed as soon as it is measured. --profile_dir=DIR then traces
--profile_rounds engine rounds (`jax.profiler`) into DIR/<conv>_<m> and prints, in an HTML
comment, each device line's busy time and the kernels the time went to
(`benchmarks.xplane`; on CPU the host's plane). Pass
--host_devices=N to split the CPU into N XLA devices (the engine then spreads the
cohort over them, as over the chips of a TPU host).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

from absl import app, flags

_SIZES = flags.DEFINE_list("clients_per_round", ["16", "64", "256"], "Cohort sizes m.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per path and size (median).")
_EXAMPLES = flags.DEFINE_integer("examples_per_client", 20, "Examples each client holds.")
_STEPS = flags.DEFINE_integer("local_steps", 5, "Local SGD steps per client.")
_BATCH = flags.DEFINE_integer("local_batch_size", 10, "Examples per local step.")
_WIDTH = flags.DEFINE_integer(
    "clients_per_device_step", None, "Engine: clients vmapped together (default: 1 on CPU).")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", None, "Split the CPU into this many XLA devices (set before JAX starts).")
_MODEL = flags.DEFINE_enum("model", "cnn", ["cnn", "mlp", "logreg"], "Client model.")
_CONV = flags.DEFINE_list("conv", ["patches"], "CNN convolutions to compare: xla, patches.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "Trace --profile_rounds engine rounds of each size into DIR/<conv>_<m> "
    "(jax.profiler) and print where the device's time went (benchmarks.xplane).")
_PROFILE_ROUNDS = flags.DEFINE_integer("profile_rounds", 3, "Engine rounds per trace.")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_peak_mib(jax) -> float | None:
    """The first device's peak bytes in use so far (None where unreported, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else (
        stats["peak_bytes_in_use"] / 2**20)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _xla_mib(compiled) -> float | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return total / 2**20


def main(argv: list[str]) -> None:
    del argv
    if _HOST_DEVICES.value:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={_HOST_DEVICES.value}")
    import jax  # noqa: PLC0415  (after XLA_FLAGS: the backend reads it when it starts)
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from benchmarks import roofline, workloads, xplane  # noqa: PLC0415
    from dpfed import models, privacy  # noqa: PLC0415
    from dpfed.federated import (  # noqa: PLC0415
        DpFedAvg,
        DpFedAvgConfig,
        OneClient,
        clip_update,
        local_training,
    )
    from dpfed.federated.classifier import classifier_loss  # noqa: PLC0415

    sizes = [int(s) for s in _SIZES.value]
    population = 4 * max(sizes)
    n = _EXAMPLES.value
    data = workloads.mnist_shaped_clients(population, n)
    # nn.Conv first: the other rows' speedup column divides by its round time.
    convs = sorted(_CONV.value, key=lambda c: c != "xla") if _MODEL.value == "cnn" else ["-"]
    server_opt = optax.sgd(1.0)
    clip, z = 1.0, 1.0
    mechanism = privacy.GaussianSumMechanism(clip, z)
    device_data = jax.device_put(data)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; model {_MODEL.value}, "
          f"{n} examples/client, {_STEPS.value} local steps of {_BATCH.value}; "
          f"{os.cpu_count()} CPUs")
    peak = roofline.matmul_flops_per_second()
    print(f"best rate (float32 matmul, this run): {peak / 1e9:.0f} GFLOP/s", flush=True)

    def profile(conv: str, m: int, run: Callable[[jax.Array], object], key: jax.Array) -> None:
        assert _PROFILE_DIR.value is not None  # called only with --profile_dir
        where = os.path.join(_PROFILE_DIR.value, f"{conv}_{m}")
        rounds = _PROFILE_ROUNDS.value
        with jax.profiler.trace(where):
            for r in range(rounds):
                jax.block_until_ready(run(jax.random.fold_in(key, 1000 + r)))
        plane = "/host:CPU" if jax.default_backend() == "cpu" else "/device:"
        report = xplane.report(where, per=rounds, plane_prefix=plane)
        print(f"<!-- profile of the engine's round, conv {conv}, {m} clients, per round:\n"
              f"{report}\n-->", flush=True)

    def measure(conv: str, m: int) -> None:
        extra = {} if conv == "-" else {"conv": conv}
        model = models.get_classifier(_MODEL.value, 10, **extra)
        params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        client_update = local_training(
            classifier_loss(model), optax.sgd(0.05), _STEPS.value, _BATCH.value)
        # XLA counts a scan's body once: count one local step, times the steps. Counted with
        # nn.Conv (the same function and params): patches add the extraction's FLOPs.
        counted = models.get_classifier(
            _MODEL.value, 10, **({} if conv == "-" else {"conv": "xla"}))
        one_step = local_training(classifier_loss(counted), optax.sgd(0.05), 1, _BATCH.value)

        # The loop's pieces, each jitted once.
        @jax.jit
        def cohort_of(key):
            return jax.random.choice(key, population, (m,), replace=False)

        @jax.jit
        def one_client(params, arrays, counts, i, key):
            client = OneClient(jax.tree_util.tree_map(lambda a: a[i], arrays), counts[i])
            return client_update(params, (), client, (), jax.random.fold_in(key, i)).params

        engine = DpFedAvg(client_update, server_opt, data, DpFedAvgConfig(
            clients_per_round=m, sampling="fixed", l2_clip=clip, noise_multiplier=z,
            clients_per_device_step=_WIDTH.value))
        # The engine's clients alone: the first chunk_size clients' data gathered beforehand
        # (the m clients and the slots padding them to the engine's groups), vmapped in the
        # engine's groups of clients_per_device_step, the groups one after another (as the
        # engine runs them: on CPU 1 client at a time), on one device; no sampling, gather,
        # clipping, noise or server step.
        width, slots = engine.clients_per_device_step, engine.chunk_size

        @jax.jit
        def clients_alone(params, arrays, counts, key):
            def update(client_arrays, count, k):
                return client_update(params, (), OneClient(client_arrays, count), (), k).params

            groups = jax.tree_util.tree_map(
                lambda a: a.reshape((slots // width, width) + a.shape[1:]),
                (arrays, counts, jax.random.split(key, slots)))
            return jax.lax.map(lambda group: jax.vmap(update)(*group), groups)

        cohort_arrays, cohort_counts = jax.tree_util.tree_map(
            lambda a: a[:slots], (device_data.arrays, device_data.counts))

        @jax.jit
        def clip_and_add(total, local, params):
            delta = jax.tree_util.tree_map(jnp.subtract, local, params)
            clipped, _, _ = clip_update(delta, clip)
            return jax.tree_util.tree_map(jnp.add, total, clipped)

        @jax.jit
        def server_step(params, opt_state, total, key, m):
            grad = jax.tree_util.tree_map(lambda t: -t / m, mechanism.privatize(total, key))
            updates, opt_state = server_opt.update(grad, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def loop_round(state, key, m):
            params, opt_state = state
            cohort = np.asarray(cohort_of(key))
            total = jax.tree_util.tree_map(jnp.zeros_like, params)
            for c in cohort:
                local = one_client(params, device_data.arrays, device_data.counts, int(c), key)
                total = clip_and_add(total, local, params)
            return server_step(params, opt_state, total, key, float(m))

        state = engine.init(params)
        loop_state = (params, server_opt.init(params))
        key = jax.random.key(m)
        paths: dict[str, Callable[[jax.Array], object]] = {
            "engine": lambda k: engine.round(state, k),
            "loop": lambda k: loop_round(loop_state, k, m),
            "one client": lambda k: one_client(
                params, device_data.arrays, device_data.counts, 0, k),
            "clients alone": lambda k: clients_alone(params, cohort_arrays, cohort_counts, k),
        }
        growth, device_peak = {}, {}
        for name, run in paths.items():  # warm-up: compile + one round
            rss0 = _rss_mib()
            jax.block_until_ready(run(key))
            growth[name] = _rss_mib() - rss0
            device_peak[name] = _device_peak_mib(jax)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(_REPEATS.value):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                start = time.perf_counter()
                jax.block_until_ready(paths[name](jax.random.fold_in(key, r)))
                times[name].append(time.perf_counter() - start)
        engine_s, loop_s, client_s, alone_s = (
            statistics.median(times[k])
            for k in ("engine", "loop", "one client", "clients alone"))
        # Each repeat's loop / engine (the two rounds of a repeat run back to back): how far
        # one repeat's ratio strays from the medians' ratio, to judge a ratio near a goal.
        per_repeat = [lo / en for lo, en in zip(times["loop"], times["engine"], strict=True)]
        client_mib = _xla_mib(one_client.lower(
            params, device_data.arrays, device_data.counts, 0, key).compile())
        engine_mib = _xla_mib(engine.lower(state, key).compile())
        step_flops = roofline.cpu_flops(  # XLA:GPU leaves cuDNN convolutions uncounted
            lambda p, arrays, count, k: one_step(p, (), OneClient(arrays, count), (), k).params,
            params, tuple(a[0] for a in data.arrays), data.counts[0], key)
        if step_flops is None:
            rate = ceiling = "-"
        else:
            round_flops = m * _STEPS.value * step_flops
            rate = f"{round_flops / engine_s / 1e9:.3g}"
            ceiling = f"{roofline.ceiling(loop_s, round_flops, peak):.1f}x"
        speedup = f"{engine_xla[m] / engine_s:.2f}x" if m in engine_xla else "-"
        if conv == "xla":
            engine_xla[m] = engine_s
        print(f"| {conv} | {m} | {engine_s:.3g} | {loop_s:.3g} | **{loop_s / engine_s:.2f}x** | "
              f"{min(per_repeat):.2f}-{max(per_repeat):.2f}x | "
              f"{m * client_s:.3g} | {alone_s:.3g} | {speedup} | {_mib(engine_mib)} | "
              f"{_mib(client_mib)} | "
              f"{growth['engine']:.0f} / {growth['loop']:.0f} | {_mib(device_peak['engine'])} | "
              f"{engine.chunk_size} | {engine.clients_per_device_step} | {rate} | {ceiling} |",
              flush=True)
        if _PROFILE_DIR.value:
            profile(conv, m, paths["engine"], key)

    print("\n| conv | clients/round | engine s/round | loop s/round | loop/engine "
          "| loop/engine per repeat (min-max) | m x one client s | vmapped clients alone s "
          "| engine speedup vs nn.Conv "
          "| engine XLA MiB "
          "| client-update XLA MiB | RSS growth engine / loop MiB | device peak MiB (engine) "
          "| chunk | per device step | engine GFLOP/s | loop/engine ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    engine_xla: dict[int, float] = {}
    for conv in convs:
        for m in sizes:
            measure(conv, m)
    print(f"\npeak RSS of the process: {_rss_mib():.0f} MiB")


if __name__ == "__main__":
    app.run(main)
