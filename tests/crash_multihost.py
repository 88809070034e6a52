"""Crash points of a multi-host job: a `launch.multihost local` job killed at a write.

`tests.crash_points` kills a one-process binary before each of its writes (and
`tests.crash_writes` inside them). In a `--distributed` job every process runs the same
code, process 0 alone writes the workdir's files (each write between two barriers,
`workdir.one_write`), and every process takes part in the orbax checkpoints. Here the
launcher starts every process of a job (default 2 processes of 1 CPU device each;
`--processes`, `--devices_per_process`) as a child of this module (`python -m
launch.multihost local ... -- tests.crash_multihost child VICTIM INNER TRACE KILL_AT
MODULE ARGS`), which in the process it names kills as the inner child does
(crash_points' or crash_writes' own `_child`), and runs the binary untraced in the
others. VICTIM is:

  0     process 0 (the writer) killed at its write point KILL_AT (as one process);
  P     process P (1, 2, ...) killed at its own point KILL_AT (it writes no file: its
        points are the logs' appends it reaches before process 0 writes them, and the
        checkpoints);
  P@0   process P SIGKILLed by process 0 the moment process 0 reaches its write point
        KILL_AT, which process 0 then makes, going on until the launcher stops it (its
        later points traced unnumbered, as `after peer killed`); the other processes
        run on;
  all@0 (`--sigterm` only) every process SIGTERMed by process 0 at its write point
        KILL_AT, itself last, as Slurm's `scancel` or requeue signals every task.

With `--sigterm` (`--then_kill=J`) the victim gets SIGTERM instead, a preemption, and
the write goes on: process 0 or P runs `tests.crash_sigterm`'s child as INNER
(`tests.crash_sigterm:J,0`), process 0 sends SIGTERM to process P (or to all) and numbers
its later points as before. jax's preemption service has every process save the step
they agree on and exit 143 (`dpfed.train.preemption`): once the notice has reached every
process (jax polls for the signal each second), they agree on the next `reached()` call
of the fastest one. `JobTerminated` checks that the job did so (each process's stderr
names that checkpoint, on disk), or ran to its end (exit 0: the call agreed on came
after the job's last, or the SIGTERM after it: jax holds the signal and no loop asks),
or (`J`) was SIGKILLed J points after.

VICTIM may add `,draw` (`--draw`): in a `--secret_seed` mode, process 0 then draws the
secret itself (`crash_writes.draw_secret_in`) and writes secret_seed.json, a write point
of its own, which every other process must read; without it every new workdir holds
crash_points' pre-written one.

The launcher then stops the other processes and exits 137, as a shell reports a
SIGKILL. The same job is rerun on the workdir and crash_points' checks hold against an
uninterrupted job of the same flags and layout: (a) every release is counted by a
ledger present, (b) the rerun exits 0, (c) it ends with the uninterrupted job's files
(`crash_points.crash_and_rerun`), (d) in a secret mode no other file holds the seed.

  JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m tests.crash_multihost \
    [fedlm_debug --mode=population] [--victim=1@0] [--inner=tests.crash_writes:inside] \
    [--points=3,17] [--double=7] [--processes=3] [--devices_per_process=2] [--draw]
  ... -m tests.crash_multihost --sigterm [--victim=all@0] [--then_kill=1]  # preempted
  ... -m tests.crash_multihost --sigkill=8  # every process at once, at random times

The tests (`tests/test_crash_multihost.py`) keep a few points.
"""

import argparse
import dataclasses
import importlib
import os
import pathlib
import re
import signal
import time

from tests import crash_points, crash_sigterm, crash_writes

CHILD = crash_points.CHILD  # the first argument of a child run
# Victims (module docstring): the writer, process P, process P killed by process 0 (here
# of a 2-process job).
WRITER, PEER, PEER_AT_WRITER = "0", "1", "1@0"
AT_WRITER = "@0"  # the suffix of a victim that process 0 kills
ALL = "all@0"  # every process, SIGTERMed by process 0 (`--sigterm` only)
DRAW = crash_writes.DRAW  # a victim's `,draw`: process 0 draws the secret seed
_VICTIM = re.compile(r"(?P<process>0|[1-9][0-9]*|all)(?P<at>@0)?")
# The inner child that kills the victim: crash_points' (before a write), or crash_writes'
# with its HOW after a colon (`tests.crash_writes:inside`).
BEFORE = "tests.crash_points"
SIGTERM = crash_sigterm.child()[0]  # the inner child that SIGTERMs the victim
# A job in miniature: 2 processes of 1 CPU device each (the default layout).
PROCESSES, DEVICES_PER_PROCESS = 2, 1
# crash_points' fedavg_classifier (tiny, evaluated and checkpointed every round).
BINARY = crash_points.BINARIES["fedavg_classifier"]["poisson"]


