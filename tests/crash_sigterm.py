"""Crash SIGTERM: an experiment binary preempted (SIGTERM) at one of its writes, then rerun.

A preempted job (a preemptible VM or TPU, Slurm's `scancel` or requeue) gets SIGTERM
and, a grace period later, SIGKILL. In a training loop a SIGTERM lets the step finish,
checkpoints it and exits 143 (`dpfed.train.preemption`); outside one the process ends
at once (Python's default: exit -15), and one that came after a loop's last `reached()`
ends it as the loop ends. `tests.crash_points` only SIGKILLs. Here the run (a child of
this module: `python -m tests.crash_sigterm child THEN_KILL THEN_TERM TRACE KILL_AT
MODULE ARGS`) sends SIGTERM to itself at its write point KILL_AT, and the write goes on,
as a real signal arriving just then would let it; with THEN_KILL > 0 (`--then_kill=J`:
the grace period running out during the preemption's own checkpoint save), it SIGKILLs
itself before the J-th write point after that one, if it gets there. With THEN_TERM > 0
(`--then_term=T`: a second SIGTERM, a scheduler's or a user's repeated `scancel`, during
that save) it sends SIGTERM again at the T-th write point after KILL_AT, and a
`--then_kill=J` SIGKILL comes J points after that one. With `--double=K` the run is
SIGTERMed at K and its rerun (a second preemption during the resume) at each of the
rerun's own points, as crash_points' `--double` kills.

`Terminated` checks how the run ended: exit 143 (its stderr line naming a checkpoint
that is on disk) or -15 at or after its point, or SIGKILL at its J-th point after it.
Then crash_points' `crash_and_rerun` and `sweep` rerun it on the workdir and check
(a)-(c) (and (d) in a `--secret_seed` mode) against the uninterrupted run.

  JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m tests.crash_sigterm \
    fedavg_classifier --mode=poisson [--points=3,7] [--then_kill=1] [--then_term=1] \
    [--double=4] [--checkpoint_every=3]

The tests (`tests/test_crash_sigterm.py`) keep the riskiest points.
"""

import argparse
import dataclasses
import os
import pathlib
import re
import signal
import time
from collections.abc import Callable

from tests import crash_points
from tests.crash_points import Run

CHILD = crash_points.CHILD  # the first argument of a child run
PREEMPTED = 128 + signal.SIGTERM  # a loop's exit once it saved its checkpoint (143)
TERMINATED = -signal.SIGTERM  # Python's default SIGTERM: the process ended by it
# The stderr line of a preempted loop (`preemption.PreemptedError`): the step it saved.
_SAVED = re.compile(r"the checkpoint of (?:step|round) (\d+) is saved in (\S+); rerun")


class _Tracer(crash_points._Tracer):  # noqa: SLF001 -- its numbering and trace.
    """crash_points' tracer that at point `kill_at` sends SIGTERM to this process and
    lets the write go on; with `then_term`, it sends SIGTERM again `then_term` points
    after that one; with `then_kill`, it SIGKILLs this process `then_kill` points after
    its last SIGTERM."""

    def __init__(self, trace: pathlib.Path, kill_at: int, root: pathlib.Path, then_kill: int,
                 then_term: int = 0):
        super().__init__(trace, kill_at, root)
        self._then_kill, self._then_term = then_kill, then_term
        self.terminated = False

    def at_kill_point(self, kind: str, path: pathlib.Path) -> None:
        if not self.terminated:
            self.terminated = True
            self._sigterm("sigterm", self._then_term or self._then_kill)
        elif self._then_term:
            self._then_term = 0
            self._sigterm("sigterm again", self._then_kill)
        else:
            self.event("killed before")
            crash_points.kill_self()

    def _sigterm(self, event: str, then: int) -> None:
        """Logs `event`, moves the kill point `then` points on (0: none is reached again)
        and sends SIGTERM to this process."""
        self.event(event)
        self._kill_at += then
        os.kill(os.getpid(), signal.SIGTERM)


def _child(argv: list[str]) -> None:
    """`child THEN_KILL THEN_TERM TRACE KILL_AT MODULE ARGS...`: as crash_points' child,
    SIGTERM at point KILL_AT, with THEN_TERM > 0 again THEN_TERM points after it, and
    with THEN_KILL > 0, SIGKILL THEN_KILL points after the last SIGTERM."""
    then_kill, then_term, trace, kill_at, module, *args = argv
    workdir = pathlib.Path(crash_points.flag_value(args, "workdir"))
    crash_points._install(  # noqa: SLF001 -- its tracing.
        _Tracer(pathlib.Path(trace), int(kill_at), workdir, int(then_kill), int(then_term)))
    crash_points.run_as_main(module, args)


def child(then_kill: int = 0, then_term: int = 0) -> tuple[str, ...]:
    """`crash_points.run`'s `child` for a SIGTERM at the point (`then_term`: again that
    many points after it; `then_kill`: SIGKILL that many points after the last)."""
    return ("tests.crash_sigterm", CHILD, str(then_kill), str(then_term))


