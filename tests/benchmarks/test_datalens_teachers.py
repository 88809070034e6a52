"""benchmarks/datalens_teachers.py runs and prints both paths and their ratios (no timing
assertions: the figures depend on the machine)."""

import pytest

from tests.binary import run_binary


@pytest.mark.slow  # ~30 s for both: the benchmark's smoke runs; the vote paths it times are
# tested for equal results in tests/generative/test_datalens.py
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


_ONE_DEVICE_LOOP = """
from dpfed.federated import mesh
mesh.split_cpu(2)
import jax, optax
from benchmarks.datalens_teachers import loop_teachers
from dpfed.generative.datalens import TeacherEnsemble, make_mesh
from dpfed.models.datalens_nets import TeacherDiscriminator
ensemble = TeacherEnsemble(TeacherDiscriminator(10, (4,)), optax.adam(1e-3), 4, 2, make_mesh())
state = ensemble.init(jax.random.key(0), jax.numpy.zeros((8, 8, 1)))
placed = {len(leaf.devices()) for t in loop_teachers(state, 4) for leaf in jax.tree.leaves(t)}
print("devices per loop teacher:", placed)
"""


def test_loop_runs_each_teacher_on_one_device():
    # A teacher sliced from the sharded state is replicated over the mesh: a jitted step
    # on it runs on every device, so with --cpu_devices=2 the loop did each step twice
    # (2.16x slower than on one device, one process, 2 cores).
    import subprocess
    import sys

    from tests.binary import ROOT

    proc = subprocess.run([sys.executable, "-c", _ONE_DEVICE_LOOP], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "devices per loop teacher: {1}" in proc.stdout, proc.stdout
