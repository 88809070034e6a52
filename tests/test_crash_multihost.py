"""tests/crash_multihost.py: its child's logic, and a 2-process job killed at a few writes.

The fast tests check the harness; the slow ones (each kill and rerun of a 2-process job
costs about a minute on 2 cores) keep a few of the riskiest points of the sweep.
"""

import json
import pathlib
import signal
import subprocess
import sys

import pytest

from launch import multihost
from tests import crash_multihost, crash_points, crash_writes
from tests.crash_multihost import PEER, PEER_AT_WRITER, WRITER


def test_a_job_runs_the_launcher_on_the_victims_child(tmp_path):
    binary = crash_multihost.job(crash_multihost.BINARY, tmp_path)
    assert binary.launcher[:2] == ("launch.multihost", "local"), binary.launcher
    assert f"--log_dir={tmp_path}" in binary.launcher and "--num_processes=2" in binary.launcher
    command = [*binary.launcher, *crash_multihost.child(PEER_AT_WRITER), "TRACE", "0",
               binary.module]
    args = multihost.parse_args(command[1:])
    assert (args.module, args.flags[:3]) == ("tests.crash_multihost", [
        crash_multihost.CHILD, PEER_AT_WRITER, crash_multihost.BEFORE]), (
        f"the launcher must start this module's child in every process: {args}")


def test_a_child_refuses_an_unknown_victim():
    with pytest.raises(AssertionError, match="victim 2"):
        crash_multihost.child("2")


def test_the_process_id_is_the_one_the_launcher_adds():
    args = ["--workdir=/w", "--distributed", "--coordinator_address=localhost:1",
            "--num_processes=2", "--process_id=1"]
    assert crash_multihost.process_id(args) == 1


@pytest.mark.parametrize("victim, process, expected", [
    (WRITER, 0, True), (WRITER, 1, False),
    (PEER, 0, False), (PEER, 1, True),
    (PEER_AT_WRITER, 0, True), (PEER_AT_WRITER, 1, False),  # process 0 traces and kills
])
def test_the_process_that_traces_is_the_victim_or_its_killer(victim, process, expected):
    assert crash_multihost.traced(victim, process) is expected


def test_siblings_are_the_parents_other_children():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import os; from tests.crash_multihost import siblings; "
             "print(os.getpid(), *siblings())"],
            capture_output=True, text=True, check=True, cwd=crash_points.ROOT)
        own, *found = (int(pid) for pid in probe.stdout.split())
        assert other.pid in found and own not in found, f"{own}: {found}, not {other.pid}"
    finally:
        other.kill()
        other.wait()


def test_the_peer_killer_kills_the_others_at_its_point_and_numbers_no_more(tmp_path, monkeypatch):
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(crash_multihost, "siblings", lambda: [peer.pid])
    trace = tmp_path / "trace.jsonl"
    tracer = crash_multihost._PeerKiller(trace, 2, tmp_path)  # noqa: SLF001
    try:
        tracer.point("file", tmp_path / "config.json")
        assert peer.poll() is None, "the peer killed before the point"
        tracer.point("append", tmp_path / "metrics.jsonl")
        assert peer.wait(timeout=10) == -signal.SIGKILL, "the peer not SIGKILLed at the point"
        tracer.point("file", tmp_path / "ledger.json")
    finally:
        peer.kill()
        peer.wait()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["n"] for r in records] == [1, 2, None, None], records
    assert records[-1]["kind"] == "after peer killed: file " + str(tmp_path / "ledger.json")


def test_a_job_whose_process_was_killed_counts_as_killed():
    # The launcher exits 137 (128 + SIGKILL) when one of its processes was SIGKILLed.
    point = {"n": 3, "kind": "file", "path": "ledger.json", "killed": True}
    job = crash_points.Run(128 + signal.SIGKILL, [point], "", 1.0)
    crash_points.expect_killed(job, 3)
    with pytest.raises(AssertionError, match="exited 1"):
        crash_points.expect_killed(crash_points.Run(1, [point], "", 1.0), 3)


# ---------------------------------------------------------------------------------------
# Slow: a 2-process fedavg_classifier job (`crash_multihost.BINARY`) killed and rerun.

_BINARY = crash_multihost.BINARY


@pytest.fixture(scope="module")
def job_whole(tmp_path_factory) -> tuple[pathlib.Path, crash_points.Run]:
    """The uninterrupted 2-process job's workdir and its process 0's write points."""
    scratch = tmp_path_factory.mktemp("crash_multihost")
    whole = scratch / "whole"
    return whole, crash_points.uninterrupted(
        crash_multihost.job(_BINARY, scratch / "logs"), whole, crash_multihost.child(WRITER))


@pytest.mark.slow
@pytest.mark.parametrize("victim, inner, path, occurrence, kind", [
    # process 0 killed before the rename of round 1's checkpoint, both processes' parts saved
    (WRITER, crash_multihost.BEFORE, "checkpoints/1", 1, "checkpoint-rename"),
    # process 1 killed as process 0 writes round 2's ledger, ahead of round 1's checkpoint
    (PEER_AT_WRITER, crash_multihost.BEFORE, "ledger.json", 2, "file"),
    # process 0 killed inside round 2's record: a torn last line
    (WRITER, f"tests.crash_writes:{crash_writes.INSIDE}", "metrics.jsonl", 2, "append"),
])
def test_a_killed_job_resumes_to_the_whole_jobs_files(job_whole, tmp_path, victim, inner, path,
                                                       occurrence, kind):
    whole, reference = job_whole
    k = crash_points.point_number(reference, path, occurrence, kind)
    outcome = crash_points.crash_and_rerun(
        crash_multihost.job(_BINARY, tmp_path / "logs"), whole, tmp_path / "w", k,
        child=crash_multihost.child(victim, inner))
    assert outcome.point["path"] == path, f"killed at {outcome.point}, not {path}"