def job(binary: crash_points.Binary, log_dir: pathlib.Path, processes: int = PROCESSES,
        devices_per_process: int = DEVICES_PER_PROCESS) -> crash_points.Binary:
    """`binary` run as a job of `launch.multihost local` of `processes` processes of
    `devices_per_process` CPU devices each, whose processes 1.. log to `log_dir`."""
    return dataclasses.replace(binary, launcher=(
        "launch.multihost", "local", f"--num_processes={processes}",
        f"--devices_per_process={devices_per_process}", f"--log_dir={log_dir}"))


def victim_process(victim: str, processes: int | None = None) -> int | None:
    """The process that `victim` (`P`, `P@0` or `all@0`, module docstring) kills, None
    for all; checks that it names one (a process 1.. for `P@0`), of a job of
    `processes` when given."""
    match = _VICTIM.fullmatch(victim)
    every = match is not None and match["process"] == "all"
    assert match and (bool(match["at"]) or not every) and not (
        match["at"] and match["process"] == WRITER) and (
        processes is None or every or int(match["process"]) < processes), (
        f"victim {victim} not one of a {processes or 'multi'}-process job's: "
        f"{WRITER}, P or P{AT_WRITER} for a process P from 1, or {ALL}")
    return None if every else int(match["process"])


def sigterm_inner(then_kill: int = 0) -> str:
    """The inner child that SIGTERMs the victim at its point (`then_kill`: SIGKILLs it
    that many points later): `tests.crash_sigterm`'s child and its leading arguments
    (`crash_sigterm.child`'s after its module and CHILD), comma-separated."""
    return f"{SIGTERM}:{','.join(crash_sigterm.child(then_kill)[2:])}"


def _sigterms(inner: str) -> bool:
    """Whether the `inner` child sends SIGTERM (not SIGKILL)."""
    return inner.partition(":")[0] == SIGTERM


def child(victim: str, inner: str = BEFORE, processes: int = PROCESSES,
          draw: bool = False) -> tuple[str, ...]:
    """`crash_points.run`'s `child` for a job of `processes` whose `victim` the `inner`
    child kills (or SIGTERMs: `sigterm_inner`); with `draw`, process 0 draws the secret
    seed itself."""
    every = victim_process(victim, processes) is None
    assert not every or inner == sigterm_inner(), (
        f"victim {ALL} is SIGTERMed (inner {sigterm_inner()}), not by {inner}")
    assert not (victim.endswith(AT_WRITER) and _sigterms(inner) and inner != sigterm_inner()), (
        f"victim {victim} is SIGTERMed by process 0, which SIGKILLs no one later: {inner}")
    return ("tests.crash_multihost", CHILD, f"{victim},{DRAW}" if draw else victim, inner)


def process_id(args: list[str]) -> int:
    """The `--process_id` among a job's process's `args` (the launcher adds it)."""
    return int(crash_points.flag_value(args, "process_id"))


def traced(victim: str, process: int) -> bool:
    """Whether `process` traces its points (the victim, or process 0 that kills it)."""
    return str(process) == victim.rpartition("@")[2]


def siblings(process: int | None = None) -> list[int]:
    """The other children of this process's parent (the launcher's other processes);
    with `process`, only the one whose `--process_id` it is."""
    parent = os.getppid()
    children = pathlib.Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    others = [int(pid) for pid in children if int(pid) != os.getpid()]
    return others if process is None else [pid for pid in others if _process_of(pid) == process]


def _process_of(pid: int) -> int | None:
    """The `--process_id` of the process `pid`, if its command line has one."""
    args = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return process_id(args) if any(a.startswith("--process_id=") for a in args) else None


def send(process: int | None, signum: int) -> None:
    """Sends `signum` to process `process` of the job (None: to every other process)."""
    peers = siblings(process)
    assert peers, f"no process {process} to send signal {signum} to"
    for pid in peers:
        os.kill(pid, signum)


