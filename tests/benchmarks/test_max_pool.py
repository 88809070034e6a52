"""benchmarks/max_pool.py times both pools and finds their gradients equal (no timing
assertions: the figures depend on the machine)."""

from tests.binary import run_binary


def test_benchmark_prints_both_pools_ratio_and_equal_gradients():
    proc = run_binary("benchmarks.max_pool", "--clients=2", "--repeats=1", "--batch=2")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1, f"one row for 2 clients: {proc.stdout}"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].strip("*").endswith("x"), (
        f"both pools' times and their ratio: {cells}")
    assert float(cells[4]) == 0, f"random inputs have no ties, so equal gradients: {cells}"
