"""tests/crash_multihost.py: its child's logic, and a 2-process job killed (or preempted:
SIGTERM) at a few writes.

The fast tests check the harness; the slow ones (each kill and rerun of a 2-process job
costs about a minute on 2 cores) keep a few of the riskiest points of the sweeps.
"""

import json
import pathlib
import signal
import subprocess
import sys

import pytest

from launch import multihost
from tests import crash_multihost, crash_points, crash_sigterm, crash_writes
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


def test_a_job_has_the_layout_asked_for(tmp_path):
    binary = crash_multihost.job(crash_multihost.BINARY, tmp_path, 3, 2)
    args = multihost.parse_args([*binary.launcher[1:], binary.module])
    assert (args.num_processes, args.devices_per_process) == (3, 2), args


@pytest.mark.parametrize("victim, processes", [
    ("2", 2), ("2@0", 2), ("0@0", 3), ("1@1", 3), ("01", 3), ("x", 3), ("", 2)])
def test_a_child_refuses_a_victim_not_of_its_job(victim, processes):
    with pytest.raises(AssertionError, match=f"victim {victim} not one of a {processes}-"):
        crash_multihost.child(victim, processes=processes)


@pytest.mark.parametrize("victim, process", [("0", 0), ("2", 2), ("2@0", 2), ("1@0", 1)])
def test_a_victim_names_its_process(victim, process):
    assert crash_multihost.victim_process(victim, 3) == process
    assert crash_multihost.child(victim, processes=3)[2] == victim


def test_a_drawing_job_tells_its_children_after_the_victim():
    assert crash_multihost.child(PEER_AT_WRITER, draw=True)[2] == "1@0,draw"


def test_the_process_id_is_the_one_the_launcher_adds():
    args = ["--workdir=/w", "--distributed", "--coordinator_address=localhost:1",
            "--num_processes=2", "--process_id=1"]
    assert crash_multihost.process_id(args) == 1


@pytest.mark.parametrize("victim, process, expected", [
    (WRITER, 0, True), (WRITER, 1, False),
    (PEER, 0, False), (PEER, 1, True),
    (PEER_AT_WRITER, 0, True), (PEER_AT_WRITER, 1, False),  # process 0 traces and kills
    ("2", 2, True), ("2", 1, False), ("2", 0, False), ("2@0", 0, True), ("2@0", 2, False),
])
def test_the_process_that_traces_is_the_victim_or_its_killer(victim, process, expected):
    assert crash_multihost.traced(victim, process) is expected


def _sleeper(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])


def test_siblings_are_the_parents_other_children_or_the_one_of_a_process_id():
    # As the launcher starts them: each with its --process_id (processes 1 and 2 here).
    others = [_sleeper(), _sleeper("--process_id=1"), _sleeper("--process_id=2")]
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import os; from tests.crash_multihost import siblings; "
             "print(os.getpid(), *siblings()); print(*siblings(2)); print(*siblings(3))",
             "--process_id=0"],
            capture_output=True, text=True, check=True, cwd=crash_points.ROOT)
        lines = probe.stdout.splitlines()
        own, *found = (int(pid) for pid in lines[0].split())
        assert {o.pid for o in others} <= set(found) and own not in found, (
            f"{own}: {found}, not {[o.pid for o in others]}")
        assert lines[1:] == [str(others[2].pid), ""], f"process 2 is {others[2].pid}: {lines}"
    finally:
        for other in others:
            other.kill()
            other.wait()


