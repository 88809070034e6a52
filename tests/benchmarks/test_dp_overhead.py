"""Smoke test of benchmarks/dp_overhead.py: it runs and prints its ratios (never timings)."""

import importlib.util
import os

import pytest

from tests.binary import run_binary

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "opacus"))


def _run(*flags):
    env = dict(os.environ)
    # One CPU device, as users run it; XLA optimisations off halve compile time, and
    # this smoke test reads no timings.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return run_binary("benchmarks.dp_overhead", *flags, check=False, timeout=300, env=env)


@pytest.mark.slow  # ~30 s of the fast suite: a benchmark's smoke run (`make bench` runs it)
def test_quick_run_prints_table_ratios_and_memory():
    result = _run("--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for line in (
        "| dpfed non-private ",
        "| dpfed DP (vmap) ",
        "| dpfed DP (fast) ",
        "| dpfed DP Poisson (make_train_step, chunk ",
        "ratio dpfed DP (vmap) / dpfed non-private: ",
        "ratio dpfed DP (fast) / dpfed non-private: ",
        "ratio dpfed DP Poisson / dpfed non-private: ",
        "peak memory: process max RSS ",
        "jax memory_stats(): ",
        "machine: ",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    torch_lines = (
        "ratio dpfed DP (vmap) / Opacus DP (hooks): ",
        "ratio dpfed non-private / torch non-private: ",
        "ratio Opacus DP (hooks) / torch non-private: ",
    )
    if HAS_TORCH:
        assert all(line in out for line in torch_lines), out
    else:
        assert "torch/opacus: not run (not installed)" in out, out
        assert not any(line in out for line in torch_lines), out


def test_bad_flag_exits_2_with_one_line():
    result = _run("--steps=0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --steps: must be > 0"


@pytest.mark.slow  # ~17 s: compiles each of the benchmark's rows
def test_jax_rows_take_the_batch_as_an_argument(monkeypatch):
    # Closed over, the batch is an HLO constant: XLA folds what depends on it alone (the
    # fast row's per-example patches of x) into constants at compile time, work the torch
    # rows and the Poisson row (data as arguments) still do every step.
    import re

    import numpy as np

    from benchmarks import dp_overhead

    made = []
    original = dp_overhead._jax_row

    def recording(name, step_fn, state, data_args):
        made.append((name, step_fn, state, data_args))
        return original(name, step_fn, state, data_args)

    monkeypatch.setattr(dp_overhead, "_jax_row", recording)
    rng = np.random.default_rng(0)
    images = rng.random((16, 28, 28, 1), np.float32)
    dp_overhead.jax_rows(images, rng.integers(0, 10, 16).astype(np.int32), 4)
    import jax

    for name, step_fn, state, data_args in made:
        text = step_fn.lower(state, *data_args, jax.random.key(0)).compile().as_text()
        arrays = re.findall(r"(f32\[[0-9,]+\])\S* constant\(\{", text)
        assert not arrays, f"{name}: the batch folded into constants {arrays}"