@dataclasses.dataclass
class Terminated:
    """crash_points' `expect` of a run SIGTERMed at its point `kill_at` (and, with
    `then_term`, again that many points later): it reached the point, then exited 143
    naming a checkpoint on disk or -15, or (`then_kill`) was SIGKILLed at the
    `then_kill`-th point after its last SIGTERM. Keeps each exit code in `exits` and
    reports it."""

    then_kill: int = 0
    report: Callable[[str], None] = print
    exits: list[int] = dataclasses.field(default_factory=list)
    then_term: int = 0

    def __call__(self, result: Run, kill_at: int) -> None:
        points = result.points
        assert len(points) >= kill_at and points[kill_at - 1]["killed"], (
            f"the run was to get SIGTERM at write {kill_at}, but it exited "
            f"{result.returncode} after {len(points)} writes:\n{result.stderr}")
        kill = kill_at + self.then_term + self.then_kill if self.then_kill else 0
        if kill and len(points) >= kill:
            crash_points.expect_killed(result, kill)
        else:
            assert result.returncode in (PREEMPTED, TERMINATED), (
                f"SIGTERMed at write {kill_at}, the run exited {result.returncode} after "
                f"{len(points)} writes:\n{result.stderr}")
            if result.returncode == PREEMPTED:
                assert_saved(result.stderr)
        self.exits.append(result.returncode)
        self.report(f"SIGTERM at {self._where(points, kill_at)}: exit {result.returncode}, "
                    f"{len(points) - kill_at} writes after it")

    def _where(self, points: list[dict], kill_at: int) -> str:
        """`kill_at`, and (`then_term`) the point of the second SIGTERM, if reached."""
        if not self.then_term:
            return str(kill_at)
        again = kill_at + self.then_term
        if len(points) < again:
            return f"{kill_at} (the run ended before the second, {again})"
        assert points[again - 1]["killed"], f"the tracer sent no second SIGTERM at {again}"
        return f"{kill_at} and {again}"


def assert_saved(stderr: str) -> pathlib.Path:
    """A preempted run's stderr names the checkpoint it saved, which is on disk; returns
    that checkpoint's folder."""
    saved = saved_checkpoint(stderr)
    assert saved, f"exit {PREEMPTED} without the preemption's line:\n{stderr}"
    assert saved.is_dir(), (
        f"the preempted run names checkpoint {saved.name} in {saved.parent}, which is not on "
        "disk")
    return saved


def saved_checkpoint(stderr: str) -> pathlib.Path | None:
    """The checkpoint folder (DIR/STEP) that a preempted run's stderr names, if any."""
    saved = _SAVED.search(stderr)
    return pathlib.Path(saved[2], saved[1]) if saved else None


def checkpointed_every(binary: crash_points.Binary, every: int) -> crash_points.Binary:
    """`binary` with `--checkpoint_every=every` (the tiny flags' 1 saves every step, so a
    preemption's save is never off the period: with 3 > the 2 steps, only the last
    step's is periodic and a SIGTERM in step 1 saves it off the period)."""
    flags = tuple(f for f in binary.flags if not f.startswith("--checkpoint_every="))
    assert len(flags) == len(binary.flags) - 1, f"{binary.module} sets no --checkpoint_every"
    return dataclasses.replace(binary, flags=(*flags, f"--checkpoint_every={every}"))


def sweep(
    binary: crash_points.Binary, scratch: pathlib.Path, points: list[int] | None = None,
    then_kill: int = 0, report: Callable[[str], None] = print, then_term: int = 0,
    double: int = 0,
) -> list[crash_points.Outcome]:
    """SIGTERMs `binary` at each of `points` (default: all; `then_term`: again that many
    points later; `then_kill`: SIGKILLs it that many points after the last SIGTERM), or
    with `double`, at write `double` and then its rerun at each of its own `points`;
    reruns it and checks (a)-(d) (`crash_points.sweep`)."""
    return crash_points.sweep(binary, scratch, points, double, report=report,
                              child=child(then_kill, then_term),
                              expect=Terminated(then_kill, report, then_term=then_term))


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", choices=sorted(crash_points.BINARIES))
    parser.add_argument("--mode", help="default: the binary's first")
    parser.add_argument("--then_kill", type=int, default=0,
                        help="SIGKILL the run this many write points after its (last) SIGTERM")
    parser.add_argument("--then_term", type=int, default=0,
                        help="SIGTERM the run again this many write points after its SIGTERM")
    parser.add_argument("--double", type=int, default=0,
                        help="SIGTERM at this write, then the rerun at each of its own")
    parser.add_argument("--checkpoint_every", type=int,
                        help="instead of the tiny flags' 1 (3: a preemption's save off it)")
    parser.add_argument("--points", type=crash_points.point_list,
                        help="comma-separated write points (default: all)")
    parser.add_argument("--scratch", type=pathlib.Path,
                        help="a folder for the workdirs (default: a new temp one)")
    args = parser.parse_args(argv)
    mode, binary = crash_points.binary_of(parser, args.binary, args.mode)
    if args.checkpoint_every:
        mode = f"{mode}, --checkpoint_every={args.checkpoint_every}"
        binary = checkpointed_every(binary, args.checkpoint_every)
    start = time.time()
    outcomes = sweep(binary, crash_points.scratch_dir(args.scratch, "crash_sigterm"),
                     args.points, args.then_kill, then_term=args.then_term, double=args.double)
    print(f"{args.binary} {mode} (SIGTERM, then_kill={args.then_kill}, "
          f"then_term={args.then_term}, double={args.double}): "
          f"{crash_points.held(binary)} held at {len(outcomes)} points, "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    crash_points.script(_child, _main)