def test_the_peer_killer_kills_the_others_at_its_point_and_numbers_no_more(tmp_path, monkeypatch):
    peer, bystander = _sleeper(), _sleeper()
    pids = {2: [peer.pid], 1: [bystander.pid]}
    monkeypatch.setattr(crash_multihost, "siblings", lambda process: pids[process])
    trace = tmp_path / "trace.jsonl"
    tracer = crash_multihost._PeerKiller(trace, 2, tmp_path, peer=2)  # noqa: SLF001
    try:
        tracer.point("file", tmp_path / "config.json")
        assert peer.poll() is None, "the peer killed before the point"
        tracer.point("append", tmp_path / "metrics.jsonl")
        assert peer.wait(timeout=10) == -signal.SIGKILL, "the peer not SIGKILLed at the point"
        assert bystander.poll() is None, "a process but the peer killed"
        tracer.point("file", tmp_path / "ledger.json")
    finally:
        for process in (peer, bystander):
            process.kill()
            process.wait()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["n"] for r in records] == [1, 2, None, None], records
    assert records[-1]["kind"] == "after peer killed: file " + str(tmp_path / "ledger.json")


@pytest.mark.parametrize("victim, process, draws", [
    ("0,draw", 0, True), ("2,draw", 0, True), ("1@0,draw", 1, False), ("2,draw", 2, False),
    ("0", 0, False)])
def test_with_draw_process_0_draws_the_secret_whoever_the_victim(monkeypatch, tmp_path,
                                                                 victim, process, draws):
    calls = []
    monkeypatch.setattr(crash_writes, "draw_secret_in", lambda w: calls.append(("draw", w)))
    monkeypatch.setattr(crash_points, "run_as_main", lambda m, a: calls.append(("run", m)))
    monkeypatch.setattr(crash_points, "_install", lambda tracer: None)
    monkeypatch.setattr(crash_points, "_child", lambda argv: calls.append(("run", argv[2])))
    crash_multihost._child([victim, crash_multihost.BEFORE, "TRACE", "0", "experiments.x",  # noqa: SLF001
                            f"--workdir={tmp_path}", f"--process_id={process}"])
    assert calls == [("draw", tmp_path)] * draws + [("run", "experiments.x")], calls


def test_a_job_whose_process_was_killed_counts_as_killed():
    # The launcher exits 137 (128 + SIGKILL) when one of its processes was SIGKILLed.
    point = {"n": 3, "kind": "file", "path": "ledger.json", "killed": True}
    job = crash_points.Run(128 + signal.SIGKILL, [point], "", 1.0)
    crash_points.expect_killed(job, 3)
    with pytest.raises(AssertionError, match="exited 1"):
        crash_points.expect_killed(crash_points.Run(1, [point], "", 1.0), 3)


# ---------------------------------------------------------------------------------------
# --sigterm: the victim preempted (SIGTERM) instead of SIGKILLed.


def test_a_sigterm_victim_runs_crash_sigterms_child(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(crash_sigterm, "_child", calls.append)
    inner = crash_multihost.sigterm_inner(2)
    args = [f"--workdir={tmp_path}", "--process_id=1"]
    crash_multihost._child([PEER, inner, "TRACE", "5", "experiments.x", *args])  # noqa: SLF001
    assert calls == [["2", "0", "TRACE", "5", "experiments.x", *args]], (
        f"process 1 must run crash_sigterm's child, then_kill 2, then_term 0: {calls}")


@pytest.mark.parametrize("victim, inner, expected", [
    (PEER_AT_WRITER, crash_multihost.BEFORE, crash_multihost._PeerKiller),  # noqa: SLF001
    (PEER_AT_WRITER, crash_multihost.sigterm_inner(), crash_multihost._PeerTerminator),  # noqa: SLF001
    (crash_multihost.ALL, crash_multihost.sigterm_inner(), crash_multihost._PeerTerminator),  # noqa: SLF001
])
def test_process_0_sigterms_its_victims_under_sigterm(monkeypatch, tmp_path, victim, inner,
                                                      expected):
    tracers = []
    monkeypatch.setattr(crash_points, "_install", tracers.append)
    monkeypatch.setattr(crash_points, "run_as_main", lambda module, args: None)
    crash_multihost._child([victim, inner, str(tmp_path / "trace"), "3", "experiments.x",  # noqa: SLF001
                            f"--workdir={tmp_path}", "--process_id=0"])
    assert [type(t) for t in tracers] == [expected], tracers
    assert tracers[0].peer == crash_multihost.victim_process(victim)


@pytest.mark.parametrize("victim, inner, message", [
    (crash_multihost.ALL, crash_multihost.BEFORE, "is SIGTERMed"),  # all@0 SIGKILLed
    (PEER_AT_WRITER, crash_multihost.sigterm_inner(1), "SIGKILLs no one later"),
    ("all", crash_multihost.sigterm_inner(), "not one of"),  # all only by process 0
])
def test_a_sigterm_victim_that_the_child_cannot_do_is_refused(victim, inner, message):
    with pytest.raises(AssertionError, match=message):
        crash_multihost.child(victim, inner, processes=3)


def test_all_names_no_process_and_is_traced_by_process_0():
    assert crash_multihost.victim_process(crash_multihost.ALL, 3) is None
    assert [crash_multihost.traced(crash_multihost.ALL, p) for p in range(3)] == [
        True, False, False]


def _sigterm_catcher() -> subprocess.Popen:
    """A process that reports a SIGTERM on its stdout, as jax's preemption service
    catches it, and runs on."""
    return subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: print('sigterm', flush=True))\n"
         "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("peer", [2, None])
