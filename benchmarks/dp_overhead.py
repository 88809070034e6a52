r"""Time of one DP-SGD step vs one non-private step (dpfed, and Opacus if installed).

  make bench        # installs requirements-bench.txt (torch, opacus), then runs:
  .venv/bin/python -m benchmarks.dp_overhead [--batch_size=256 --steps=20 --warmup=3]

The benchmark CNN (conv32-pool-conv64-pool-dense10) on mnist5k 28x28x1, SGD, clip 1.0,
noise multiplier 1.1. All contenders run in ONE process, round-robin (one step each per
round, the order rotating every round), so machine load hits them alike; the printed
figures are medians over the timed rounds and the ratios of those medians (and, as a
check, the medians of the per-round ratios). Rows:

- dpfed non-private: one fixed batch, batched gradient of the mean loss, jitted.
- dpfed DP (vmap): the same batch; `vmap(grad)` per-example gradients, clip, sum, noise,
  update (`dpfed.privacy.clipped_grad_sum`), jitted.
- dpfed DP (fast): the same, clipped sum from one batched backward pass
  (`dpfed.privacy.fast_clipping.clipped_grad_sum_fast`).
- dpfed DP Poisson: the full `dpfed.train.dpsgd.make_train_step` step: in-jit Poisson
  sampling from the train split, gather, physical chunks of B + 3 sqrt(B) rounded up to
  8 (so it processes MORE than B examples by design), `while_loop`, noise, update.
- torch non-private / Opacus DP (hooks) / Opacus DP (ghost): the same architecture in
  torch (NCHW), when torch and opacus import; torch threads left at their default.

Memory: the process's peak RSS (`resource.getrusage`), the RSS high-water growth during
each row's warm-up (rows warm up one after another, so this is order-dependent), and
for JAX rows the XLA temp buffer size of the compiled step. Timings say nothing unless
compared within one run: read the ratios.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from dpfed import data, models, privacy
from dpfed.privacy.fast_clipping import clipped_grad_sum_fast
from dpfed.train import cli, dpsgd

_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size (expected size for Poisson).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per row, after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per row (compilation included).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time torch / Opacus when they import.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: batch 8, 2 steps, 1 warm-up.")

DATASET = "mnist5k"
L2_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 0.05
MIB = 2**20


@dataclasses.dataclass
class Row:
    """One contender: `step()` runs one training step and returns when it is done."""

    name: str
    step: Callable[[], None]
    xla_temp_bytes: int | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    warmup_rss_growth: int = 0

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)


def jax_rows(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[Row]:
    """The dpfed rows: non-private, DP (vmap), DP (fast), full Poisson DP-SGD step."""
    model = models.get_classifier("cnn", 10)
    optimizer = optax.sgd(LEARNING_RATE)
    mechanism = privacy.GaussianSumMechanism(L2_CLIP, NOISE_MULTIPLIER)
    x, y = jnp.asarray(images[:batch_size]), jnp.asarray(labels[:batch_size])
    params = model.init(jax.random.key(0), x[:1])
    mask = jnp.ones(batch_size)

    def batch_losses(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, batch[0]), batch[1])

    def update(state, grad):
        updates, opt_state = optimizer.update(grad, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

    # The batch (and mask) are arguments of each step, as in training: closed over, they
    # would be HLO constants that XLA folds (the fast row's patches of x, computed once at
    # compile time), which neither torch's rows nor the Poisson row get.
    def nonprivate(state, x, y, mask, key):
        del mask, key
        return update(state, jax.grad(lambda p: jnp.mean(batch_losses(p, (x, y))))(state["params"]))

    def private(clipped_sum):
        def step(state, x, y, mask, key):
            grad_sum = mechanism.privatize(clipped_sum(state["params"], x, y, mask), key)
            return update(state, jax.tree_util.tree_map(lambda g: g / batch_size, grad_sum))

        return step

    def vmap_sum(p, x, y, mask):
        loss = dpsgd.example_loss(model)
        return privacy.clipped_grad_sum(loss, p, (x, y), mask, L2_CLIP).grad_sum

    def fast_sum(p, x, y, mask):
        return clipped_grad_sum_fast(batch_losses, p, (x, y), mask, L2_CLIP).grad_sum

    rows = []
    steps = {
        "dpfed non-private": nonprivate,
        "dpfed DP (vmap)": private(vmap_sum),
        "dpfed DP (fast)": private(fast_sum),
    }
    for name, fn in steps.items():
        state = {"params": params, "opt_state": optimizer.init(params)}
        rows.append(_jax_row(name, jax.jit(fn), state, (x, y, mask)))

    config = dpsgd.DpSgdConfig(
        batch_size=batch_size,
        optimizer="sgd",
        learning_rate=LEARNING_RATE,
        l2_clip=L2_CLIP,
        noise_multiplier=NOISE_MULTIPLIER,
        sampling="poisson",
    )
    full = dpsgd.make_train_step(model, optimizer, config, len(labels), mechanism)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    chunk = dpsgd.default_physical_batch(batch_size)
    name = f"dpfed DP Poisson (make_train_step, chunk {chunk})"
    rows.append(_jax_row(name, full, state, (jnp.asarray(images), jnp.asarray(labels))))
    return rows


def _jax_row(name: str, step_fn, state, data_args: tuple) -> Row:
    """A Row that advances `state` with `step_fn(state, *data_args, key)` each call."""
    base_key = jax.random.key(1)
    compiled = step_fn.lower(state, *data_args, base_key).compile()  # compiled once, here
    holder = {"state": state, "count": 0}

    def step():
        key = jax.random.fold_in(base_key, holder["count"])
        holder["state"] = jax.block_until_ready(compiled(holder["state"], *data_args, key))
        holder["count"] += 1

    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    return Row(name, step, xla_temp_bytes=temp)


def torch_rows(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[Row]:
    """torch non-private, Opacus DP-SGD (per-sample grads by hooks) and Opacus ghost
    clipping, on the same CNN and batch. Empty when torch or opacus does not import."""
    try:
        import torch
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError:
        return []
    from torch import nn

    # Opacus's hooks make torch warn on every backward pass; the warning is harmless here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    torch.manual_seed(0)
    x = torch.from_numpy(images[:batch_size].transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels[:batch_size].astype(np.int64))

    def cnn():
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (x.shape[2] // 4) * (x.shape[3] // 4), 10),
        )

    def sgd(module):
        return torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)

    def trainer(module, optimizer, criterion):
        def step():
            optimizer.zero_grad()
            criterion(module(x), y).backward()
            optimizer.step()

        return step

    dp_args = {
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": L2_CLIP,
        "expected_batch_size": batch_size,
    }
    plain = cnn()
    hooks = GradSampleModule(cnn())
    ghost = GradSampleModuleFastGradientClipping(cnn(), max_grad_norm=L2_CLIP)
    ghost_optimizer = DPOptimizerFastGradientClipping(sgd(ghost), **dp_args)
    ghost_loss = DPLossFastGradientClipping(ghost, ghost_optimizer, nn.CrossEntropyLoss())
    hooks_optimizer = DPOptimizer(sgd(hooks), **dp_args)
    return [
        Row("torch non-private", trainer(plain, sgd(plain), nn.CrossEntropyLoss())),
        Row("Opacus DP (hooks)", trainer(hooks, hooks_optimizer, nn.CrossEntropyLoss())),
        Row("Opacus DP (ghost clipping)", trainer(ghost, ghost_optimizer, ghost_loss)),
    ]


def measure(rows: list[Row], steps: int, warmup: int) -> None:
    """Warms every row up, then times `steps` rounds of one step per row, round-robin."""
    for row in rows:
        before = _max_rss()
        for _ in range(warmup):
            row.step()
        row.warmup_rss_growth = _max_rss() - before
    for round_index in range(steps):
        shift = round_index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            start = time.perf_counter()
            row.step()
            row.times.append(time.perf_counter() - start)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _ratio(rows: dict[str, Row], top: str, bottom: str) -> str:
    a, b = rows[top], rows[bottom]
    paired = statistics.median(t / u for t, u in zip(a.times, b.times, strict=True))
    return f"{a.median_ms / b.median_ms:.2f} (median of per-round ratios {paired:.2f})"


def machine_description(load_average: str) -> list[str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return [
        f"machine: {os.cpu_count()} CPUs ({model}), load average at the start {load_average}",
        f"jax {jax.__version__} on {jax.devices()[0].platform}, python {platform.python_version()}",
    ]


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def report(
    rows: list[Row], batch_size: int, steps: int, warmup: int, notes: list[str], load: str
) -> str:
    """The printed table, ratios and memory figures."""
    lines = [
        f"DP-SGD step overhead: CNN conv32-pool-conv64-pool-dense10 on {DATASET}, batch "
        f"{batch_size}, SGD, clip {L2_CLIP}, noise {NOISE_MULTIPLIER}; median of {steps} "
        f"round-robin steps after {warmup} warm-up",
        *machine_description(load),
        *notes,
        "",
        f"| {'step':<46} | median ms | p10-p90 ms    | XLA temp MiB | warm-up RSS +MiB |",
        f"|{'-' * 48}|-----------|---------------|--------------|------------------|",
    ]
    for row in rows:
        p10, p90 = np.percentile(np.asarray(row.times) * 1e3, [10, 90])
        temp = "-" if row.xla_temp_bytes is None else f"{row.xla_temp_bytes / MIB:.1f}"
        lines.append(
            f"| {row.name:<46} | {row.median_ms:9.1f} | {p10:6.1f}-{p90:6.1f} | {temp:>12} | "
            f"{row.warmup_rss_growth / MIB:16.1f} |"
        )
    by_name = {row.name: row for row in rows}
    base = "dpfed non-private"
    lines.append("")
    for name in ("dpfed DP (vmap)", "dpfed DP (fast)"):
        lines.append(f"ratio {name} / dpfed non-private: {_ratio(by_name, name, base)}")
    poisson = next(r.name for r in rows if r.name.startswith("dpfed DP Poisson"))
    lines.append(f"ratio dpfed DP Poisson / dpfed non-private: {_ratio(by_name, poisson, base)}")
    if "Opacus DP (hooks)" in by_name:
        torch_base, opacus = "torch non-private", "Opacus DP (hooks)"
        for name in (opacus, "Opacus DP (ghost clipping)"):
            lines.append(f"ratio {name} / {torch_base}: {_ratio(by_name, name, torch_base)}")
        for name in ("dpfed DP (vmap)", "dpfed DP (fast)"):
            lines.append(f"ratio {name} / {opacus}: {_ratio(by_name, name, opacus)}")
        lines.append(
            f"ratio dpfed non-private / torch non-private: "
            f"{_ratio(by_name, base, 'torch non-private')}"
        )
    stats = jax.devices()[0].memory_stats()
    lines += [
        "",
        f"peak memory: process max RSS {_max_rss() / MIB:.0f} MiB (all rows together)",
        "jax memory_stats(): "
        + ("None (not available on this backend)" if stats is None else str(stats)),
        f"load average at the end: {_loadavg()}",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "batch_size", f"unexpected arguments {argv[1:]}")
    batch_size, steps, warmup = _BATCH.value, _STEPS.value, _WARMUP.value
    if _QUICK.value:
        batch_size, steps, warmup = 8, 2, 1
    cli.check(batch_size > 0, "batch_size", "must be > 0")
    cli.check(steps > 0, "steps", "must be > 0")
    cli.check(warmup > 0, "warmup", "must be > 0 (the first step compiles)")
    load_average = _loadavg()
    train = data.load(DATASET, "train")
    cli.check(batch_size <= train.num_examples, "batch_size", f"must be <= {train.num_examples}")
    rows = jax_rows(train.images, train.labels, batch_size)
    extra = torch_rows(train.images, train.labels, batch_size) if _TORCH.value else []
    if extra:
        import opacus
        import torch

        threads = torch.get_num_threads()
        note = (
            f"torch {torch.__version__} ({threads} threads, default), opacus {opacus.__version__}"
        )
    else:
        note = "torch/opacus: not run (" + ("not installed" if _TORCH.value else "--notorch") + ")"
    rows += extra
    print(f"warming up {len(rows)} rows, then {steps} timed rounds ...", flush=True)
    measure(rows, steps, warmup)
    chunk = dpsgd.default_physical_batch(batch_size)
    poisson_note = (
        f"the Poisson row samples from all {train.num_examples} train examples (expected "
        f"{batch_size}) and runs physical chunks of {chunk} > {batch_size}, by design"
    )
    print(report(rows, batch_size, steps, warmup, [note, poisson_note], load_average))


if __name__ == "__main__":
    cli.run(main)
