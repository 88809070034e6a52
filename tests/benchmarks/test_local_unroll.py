"""benchmarks/local_unroll.py times each unroll against a rolled scan and finds the same
parameters (no timing assertions: the figures depend on the machine)."""

import pytest

from tests.binary import run_binary


@pytest.mark.slow  # ~17 s: the benchmark's smoke run; unrolled local steps give the rolled
# result in tests/federated/test_local.py
def test_benchmark_prints_each_unroll_with_its_ratio_and_no_difference():
    proc = run_binary("benchmarks.local_unroll", "--local_steps=2", "--unroll=2",
                      "--clients=2", "--repeats=1")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2"], (
        f"a row for the rolled scan (always measured, the ratios' base) and one for unroll 2: "
        f"{proc.stdout}")
    for row in rows:
        cells = [cell.strip().strip("*") for cell in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4]) > 0, f"both paths timed: {cells}"
        assert cells[3].endswith("x") and cells[5].endswith("x"), f"both ratios: {cells}"
        assert float(cells[7]) < 1e-5, f"the same function, so the same parameters: {cells}"
    assert rows[0].split("|")[4].strip() == "**1.00x**", "unroll 1 against itself is 1.00x"
