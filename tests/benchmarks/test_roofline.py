"""benchmarks/roofline.py: XLA's FLOP count, the matmul rate and the ceiling it gives."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import roofline


class _Compiled:
    def __init__(self, analysis):
        self.analysis = analysis

    def cost_analysis(self):
        return self.analysis


def test_xla_flops_counts_a_matmul_as_2mkn():
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
    assert roofline.xla_flops(compiled) == 2 * 8 * 16 * 4, "XLA counts a multiply and an add"


def test_cpu_flops_counts_on_the_cpu_device_with_host_and_key_arguments(monkeypatch):
    asked = []
    devices = jax.devices
    monkeypatch.setattr(jax, "devices", lambda *a: asked.append(a) or devices(*a))
    flops = roofline.cpu_flops(
        lambda a, b, key: a @ b + jax.random.normal(key, (8, 4)),
        np.ones((8, 16), np.float32), np.ones((16, 4), np.float32), jax.random.key(0))
    assert asked == [("cpu",)], f"the count must compile for the CPU device, asked {asked}"
    assert flops is not None and flops >= 2 * 8 * 16 * 4, (
        f"the matmul's 2mkn (and the noise's own FLOPs) are counted, got {flops}")


@pytest.mark.parametrize("analysis", [None, {}, [], {"flops": 0.0}, {"flops": -1.0}])
def test_xla_flops_is_none_when_nothing_is_reported(analysis):
    assert roofline.xla_flops(_Compiled(analysis)) is None, (
        f"{analysis!r} reports no FLOPs: the ceiling must be left out, not computed from 0")


def test_xla_flops_reads_the_first_program_of_a_list():
    assert roofline.xla_flops(_Compiled([{"flops": 6.0}, {"flops": 9.0}])) == 6.0


def test_matmul_rate_is_2n_cubed_over_the_median_time_best_over_sizes(monkeypatch):
    clock = itertools.count(step=0.5)  # every timed matmul takes 0.5 s on this fake clock
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(clock))
    rate = roofline.matmul_flops_per_second(sizes=(4, 8), repeats=3)
    assert rate == 2 * 8**3 / 0.5, f"the larger size's 2n^3 / 0.5 s is the best rate, got {rate}"


def test_matmul_rate_needs_a_size_and_a_repeat():
    with pytest.raises(ValueError, match="repeats"):
        roofline.matmul_flops_per_second(sizes=(4,), repeats=0)
    with pytest.raises(ValueError, match="size"):
        roofline.matmul_flops_per_second(sizes=(), repeats=1)


def test_ceiling_is_the_baseline_over_the_work_at_the_rate():
    # 4e9 FLOPs at 2e9 FLOP/s take 2 s; a baseline of 6 s can be beaten at most 3x.
    assert roofline.ceiling(6.0, 4e9, 2e9) == pytest.approx(3.0)


@pytest.mark.parametrize("args", [(0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, -1.0)])
def test_ceiling_rejects_non_positive_inputs(args):
    with pytest.raises(ValueError, match="positive"):
        roofline.ceiling(*args)


def _fake_clock(monkeypatch, durations):
    """perf_counter() reads 0 at each timed call's start and its duration at its end."""
    readings = iter([t for duration in durations for t in (0.0, duration)])
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(readings))


def test_matmul_rate_uses_the_median_of_the_repeats(monkeypatch):
    _fake_clock(monkeypatch, [0.5, 0.1, 0.2])  # median 0.2 (min 0.1, mean 0.27)
    rate = roofline.matmul_flops_per_second(sizes=(4,), repeats=3)
    assert rate == pytest.approx(2 * 4**3 / 0.2), f"2n^3 / median time expected, got {rate}"


def test_matmul_rate_is_the_best_over_sizes_not_the_last(monkeypatch):
    _fake_clock(monkeypatch, [0.5, 0.5])  # the first size (8) is the faster
    rate = roofline.matmul_flops_per_second(sizes=(8, 4), repeats=1)
    assert rate == pytest.approx(2 * 8**3 / 0.5), f"the best rate over sizes expected, got {rate}"


def test_matmul_rate_runs_the_dtype_asked_for(monkeypatch):
    seen = []
    real_jit = roofline.jax.jit

    def recording_jit(fn):
        compiled = real_jit(fn)
        return lambda a, b: seen.append(a.dtype) or compiled(a, b)

    monkeypatch.setattr(roofline.jax, "jit", recording_jit)
    roofline.matmul_flops_per_second(sizes=(4,), repeats=1, dtype=roofline.jnp.bfloat16)
    assert seen and all(d == roofline.jnp.bfloat16 for d in seen), (
        f"a bfloat16 rate must time bfloat16 products, timed {seen}")
