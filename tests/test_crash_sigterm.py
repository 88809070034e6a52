"""Runs preempted (SIGTERM) at a write (`tests.crash_sigterm`), then rerun: the harness's
own checks of how a run ends, and (slow) fedavg_classifier, checkpointed off the
preemption's round, preempted at its riskiest writes in a round, once SIGKILLed in the
preemption's own checkpoint save."""

import json
import pathlib
import signal

import pytest

from tests import crash_points, crash_sigterm
from tests.crash_points import BINARIES, Run

# fedavg_classifier's 2 rounds checkpointed every 3: a preemption in round 1 saves it off
# the period, the save that is the preemption's own.
FEDAVG = crash_sigterm.checkpointed_every(BINARIES["fedavg_classifier"]["poisson"], 3)


def _run(returncode: int, points: int, sigterm_at: int, stderr: str = "") -> Run:
    """A child run that reached `points` write points, SIGTERMed at `sigterm_at`."""
    trace = [{"n": n, "kind": "file", "path": f"f{n}", "killed": n == sigterm_at}
             for n in range(1, points + 1)]
    return Run(returncode, trace, stderr, 1.0)


def _preempted_line(checkpoints: pathlib.Path, step: int) -> str:
    return (f"preempted (SIGTERM): the checkpoint of round {step} is saved in {checkpoints}; "
            "rerun the same command to resume from it\n")


def test_a_preempted_run_that_names_its_checkpoint_on_disk_passes(tmp_path):
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    expect = crash_sigterm.Terminated(report=lambda _: None)
    expect(_run(143, 7, 4, _preempted_line(tmp_path / "checkpoints", 1)), 4)
    expect(_run(-signal.SIGTERM, 4, 4), 4)  # Python's default: ended at its point
    assert expect.exits == [143, -signal.SIGTERM]


@pytest.mark.parametrize("run, message", [
    (_run(143, 7, 4, "preempted (SIGTERM): the checkpoint of round 1 is saved in "
          "/nonexistent/checkpoints; rerun"), "which is not on disk"),
    (_run(143, 7, 4, "Traceback ..."), "without the preemption's line"),
    (_run(0, 15, 4), "the run exited 0 after 15 writes"),  # the SIGTERM ignored
    (_run(-signal.SIGKILL, 4, 4), "the run exited -9"),
    (_run(-signal.SIGTERM, 3, 0), "to get SIGTERM at write 4"),  # ended before it
])
def test_a_preempted_run_that_ends_otherwise_fails(run, message):
    with pytest.raises(AssertionError, match=message):
        crash_sigterm.Terminated(report=lambda _: None)(run, 4)


def test_then_kill_expects_the_sigkill_at_its_point_if_the_run_got_there():
    expect = crash_sigterm.Terminated(then_kill=2, report=lambda _: None)
    expect(_run(-signal.SIGKILL, 6, 4), 4)
    expect(_run(-signal.SIGTERM, 5, 4), 4)  # ended (outside a loop) before it
    with pytest.raises(AssertionError, match="exited -9 after 5 writes"):
        expect(_run(-signal.SIGKILL, 5, 4), 4)  # killed before its point
    with pytest.raises(AssertionError, match="to be killed before write 6"):
        expect(_run(143, 8, 4), 4)  # went past it


def test_the_tracer_sends_sigterm_at_its_point_and_sigkill_then_kill_points_later(
        tmp_path, monkeypatch):
    signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))

    def killed() -> None:
        raise InterruptedError("SIGKILL")

    monkeypatch.setattr(crash_points, "kill_self", killed)
    trace = tmp_path / "trace.jsonl"
    tracer = crash_sigterm._Tracer(trace, 2, tmp_path, then_kill=2)  # noqa: SLF001
    try:
        for n in range(1, 4):
            tracer.point("file", tmp_path / f"f{n}")
        assert signals == [signal.SIGTERM], "no SIGTERM at point 2, or more than one"
        with pytest.raises(InterruptedError):
            tracer.point("file", tmp_path / "f4")
    finally:
        signal.signal(signal.SIGTERM, previous)
    run = Run(0, [json.loads(line) for line in trace.read_text().splitlines()], "", 0.0)
    assert [p["n"] for p in run.points if p["killed"]] == [2, 4]
    assert [r["kind"] for r in run.trace if r["n"] is None] == ["sigterm", "killed before"]


def test_checkpointed_every_replaces_the_tiny_flags_period():
    flags = [f for f in FEDAVG.flags if f.startswith("--checkpoint_every=")]
    assert flags == ["--checkpoint_every=3"]
    with pytest.raises(AssertionError, match="sets no --checkpoint_every"):
        crash_sigterm.checkpointed_every(BINARIES["evaluate"]["datalens"], 3)


@pytest.fixture(scope="module")
def fedavg_whole(tmp_path_factory) -> tuple[pathlib.Path, Run]:
    """fedavg_classifier's uninterrupted run (this harness's child) and its workdir."""
    whole = tmp_path_factory.mktemp("crash_sigterm") / "whole"
    return whole, crash_points.uninterrupted(FEDAVG, whole, crash_sigterm.child())


@pytest.mark.slow
@pytest.mark.parametrize("path, occurrence, then_kill, exit_code", [
    # round 1's record: round 1 saved off the period
    ("metrics.jsonl", 1, 0, crash_sigterm.PREEMPTED),
    ("ledger.json", 2, 0, crash_sigterm.PREEMPTED),  # the last round's ledger copy
    # round 1's diagnostics, then the preemption's own save of round 1 SIGKILLed before
    # its rename (the grace period out)
    ("diagnostics.jsonl", 1, 2, -signal.SIGKILL),
])
def test_a_preempted_round_resumes_to_the_whole_run(fedavg_whole, tmp_path, path, occurrence,
                                                    then_kill, exit_code):
    whole, reference = fedavg_whole
    k = crash_points.point_number(reference, path, occurrence)
    expect = crash_sigterm.Terminated(then_kill)
    outcome = crash_points.crash_and_rerun(FEDAVG, whole, tmp_path / "w", k,
                                           child=crash_sigterm.child(then_kill), expect=expect)
    assert outcome.point["path"] == path, f"SIGTERMed at {outcome.point}, not {path}"
    assert expect.exits == [exit_code], f"exit {expect.exits}, not {exit_code}"
