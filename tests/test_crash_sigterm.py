"""Runs preempted (SIGTERM) at a write (`tests.crash_sigterm`), then rerun: the harness's
own checks of how a run ends, and (slow) fedavg_classifier, checkpointed off the
preemption's round, preempted at its riskiest writes in a round, once SIGKILLed and once
SIGTERMed again in the preemption's own checkpoint save, and once preempted again in its
rerun."""

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


def _traced(tmp_path, monkeypatch, tracer, points: int, sigterms: int) -> Run:
    """`tracer`'s trace of `points` write points, each SIGTERM it sends caught: `sigterms`
    of them by the last point, and its SIGKILL raised there (InterruptedError)."""
    signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))

    def killed() -> None:
        raise InterruptedError("SIGKILL")

    monkeypatch.setattr(crash_points, "kill_self", killed)
    try:
        for n in range(1, points):
            tracer.point("file", tmp_path / f"f{n}")
        assert signals == [signal.SIGTERM] * sigterms, f"SIGTERMs {signals}, not {sigterms}"
        with pytest.raises(InterruptedError):
            tracer.point("file", tmp_path / f"f{points}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    trace = tmp_path / "trace.jsonl"
    return Run(0, [json.loads(line) for line in trace.read_text().splitlines()], "", 0.0)


def test_the_tracer_sends_sigterm_at_its_point_and_sigkill_then_kill_points_later(
        tmp_path, monkeypatch):
    tracer = crash_sigterm._Tracer(tmp_path / "trace.jsonl", 2, tmp_path,  # noqa: SLF001
                                   then_kill=2)
    run = _traced(tmp_path, monkeypatch, tracer, 4, sigterms=1)
    assert [p["n"] for p in run.points if p["killed"]] == [2, 4]
    assert [r["kind"] for r in run.trace if r["n"] is None] == ["sigterm", "killed before"]


def test_the_tracer_sends_sigterm_again_then_term_points_later_then_its_sigkill(
        tmp_path, monkeypatch):
    tracer = crash_sigterm._Tracer(tmp_path / "trace.jsonl", 2, tmp_path,  # noqa: SLF001
                                   then_kill=2, then_term=1)
    run = _traced(tmp_path, monkeypatch, tracer, 5, sigterms=2)
    assert [p["n"] for p in run.points if p["killed"]] == [2, 3, 5]
    assert [r["kind"] for r in run.trace if r["n"] is None] == [
        "sigterm", "sigterm again", "killed before"]


def _twice(returncode: int, points: int, *killed: int) -> Run:
    """A child run SIGTERMed at 4 and again at 5 (and SIGKILLed at `killed`)."""
    run = _run(returncode, points, 4)
    for n in (5, *killed):
        run.trace[n - 1]["killed"] = True
    return run


def test_then_term_expects_the_end_of_a_sigterm_and_the_kill_after_the_second():
    lines: list[str] = []
    expect = crash_sigterm.Terminated(then_kill=2, report=lines.append, then_term=1)
    expect(_run(-signal.SIGTERM, 4, 4), 4)  # ended before the second
    expect(_twice(-signal.SIGKILL, 7, 7), 4)  # SIGKILLed 2 points after the second SIGTERM
    assert lines == [
        "SIGTERM at 4 (the run ended before the second, 5): exit -15, 0 writes after it",
        "SIGTERM at 4 and 5: exit -9, 3 writes after it"]
    with pytest.raises(AssertionError, match="without the preemption's line"):
        expect(_twice(143, 6), 4)
    with pytest.raises(AssertionError, match="exited -9 after 6 writes"):
        expect(_twice(-signal.SIGKILL, 6, 6), 4)  # then_kill after the first, not the second
    with pytest.raises(AssertionError, match="no second SIGTERM at 5"):
        expect(_run(-signal.SIGTERM, 5, 4), 4)


def test_sweep_passes_double_then_term_and_then_kill_on(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(crash_points, "sweep", lambda *args, **kwargs: calls.append(
        (args, kwargs)) or [])
    crash_sigterm.sweep(FEDAVG, tmp_path, [3], then_kill=2, then_term=1, double=7)
    (args, kwargs), = calls
    assert args == (FEDAVG, tmp_path, [3], 7)
    assert kwargs["child"] == ("tests.crash_sigterm", crash_points.CHILD, "2", "1")
    assert (kwargs["expect"].then_kill, kwargs["expect"].then_term) == (2, 1)


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


@pytest.mark.slow
def test_a_second_sigterm_during_the_preemptions_own_save_still_ends_saved(fedavg_whole,
                                                                           tmp_path):
    """SIGTERM at round 1's diagnostics record, again as the preemption's own save of
    round 1 (off the period) begins: the run still saves it and exits 143."""
    whole, reference = fedavg_whole
    k = crash_points.point_number(reference, "diagnostics.jsonl")
    lines: list[str] = []
    expect = crash_sigterm.Terminated(report=lines.append, then_term=1)
    crash_points.crash_and_rerun(FEDAVG, whole, tmp_path / "w", k,
                                 child=crash_sigterm.child(then_term=1), expect=expect)
    # the 2 writes after the first SIGTERM: checkpoint 1 (its second at it) and its rename
    assert lines == [f"SIGTERM at {k} and {k + 1}: exit 143, 2 writes after it"]


@pytest.mark.slow
def test_a_rerun_preempted_again_resumes_to_the_whole_run(fedavg_whole, tmp_path):
    """SIGTERM at round 1's metrics record (round 1 saved off the period, exit 143),
    then the rerun's at its own round 2 ledger.json (its 5th write, after config.json,
    data.json and the logs cut back to round 1): it saves round 2 and exits 143 too."""
    whole, reference = fedavg_whole
    k = crash_points.point_number(reference, "metrics.jsonl")
    expect = crash_sigterm.Terminated()
    outcome = crash_points.crash_and_rerun(FEDAVG, whole, tmp_path / "w", k, 5,
                                           child=crash_sigterm.child(), expect=expect)
    assert outcome.point["path"] == "ledger.json", f"the rerun SIGTERMed at {outcome.point}"
    assert expect.exits == [crash_sigterm.PREEMPTED] * 2, f"exits {expect.exits}"