def test_the_peer_terminator_sigterms_at_its_point_and_goes_on(tmp_path, monkeypatch, peer):
    victim, bystander = _sigterm_catcher(), _sigterm_catcher()
    for process in (victim, bystander):
        assert process.stdout and process.stdout.readline() == "ready\n"
    pids = {2: [victim.pid], None: [victim.pid, bystander.pid]}
    monkeypatch.setattr(crash_multihost, "siblings", lambda process: pids[process])
    own: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: own.append(signum))
    tracer = crash_multihost._PeerTerminator(tmp_path / "trace.jsonl", 2, tmp_path, peer)  # noqa: SLF001
    try:
        for n in range(1, 4):
            tracer.point("file", tmp_path / f"f{n}")
        assert victim.stdout and victim.stdout.readline() == "sigterm\n"
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in (victim, bystander):
            process.kill()
            process.communicate()
    assert bystander.returncode == -signal.SIGKILL, "the bystander ended before it was killed"
    assert own == ([signal.SIGTERM] if peer is None else []), f"own SIGTERMs: {own}"
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["n"] for r in records] == [1, 2, None, 3], records
    assert records[2]["kind"] == f"sigterm process {'all' if peer is None else peer}"


def _job(tmp_path: pathlib.Path, returncode: int, points: int, sigterm_at: int,
         saved: dict[int, int | None]) -> crash_points.Run:
    """A job SIGTERMed at `sigterm_at` whose process P's stderr names checkpoint
    `saved[P]` (process 0's in the run's stderr, the others' in their logs)."""
    (tmp_path / "checkpoints" / "1").mkdir(parents=True, exist_ok=True)

    def stderr(step: int | None) -> str:
        return "" if step is None else (
            f"preempted (SIGTERM): the checkpoint of round {step} is saved in "
            f"{tmp_path / 'checkpoints'}; rerun the same command to resume from it\n")

    for process, step in saved.items():
        if process:
            (tmp_path / f"process_{process}.log").write_text(f"...\n{stderr(step)}")
    trace = [{"n": n, "kind": "file", "path": f"f{n}", "killed": n == sigterm_at}
             for n in range(1, points + 1)]
    return crash_points.Run(returncode, trace, stderr(saved.get(0)), 1.0)


@pytest.mark.parametrize("returncode, points, saved", [
    (143, 7, {0: 1, 1: 1, 2: 1}),  # every process saved round 1, on disk
    (0, 15, {}),  # ran to its end: the SIGTERM after the last sync point
])
def test_a_job_that_saved_in_every_process_or_ran_to_its_end_passes(tmp_path, returncode, points,
                                                                    saved):
    expect = crash_multihost.JobTerminated(report=lambda _: None, log_dir=tmp_path, processes=3)
    expect(_job(tmp_path, returncode, points, 4, saved), 4)
    assert expect.exits == [returncode]


