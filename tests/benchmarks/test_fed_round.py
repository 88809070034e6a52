"""benchmarks/fed_round.py runs both paths and prints their ratio (no timing assertions:
the figures depend on the machine)."""

from tests.binary import run_binary


def test_benchmark_prints_engine_loop_and_ratio(tmp_path):
    proc = run_binary(
        "benchmarks.fed_round", "--model=logreg", "--clients_per_round=2",
        "--examples_per_client=2", "--local_steps=1", "--local_batch_size=2", "--repeats=1",
        f"--profile_dir={tmp_path}", "--profile_rounds=2",
    )
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2, f"a table of one cohort size (header and row): {rows}"
    cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
    assert cells[1] == "2" and cells[4].strip("*").endswith("x"), f"m and loop/engine: {cells}"
    assert float(cells[7]) > 0, f"the vmapped clients alone have a time: {cells}"
    assert float(cells[-2]) > 0 and cells[-1].endswith("x"), (
        f"the engine's GFLOP/s and the ceiling of loop/engine close the row: {cells}")
    assert "best rate (float32 matmul, this run):" in proc.stdout, "the ceiling's rate is shown"
    assert "profile of the engine's round, conv -, 2 clients" in proc.stdout, proc.stdout
    assert "plane /host:CPU (per 2)" in proc.stdout, "a CPU run summarises the host's plane"
    assert (tmp_path / "-_2").is_dir(), "the trace is kept under --profile_dir/<conv>_<m>"