class _PeerTracer(crash_points._Tracer):  # noqa: SLF001 -- its numbering and trace.
    """crash_points' tracer whose kill point signals process `peer` of the job (None:
    every other process) instead of killing this one."""

    def __init__(self, trace: pathlib.Path, kill_at: int, root: pathlib.Path,
                 peer: int | None):
        super().__init__(trace, kill_at, root)
        self.peer = peer


class _PeerKiller(_PeerTracer):
    """A tracer that at point `kill_at` SIGKILLs process `peer` of the job instead of this
    one, and logs the points after it unnumbered."""

    done = False

    def point(self, kind: str, path: str | os.PathLike) -> None:
        if self.done:
            self.event(f"after peer killed: {kind} {path}")
            return
        super().point(kind, path)

    def at_kill_point(self, kind: str, path: pathlib.Path) -> None:
        send(self.peer, signal.SIGKILL)
        self.event(f"killed process {self.peer}")
        self.done = True


class _PeerTerminator(_PeerTracer):
    """A tracer that at point `kill_at` sends SIGTERM to process `peer` of the job (None:
    to every other process, then to this one) and lets the write and the run go on, its
    points numbered as before."""

    def at_kill_point(self, kind: str, path: pathlib.Path) -> None:
        send(self.peer, signal.SIGTERM)
        self.event(f"sigterm process {'all' if self.peer is None else self.peer}")
        if self.peer is None:
            os.kill(os.getpid(), signal.SIGTERM)


def _child(argv: list[str]) -> None:
    """`child VICTIM[,draw] INNER TRACE KILL_AT MODULE ARGS...`: one process of the job."""
    victim_draw, inner, trace, kill_at, module, *args = argv
    victim, *extra = victim_draw.split(",")
    process = process_id(args)
    workdir = pathlib.Path(crash_points.flag_value(args, "workdir"))
    if DRAW in extra and process == 0:
        crash_writes.draw_secret_in(workdir)
    if not traced(victim, process):
        crash_points.run_as_main(module, args)
    elif victim.endswith(AT_WRITER):
        killer = _PeerTerminator if _sigterms(inner) else _PeerKiller
        crash_points._install(  # noqa: SLF001 -- its tracing.
            killer(pathlib.Path(trace), int(kill_at), workdir, victim_process(victim)))
        crash_points.run_as_main(module, args)
    else:
        name, _, how = inner.partition(":")
        importlib.import_module(name)._child(  # noqa: SLF001 -- the inner child.
            [*(how.split(",") if how else []), trace, kill_at, module, *args])


