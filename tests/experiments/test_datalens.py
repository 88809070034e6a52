"""End-to-end tests of experiments/datalens.py (subprocesses, tiny runs on 8x8 digits)."""

import json
import shutil

import pytest

from tests.binary import (
    assert_kill_resumes_like_uninterrupted,
    assert_preemption_resumes_like_uninterrupted,
    finished_run,
    run_binary,
)

TINY = [
    "--dataset=digits",
    "--num_teachers=12",
    "--topk=6",
    "--sigma=30",
    "--beta=0.3",
    "--z_dim=4",
    "--pretrain_steps=1",
    "--batch_size=4",
    "--real_batch=4",
    "--teacher_features=4",
    "--generator_hidden=16",
    "--generator_width=4",
    "--teacher_chunk=2",
    "--num_synthetic=20",
]


def _run(*args, check=True):
    return run_binary("experiments.datalens", *args, check=check)


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A tiny run (--vote_scope=batch, a target) of 2 steps on 3 CPU devices, resumed to 3
    steps on the tests' 8 and evaluated (--evaluate; not pinned in config.json): its
    workdir, its first summary and the resume's output."""
    workdir = tmp_path_factory.mktemp("datalens_moved")
    tiny = (*TINY, "--target_epsilon=50", "--vote_scope=batch", f"--workdir={workdir}")
    _run(*tiny, "--steps=2", "--cpu_devices=3", "--noevaluate")
    first = json.loads((workdir / "summary.json").read_text())
    return workdir, first, _run(*tiny, "--steps=3", "--evaluate")  # the tests' 8 devices


def test_tiny_run_writes_the_workdir_contract(moved):
    # Also the --vote_scope=batch flag's test; the run the two tests below also read (a
    # binary run of its own before: ~10 s).
    tmp_path, _, proc = moved
    assert "eps" in proc.stdout and "report.md" in proc.stdout
    for name in (
        "ledger.json", "metrics.jsonl", "summary.json", "report.md", "samples.png",
        "synthetic.npz", "generator.msgpack",
    ):
        assert (tmp_path / name).exists(), f"workdir contract: {name} missing"
    summary = json.loads((tmp_path / "summary.json").read_text())
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert summary["method"] == "datalens" and summary["steps"] == 3
    assert summary["epsilon_rdp"] == ledger["epsilon_rdp"] <= 50
    assert ledger["metadata"]["l2_sensitivity"] == pytest.approx(24**0.5)
    assert ledger["metadata"]["vote_scope"] == "batch"
    assert ledger["num_releases"] == 3, "--vote_scope=batch: one aggregation per step"
    sizes = {"expected": 1438 / 12}  # the digits train split: N = 1438, T = 12
    assert ledger["metadata"]["partition_sizes"] == summary["partition_sizes"] == sizes, (
        "hash partition sizes count private records: only their expectation N/T is published")
    report = (tmp_path / "report.md").read_text()
    assert "120 examples each on average" in report, report[:600]
    assert "[datalens]" in proc.stderr and "eps" in proc.stderr  # progress with eps


