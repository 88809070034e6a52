"""benchmarks/accelerator.sh, the prepared device run, works end to end (QUICK=1, CPU)."""

import os
import subprocess
import sys

import pytest

from tests.binary import ROOT


@pytest.mark.slow
def test_quick_run_writes_the_four_reports(tmp_path):
    env = {**os.environ, "QUICK": "1", "PY": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/accelerator.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reports = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(reports) == [
        "datalens_teachers.txt", "fed_round.txt", "gpu.txt", "local_unroll.txt",
        "preflight.txt"], reports
    assert "jax" in reports["gpu.txt"], "gpu.txt names the JAX backend and devices"
    assert "loop/engine" in reports["fed_round.txt"], reports["fed_round.txt"][-500:]
    assert "teacher-steps/s" in reports["datalens_teachers.txt"]
    assert "vs unroll 1" in reports["local_unroll.txt"], reports["local_unroll.txt"][-500:]


@pytest.mark.skipif((ROOT / ".whl").is_dir(), reason="wheels in .whl/ replace PYTHONPATH")
def test_a_missing_package_stops_the_run_before_any_benchmark(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "attr.py").write_text("raise ImportError('no attrs on this machine')\n")
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "PYTHONPATH": str(shadow)}
    proc = subprocess.run(["bash", "benchmarks/accelerator.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "preflight failed" in proc.stdout, proc.stdout[-2000:]
    assert "no attrs" in (out / "preflight.txt").read_text(), "the missing import is named"
    assert not (out / "fed_round.txt").exists(), "no benchmark may start without its imports"


@pytest.mark.slow
def test_only_fed_skips_the_other_benchmarks_and_profile_packs_the_traces(tmp_path):
    env = {**os.environ, "QUICK": "1", "ONLY": "fed", "PROFILE": "1", "PY": sys.executable,
           "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/accelerator.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fed_round.txt", "gpu.txt", "preflight.txt", "profile.tgz"], (
        f"ONLY=fed runs fed_round alone; PROFILE=1 packs its traces in one file: {names}")
    assert "profile of the engine's round" in (tmp_path / "fed_round.txt").read_text()


def test_an_unknown_only_stops_before_anything_runs(tmp_path):
    env = {**os.environ, "ONLY": "lense", "PY": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/accelerator.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "expected fed, lens or unroll" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir()), "a misspelt ONLY must not run (or skip) benchmarks"
