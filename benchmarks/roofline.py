"""How fast any code could run a workload here: XLA's FLOP count against a measured rate.

A speed goal "path A >= r x path B" is reachable only if A can do B's work in B's time
/ r. Both paths do the same arithmetic, so A's time is at least (FLOPs of the work) /
(the machine's best rate). The best rate is measured in the same run as the paths: a
large dense float32 matmul, the shape XLA runs fastest on any backend. A ceiling is
then `B's time x best rate / FLOPs`: the most any vectorisation could gain on this
machine, even if every FLOP ran at the matmul rate (elementwise FLOPs, counted too,
run slower, so the real ceiling is lower still).

FLOPs come from XLA's cost analysis of a compiled function without loops: XLA counts a
`while` body (`lax.scan`, `lax.map`) once whatever its trip count, so count one step and
multiply (`benchmarks.fed_round` counts one local step, `benchmarks.datalens_teachers` one
teacher's step).
"""

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function (XLA's count; None if not reported)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # some jax versions: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return None if flops is None or flops <= 0 else float(flops)


def cpu_flops(fn, *args) -> float | None:
    """FLOPs of one call of `fn(*args)` by XLA:CPU's count, whatever the default backend.

    The arguments are copied to the CPU device, so `jit` compiles `fn` for the CPU. On an
    NVIDIA H200 (2026-12-04) XLA:GPU counted the benchmark CNN's local step 28x lower than
    XLA:CPU (7.6 against 213 MFLOP), as if without its convolutions, which it runs as cuDNN
    calls; the matmul-only DataLens step counted about the same on both (26 and 29 MFLOP).
    `fn` must take its data as arguments: closed-over device arrays stay where they are.
    """
    cpu = jax.devices("cpu")[0]
    return xla_flops(jax.jit(fn).lower(*jax.device_put(args, cpu)).compile())


def matmul_flops_per_second(
    sizes: tuple[int, ...] | None = None, repeats: int = 5, dtype: Any = jnp.float32
) -> float:
    """The best rate of a jitted n x n matmul of `dtype` over `sizes` (median of `repeats`).

    Default sizes: 1024 and 2048 on a CPU, 4096 and 8192 on an accelerator (which a small
    matmul leaves idle). The ceilings use float32, the dtype of every model here; `python
    -m benchmarks.roofline` prints bfloat16's rate beside it, i.e. whether this machine
    would run a bfloat16 model's products faster.
    """
    if sizes is None:
        sizes = (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)
    if repeats < 1 or not sizes:
        raise ValueError(f"need repeats >= 1 and a size, got {repeats}, {sizes}")
    matmul = jax.jit(jnp.matmul)
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(n), (n, n), dtype)
        jax.block_until_ready(matmul(a, a))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, a))
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def ceiling(baseline_seconds: float, flops: float, flops_per_second: float) -> float:
    """The most `baseline / faster path` can be: the work at `flops_per_second` vs the baseline."""
    if baseline_seconds <= 0 or flops <= 0 or flops_per_second <= 0:
        raise ValueError(
            f"need positive seconds, flops and rate, got {baseline_seconds}, {flops}, "
            f"{flops_per_second}")
    return baseline_seconds * flops_per_second / flops


def main() -> None:
    """Prints the best matmul rate of float32 and of bfloat16, measured alternately."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    rates: dict[str, list[float]] = {name: [] for name in dtypes}
    for _ in range(3):
        for name, dtype in dtypes.items():
            rates[name].append(matmul_flops_per_second(dtype=dtype))
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    for name, rate in rates.items():
        ratio = statistics.median(rate) / statistics.median(rates["float32"])
        print(f"{name:>8}: {statistics.median(rate) / 1e9:8.1f} GFLOP/s "
              f"(median of 3 alternating runs; {ratio:.2f}x float32)")


if __name__ == "__main__":
    main()