# One uninterrupted run for the audit, SIGKILL and SIGTERM tests (so the preempted run
# also checkpoints and resumes its canaries' sums). On one CPU device (a laptop's
# default): the host queues steps ahead of the device.
_STEPS = 40
_INTERRUPTED = [*TINY, f"--steps={_STEPS}", "--checkpoint_every=10", "--eval_every=10",
                "--noevaluate", "--cpu_devices=1", "--audit_canaries=20"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return finished_run(tmp_path_factory, "experiments.datalens", *_INTERRUPTED)


def test_an_audit_run_writes_all_rounds_figures_below_the_ledger_and_a_rerun_keeps_them(
    uninterrupted, tmp_path
):
    # The shared run (a 3-step run of its own before: ~10 s); its rerun on a copy.
    written = (uninterrupted / "audit.json").read_bytes()
    figures = json.loads(written)
    ledger = json.loads((uninterrupted / "ledger.json").read_text())
    rounds = figures["all_rounds"]
    assert rounds["rounds"] == _STEPS and rounds["rate"] == 1.0, "every step's release, rate 1"
    assert figures["inserted"] + figures["held_out"] == 40, "2K candidates for K = 20"
    assert figures["ledger_epsilon_pld"] == ledger["epsilon_pld"], "beside the ledger's eps"
    for bound in ("epsilon_lower_bound", "epsilon_lower_bound_fdp"):
        assert rounds[bound] <= ledger["epsilon_pld"], (
            f"a correctly noised run's {bound} {rounds[bound]} must not exceed the ledger's "
            f"PLD eps {ledger['epsilon_pld']}")
    assert "mu" not in figures, "no final-model attack: the canaries are in vote space"
    assert "not for release" in (uninterrupted / "report.md").read_text(), "report.md says so"
    rerun = tmp_path / "rerun"
    shutil.copytree(uninterrupted, rerun)
    _run(*_INTERRUPTED, f"--workdir={rerun}")  # the finished run, rerun
    assert (rerun / "audit.json").read_bytes() == written, (
        "a rerun of a finished audit run must write the same figures")


@pytest.mark.slow  # ~25 s more than the SIGTERM test's resume of the same run; `make test`
# keeps that SIGTERM test, test_crash_points' and test_crash_writes' SIGKILLs of the
# classifier binaries and DataLens's in-process resume tests (tests/generative).
def test_sigkill_and_resume_gives_same_generator_ledger_and_metrics(uninterrupted, tmp_path):
    assert_kill_resumes_like_uninterrupted(
        "experiments.datalens", *_INTERRUPTED, whole=uninterrupted, killed=tmp_path / "killed",
        step=20)


def test_sigterm_checkpoints_its_step_and_the_rerun_resumes_there(uninterrupted, tmp_path):
    assert_preemption_resumes_like_uninterrupted(
        "experiments.datalens", *_INTERRUPTED, whole=uninterrupted, stopped=tmp_path / "stopped",
        step=10)


def test_cpu_devices_flag_splits_the_cpu_and_a_run_resumes_on_another_count(moved):
    workdir, summary, _ = moved
    assert summary["environment"]["device_count"] == 3, "--cpu_devices=3: 3 CPU devices"
    summary = json.loads((workdir / "summary.json").read_text())
    ledger = json.loads((workdir / "ledger.json").read_text())
    assert summary["environment"]["device_count"] == 8 and summary["steps"] == 3, summary
    assert ledger["num_releases"] == 3, "the resumed run adds its one aggregation to the two"


def test_evaluate_flag_appends_the_evaluation_suite_result(moved):
    # The resume of the `moved` run (a run of its own before: ~11 s).
    workdir, _, proc = moved
    assert "fid_domain" in proc.stdout and "cnn" in proc.stdout, proc.stdout
    assert (workdir / "eval.json").exists(), "the evaluation suite writes eval.json"


@pytest.mark.parametrize(
    "flag,name",
    [
        ("--topk=0", "topk"),
        ("--delta=2", "delta"),
        ("--num_teachers=2000", "num_teachers"),
        ("--target_epsilon=1e-6", "target_epsilon"),
        ("--audit_canaries=5", "audit_canaries"),
    ],
)
def test_bad_flag_exits_2_with_one_line(tmp_path, flag, name):
    proc = _run(*TINY, flag, f"--workdir={tmp_path}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"{flag}: exit code {proc.returncode}, stderr {proc.stderr[-500:]}"
    assert len(lines) == 1 and name in lines[0], f"{flag}: want one line naming {name}: {lines}"


def test_offline_tfds_dataset_exits_2_naming_embedded_alternative(tmp_path):
    proc = _run(
        "--dataset=mnist", f"--data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'w'}",
        check=False,
    )
    assert proc.returncode == 2 and "mnist5k" in proc.stderr, proc.stderr[-500:]
