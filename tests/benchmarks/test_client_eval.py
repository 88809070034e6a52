"""benchmarks/client_eval.py times both evaluators and prints their ratio (no timing
assertions: the figures depend on the machine)."""

from tests.binary import run_binary


def test_benchmark_prints_both_paths_their_ratio_and_agreement():
    proc = run_binary("benchmarks.client_eval", "--dataset=digits", "--num_clients=5",
                      "--model=logreg", "--repeats=1")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 3, f"a header and the iid and dirichlet rows: {rows}"
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells[0] == "dirichlet" and cells[4].endswith("x"), f"split and ratio: {cells}"
    assert float(cells[5]) < 1e-5, f"both paths give the same accuracies: {cells}"
