"""Runs killed inside a write (`tests.crash_writes`), then rerun: (a)-(d) of
`tests.crash_points` hold, and a torn metrics record stays counted.

The fast tests keep the riskiest insides of dpsgd_classifier's tiny run: its last ledger
copy's temp file, a torn metrics record (rerun as it was, and rerun shorter), and a
checkpoint killed before its folder's rename. The slow ones sweep every inside point.
"""

import dataclasses
import pathlib

import pytest

from tests import crash_points, crash_writes
from tests.crash_points import BINARIES

DPSGD = BINARIES["dpsgd_classifier"]["default"]
INSIDE = crash_writes.child(crash_writes.INSIDE)


@pytest.fixture(scope="module")
def dpsgd_whole(tmp_path_factory) -> tuple[pathlib.Path, crash_points.Run]:
    """dpsgd_classifier's uninterrupted run (this module's child) and its workdir."""
    whole = tmp_path_factory.mktemp("crash_writes") / "whole"
    return whole, crash_points.uninterrupted(DPSGD, whole, INSIDE)


@pytest.mark.parametrize("path, occurrence, kind", [
    ("ledger.json", 3, "file"),  # the run's end: the copy with its PLD eps, a temp file left
    ("metrics.jsonl", 2, "append"),  # step 2's record torn, its ledger.json written
    ("checkpoints/2", 1, "checkpoint-rename"),  # step 2's checkpoint whole but not renamed
])
def test_a_kill_inside_a_write_resumes_to_the_whole_run(dpsgd_whole, tmp_path, path, occurrence,
                                                         kind):
    whole, reference = dpsgd_whole
    k = crash_points.point_number(reference, path, occurrence, kind)
    outcome = crash_points.crash_and_rerun(DPSGD, whole, tmp_path / "w", k, child=INSIDE)
    assert outcome.point["path"] == path, f"killed inside {outcome.point}, not {path}"
    assert not list((tmp_path / "w").rglob("*.tmp")), "the rerun left a temp file"


def test_a_torn_metrics_record_is_a_release_a_shorter_rerun_must_reach(dpsgd_whole, tmp_path):
    # Its bytes are on disk (`"step": 2` and step 2's test accuracy): a rerun with
    # --steps=1 that dropped it would end with a 1-step ledger.json, its release in none.
    _, reference = dpsgd_whole
    workdir = tmp_path / "w"
    k = crash_points.point_number(reference, "metrics.jsonl", 2)
    crash_points.expect_killed(crash_points.run(DPSGD, workdir, k, child=INSIDE), k)
    torn = (workdir / "metrics.jsonl").read_text().rpartition("\n")[2]
    assert torn.startswith('{"step": 2, ') and '"test_accuracy": 0.' in torn, (
        f"the kill left no torn step-2 record holding a value: {torn!r}")
    shorter = dataclasses.replace(DPSGD, flags=tuple(
        "--steps=1" if f == "--steps=2" else f for f in DPSGD.flags))
    rerun = crash_points.run(shorter, workdir)
    assert rerun.returncode != 0 and "steps" in rerun.stderr, (
        f"a rerun ending before the torn step-2 record was not refused (exit "
        f"{rerun.returncode}):\n{rerun.stderr}")
    ledger = crash_points._read_json(workdir / "ledger.json")  # noqa: SLF001
    assert ledger["num_releases"] == 2, (
        f"the refused rerun changed ledger.json, which counts the torn record: {ledger}")


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", [
    ("dpsgd_classifier", "default"),
    ("fedavg_classifier", "poisson"),
])
def test_every_inside_point(tmp_path, name, mode):
    outcomes = crash_writes.sweep(BINARIES[name][mode], tmp_path)
    kinds = {o.point["kind"] for o in outcomes}
    assert kinds == set(crash_writes.INSIDE_KINDS), f"swept only {kinds}"


@pytest.mark.slow
def test_a_local_dpd_fvae_record_torn_before_its_target_resumes(tmp_path):
    # Its keys sort `local_target_epsilon` into the line's last quarter, which the tear
    # cuts: the rerun takes config.json's target (`dpd_fvae._pinned_target`), where it
    # was refused until a sweep found it (stop 54).
    binary = BINARIES["dpd_fvae"]["local"]
    whole = tmp_path / "whole"
    reference = crash_points.uninterrupted(binary, whole, INSIDE)
    k = crash_points.point_number(reference, "metrics.jsonl", 1, "append")
    outcome = crash_points.crash_and_rerun(binary, whole, tmp_path / "w", k, child=INSIDE)
    assert outcome.point["path"] == "metrics.jsonl", f"killed inside {outcome.point}"


@pytest.mark.slow
def test_after_the_last_write(tmp_path):
    outcomes = crash_writes.sweep(DPSGD, tmp_path, crash_writes.AFTER)
    assert [o.point["path"] for o in outcomes] == ["report.md"], "not killed after report.md"


@pytest.mark.slow
def test_inside_the_secret_seeds_own_write(tmp_path):
    # The binary draws the secret (as SECRET) and writes secret_seed.json itself: a kill
    # inside leaves its 0600 temp file, which the rerun removes before drawing again.
    binary = BINARIES["dpsgd_classifier"]["secret"]
    how = f"{crash_writes.INSIDE},{crash_writes.DRAW}"
    whole = tmp_path / "whole"
    reference = crash_points.uninterrupted(binary, whole, crash_writes.child(how))
    k = crash_points.point_number(reference, "secret_seed.json")
    outcome = crash_points.crash_and_rerun(binary, whole, tmp_path / "w", k,
                                           child=crash_writes.child(how))
    assert outcome.point["path"] == "secret_seed.json", f"killed inside {outcome.point}"