@pytest.mark.parametrize("returncode, points, saved, message", [
    (143, 7, {0: 1, 1: 1, 2: None}, "process 2 names None"),  # one did not save
    (143, 7, {0: 1, 1: 2, 2: 1}, "process 1 names .*/2"),  # another step
    (143, 7, {0: 2, 1: 2, 2: 2}, "which is not on disk"),
    (0, 3, {}, "ended after 3 writes"),  # ended before its SIGTERM
    (137, 7, {}, "exited 137 after 7 writes"),  # SIGKILLed, no then_kill
])
def test_a_job_that_ends_otherwise_fails(tmp_path, returncode, points, saved, message):
    expect = crash_multihost.JobTerminated(report=lambda _: None, log_dir=tmp_path, processes=3)
    with pytest.raises(AssertionError, match=message):
        expect(_job(tmp_path, returncode, points, 4, saved), 4)


def test_a_job_sigkilled_then_kill_points_after_its_sigterm_passes(tmp_path):
    expect = crash_multihost.JobTerminated(then_kill=2, report=lambda _: None, log_dir=tmp_path)
    expect(_job(tmp_path, 128 + signal.SIGKILL, 6, 4, {}), 4)
    expect(_job(tmp_path, 0, 5, 4, {}), 4)  # ended before the SIGKILL's point
    assert expect.exits == [128 + signal.SIGKILL, 0]
    with pytest.raises(AssertionError, match="then_kill 2.*ended after 6 writes"):
        expect(_job(tmp_path, 0, 6, 4, {}), 4)  # went past it


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


@pytest.mark.slow
@pytest.mark.parametrize("victim, path", [
    # process 1 alone preempted (one host's maintenance) as process 0 writes data.json:
    # the notice of a process that writes nothing stops process 0 too
    (PEER_AT_WRITER, "data.json"),
    # every process preempted at once (scancel) as process 0 writes config.json: each
    # sends jax the notice
    (crash_multihost.ALL, "config.json"),
])
def test_a_preempted_job_saves_in_every_process_and_resumes(job_whole, tmp_path, victim, path):
    # Before the loop: jax's agreement (about a second) is done before round 1's first
    # `reached()`, so every process saves round 1 and exits 143. A SIGTERM in the loop
    # of this tiny job is agreed on after its last call, mostly: it runs to its end.
    whole, reference = job_whole
    k = crash_points.point_number(reference, path)
    expect = crash_multihost.JobTerminated(log_dir=tmp_path / "logs")
    outcome = crash_points.crash_and_rerun(
        crash_multihost.job(_BINARY, tmp_path / "logs"), whole, tmp_path / "w", k,
        child=crash_multihost.child(victim, crash_multihost.sigterm_inner()), expect=expect)
    assert outcome.point["path"] == path, f"SIGTERMed at {outcome.point}, not {path}"
    assert expect.exits == [crash_sigterm.PREEMPTED], f"exit {expect.exits}: no preemption"


@pytest.mark.slow
def test_a_3_process_job_whose_peer_dies_as_the_drawn_secret_is_written_resumes(tmp_path):
    # Process 2 of 3 SIGKILLed as process 0 writes the secret seed it drew: process 0
    # writes it alone; every process of the rerun reads that one back (process 1 and 2
    # draw their own and must not use them).
    binary = crash_multihost.job(crash_points.BINARIES["fedavg_classifier"]["secret"],
                                 tmp_path / "logs", processes=3)
    child = crash_multihost.child("2@0", processes=3, draw=True)
    whole = tmp_path / "whole"
    reference = crash_points.uninterrupted(binary, whole, child)
    k = crash_points.point_number(reference, "secret_seed.json")
    outcome = crash_points.crash_and_rerun(binary, whole, tmp_path / "w", k, child=child)
    assert outcome.point["path"] == "secret_seed.json", f"killed at {outcome.point}"
