"""benchmarks/datalens_teachers.py runs and prints both paths and their ratios (no timing
assertions: the figures depend on the machine)."""

import pytest

from tests.binary import run_binary


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_benchmark_prints_both_paths_and_ratios(scope):
    proc = run_binary(
        "benchmarks.datalens_teachers", "--dataset=digits", "--num_teachers=3",
        "--real_batch=4", "--fake_batch=2", "--topk=5", "--teacher_chunk=2",
        "--teacher_features=4", "--repeats=1", f"--vote_scope={scope}",
    )
    assert f"({scope} scope)" in proc.stdout, "the header names the vote scope timed"
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["3"]
    for row in rows:
        ends = [cell for cell in row if cell.endswith("x")]
        assert len(ends) == 4, f"train and vote: a ratio and its ceiling each: {row}"