@dataclasses.dataclass
class JobTerminated(crash_sigterm.Terminated):
    """crash_sigterm's `Terminated` of a job (the launcher's exit: 143 once a process
    exited 143, 137 once one was SIGKILLed) whose processes 1.. log to `log_dir`: it
    exited 143 with every process's stderr naming the same checkpoint, on disk; or ran
    to its end (exit 0: the sync point jax agreed on, or the SIGTERM itself, came after
    the job's last `reached()`, and jax's preemption service holds the signal); or, with
    `then_kill`, was SIGKILLed at the `then_kill`-th point after the SIGTERM."""

    log_dir: pathlib.Path = pathlib.Path()
    processes: int = PROCESSES

    def __call__(self, result: crash_points.Run, kill_at: int) -> None:
        if result.returncode == 0:
            points = len(result.points)
            assert points >= kill_at and result.points[kill_at - 1]["killed"] and not (
                self.then_kill and points >= kill_at + self.then_kill), (
                f"the job was to get SIGTERM at write {kill_at} (then_kill {self.then_kill}), "
                f"but it ended after {points} writes:\n{result.stderr}")
            self.exits.append(0)
            self.report(f"SIGTERM at {kill_at}: the job ran to its end, "
                        f"{points - kill_at} writes after it")
            return
        super().__call__(result, kill_at)
        if result.returncode == crash_sigterm.PREEMPTED:
            self.assert_every_process_saved(crash_sigterm.assert_saved(result.stderr))

    def assert_every_process_saved(self, checkpoint: pathlib.Path) -> None:
        """Processes 1.. name process 0's `checkpoint` as the one they saved."""
        for process in range(1, self.processes):
            log = (self.log_dir / f"process_{process}.log").read_text()
            saved = crash_sigterm.saved_checkpoint(log)
            assert saved == checkpoint, (
                f"process 0 saved {checkpoint}, process {process} names {saved}:\n"
                f"{log[-3000:]}")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What `sweep` does: whose kill, by which inner child, at which points (with
    `double`: of the rerun of a job killed at that point, as `crash_points.sweep`), in a
    job of which layout, and whether process 0 draws the secret seed (`child`). With
    `sigterm`, the victim is SIGTERMed instead (`then_kill`: SIGKILLed that many points
    later), whatever `inner`."""

    victim: str = WRITER
    inner: str = BEFORE
    points: list[int] | None = None
    double: int = 0
    processes: int = PROCESSES
    devices_per_process: int = DEVICES_PER_PROCESS
    draw: bool = False
    sigterm: bool = False
    then_kill: int = 0


def sweep(scratch: pathlib.Path, what: Sweep, binary: crash_points.Binary = BINARY,
          ) -> list[crash_points.Outcome]:
    """`crash_points.sweep` of `binary` as a job of `what`'s layout, `what.victim` killed
    (or SIGTERMed, its end checked by `JobTerminated`)."""
    logs = scratch / "logs"
    inner, expect = what.inner, None
    if what.sigterm:
        inner = sigterm_inner(what.then_kill)
        expect = JobTerminated(what.then_kill, log_dir=logs, processes=what.processes)
    return crash_points.sweep(
        job(binary, logs, what.processes, what.devices_per_process), scratch,
        what.points, what.double,
        child=child(what.victim, inner, what.processes, what.draw), expect=expect)


# The binaries that take `--distributed` (launch.multihost), as crash_points names them.
MULTI_HOST = ("fedavg_classifier", "fedgan_debug", "fedlm_debug", "dpd_fvae", "datalens")


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", nargs="?", choices=MULTI_HOST, default="fedavg_classifier")
    parser.add_argument("--mode", help="of crash_points.BINARIES (default: the binary's first)")
    parser.add_argument("--victim", default=WRITER,
                        help="0, P, P@0 or (with --sigterm) all@0 (module docstring)")
    parser.add_argument("--inner", default=BEFORE,
                        help="the victim's child: tests.crash_points, or tests.crash_writes:HOW")
    parser.add_argument("--points", type=crash_points.point_list,
                        help="comma-separated write points (default: all)")
    parser.add_argument("--double", type=int, default=0,
                        help="kill before this write, then the rerun at each of its own")
    parser.add_argument("--processes", type=int, default=PROCESSES, help="of the job")
    parser.add_argument("--devices_per_process", type=int, default=DEVICES_PER_PROCESS,
                        help="CPU devices of each process")
    parser.add_argument("--draw", action="store_true", help="in a --secret_seed mode: "
                        "process 0 draws the secret seed (a write point), not pre-written")
    parser.add_argument("--sigterm", action="store_true",
                        help="SIGTERM the victim (a preemption), not SIGKILL; --inner unused")
    parser.add_argument("--then_kill", type=int, default=0,
                        help="with --sigterm: SIGKILL the victim this many points later")
    parser.add_argument("--scratch", type=pathlib.Path,
                        help="a folder for the workdirs (default: a new temp one)")
    parser.add_argument("--sigkill", type=int, default=0, help="instead: SIGKILL this many "
                        "jobs, every process at once, at random times (no tracing)")
    parser.add_argument("--seed", type=int, default=0, help="of --sigkill's random times")
    args = parser.parse_args(argv)
    mode, binary = crash_points.binary_of(parser, args.binary, args.mode)
    start = time.time()
    scratch = crash_points.scratch_dir(args.scratch, "crash_multihost")
    name = f"{args.binary} {mode}, {args.processes} x {args.devices_per_process} devices"
    if args.sigkill:
        killed = crash_points.sigkill(
            job(binary, scratch / "logs", args.processes, args.devices_per_process), scratch,
            args.sigkill, args.seed)
        print(f"{name}: {crash_points.held(binary)} held after {args.sigkill} SIGKILLs "
              f"({killed} while running), {time.time() - start:.0f} s")
        return
    outcomes = sweep(scratch, Sweep(args.victim, args.inner, args.points, args.double,
                                    args.processes, args.devices_per_process, args.draw,
                                    args.sigterm, args.then_kill), binary)
    draw = ", drawn secret" if args.draw else ""
    how = f"SIGTERM, then_kill={args.then_kill}" if args.sigterm else args.inner
    print(f"{name}, victim {args.victim} ({how}{draw}): {crash_points.held(binary)} held at "
          f"{len(outcomes)} points, {time.time() - start:.0f} s")


if __name__ == "__main__":
    crash_points.script(_child, _main)
