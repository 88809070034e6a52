"""Crash points of a multi-host job: a `launch.multihost local` job killed at a write.

`tests.crash_points` kills a one-process binary before each of its writes (and
`tests.crash_writes` inside them). In a `--distributed` job every process runs the same
code, process 0 alone writes the workdir's files (each write between two barriers,
`workdir.one_write`), and every process takes part in the orbax checkpoints. Here the
launcher starts every process of a 2-process job (1 CPU device each) as a child of this
module (`python -m launch.multihost local ... -- tests.crash_multihost child VICTIM
INNER TRACE KILL_AT MODULE ARGS`), which in the process it names kills as the inner
child does (crash_points' or crash_writes' own `_child`), and runs the binary untraced
in the others. VICTIM is:

  0     process 0 (the writer) killed at its write point KILL_AT (as one process);
  1     process 1 killed at its own point KILL_AT (it writes no file: its points are the
        logs' appends it reaches before process 0 writes them, and the checkpoints);
  1@0   process 1 SIGKILLed by process 0 the moment process 0 reaches its write point
        KILL_AT, which process 0 then makes, going on until the launcher stops it (its
        later points traced unnumbered, as `after peer killed`).

The launcher then stops the other process and exits 137, as a shell reports a SIGKILL.
The same job is rerun on the workdir and crash_points' checks hold against an
uninterrupted 2-process job of the same flags: (a) every release is counted by a ledger
present, (b) the rerun exits 0, (c) it ends with the uninterrupted job's files
(`crash_points.crash_and_rerun`).

  JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m tests.crash_multihost \
    [fedlm_debug --mode=population] [--victim=1@0] [--inner=tests.crash_writes:inside] \
    [--points=3,17] [--double=7]
  ... -m tests.crash_multihost --sigkill=8  # every process at once, at random times

The tests (`tests/test_crash_multihost.py`) keep a few points.
"""

import argparse
import dataclasses
import importlib
import os
import pathlib
import signal
import tempfile
import time

from tests import crash_points

CHILD = crash_points.CHILD  # the first argument of a child run
WRITER, PEER, PEER_AT_WRITER = "0", "1", "1@0"  # the victims (module docstring)
VICTIMS = (WRITER, PEER, PEER_AT_WRITER)
# The inner child that kills the victim: crash_points' (before a write), or crash_writes'
# with its HOW after a colon (`tests.crash_writes:inside`).
BEFORE = "tests.crash_points"
# A job in miniature: 2 processes of 1 CPU device each.
JOB = ("--num_processes=2", "--devices_per_process=1")
# crash_points' fedavg_classifier (tiny, evaluated and checkpointed every round).
BINARY = crash_points.BINARIES["fedavg_classifier"]["poisson"]


def job(binary: crash_points.Binary, log_dir: pathlib.Path) -> crash_points.Binary:
    """`binary` run as a 2-process job (`JOB`) of `launch.multihost local`, whose
    processes 1.. log to `log_dir`."""
    return dataclasses.replace(binary, launcher=(
        "launch.multihost", "local", *JOB, f"--log_dir={log_dir}"))


def child(victim: str, inner: str = BEFORE) -> tuple[str, ...]:
    """`crash_points.run`'s `child` for a job whose `victim` the `inner` child kills."""
    assert victim in VICTIMS, f"victim {victim} not one of {VICTIMS}"
    return ("tests.crash_multihost", CHILD, victim, inner)


def process_id(args: list[str]) -> int:
    """The `--process_id` among a job's process's `args` (the launcher adds it)."""
    return int(crash_points.flag_value(args, "process_id"))


def traced(victim: str, process: int) -> bool:
    """Whether `process` traces its points (the victim, or process 0 that kills it)."""
    return str(process) == victim.rpartition("@")[2]


def siblings() -> list[int]:
    """The other children of this process's parent (the launcher's other processes)."""
    parent = os.getppid()
    children = pathlib.Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if int(pid) != os.getpid()]


class _PeerKiller(crash_points._Tracer):  # noqa: SLF001 -- its numbering and trace.
    """crash_points' tracer that at point `kill_at` SIGKILLs the other processes of the
    job instead of this one, and logs the points after it unnumbered."""

    def __init__(self, trace: pathlib.Path, kill_at: int, root: pathlib.Path):
        super().__init__(trace, kill_at, root)
        self.done = False

    def point(self, kind: str, path: str | os.PathLike) -> None:
        if self.done:
            self.event(f"after peer killed: {kind} {path}")
            return
        super().point(kind, path)

    def at_kill_point(self, kind: str, path: pathlib.Path) -> None:
        for pid in siblings():
            os.kill(pid, signal.SIGKILL)
        self.event("killed the peer")
        self.done = True


def _child(argv: list[str]) -> None:
    """`child VICTIM INNER TRACE KILL_AT MODULE ARGS...`: one process of the job."""
    victim, inner, trace, kill_at, module, *args = argv
    process = process_id(args)
    if not traced(victim, process):
        crash_points.run_as_main(module, args)
    elif victim == PEER_AT_WRITER:
        workdir = pathlib.Path(crash_points.flag_value(args, "workdir"))
        crash_points._install(  # noqa: SLF001 -- its tracing.
            _PeerKiller(pathlib.Path(trace), int(kill_at), workdir))
        crash_points.run_as_main(module, args)
    else:
        name, _, how = inner.partition(":")
        importlib.import_module(name)._child(  # noqa: SLF001 -- the inner child.
            [*([how] if how else []), trace, kill_at, module, *args])


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What `sweep` does: whose kill, by which inner child, at which points (with
    `double`: of the rerun of a job killed at that point, as `crash_points.sweep`)."""

    victim: str = WRITER
    inner: str = BEFORE
    points: list[int] | None = None
    double: int = 0


def sweep(scratch: pathlib.Path, what: Sweep, binary: crash_points.Binary = BINARY,
          ) -> list[crash_points.Outcome]:
    """`crash_points.sweep` of `binary` as a 2-process job, `what.victim` killed."""
    return crash_points.sweep(job(binary, scratch / "logs"), scratch, what.points, what.double,
                              child=child(what.victim, what.inner))


# The binaries that take `--distributed` (launch.multihost), as crash_points names them.
MULTI_HOST = ("fedavg_classifier", "fedgan_debug", "fedlm_debug", "dpd_fvae", "datalens")


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", nargs="?", choices=MULTI_HOST, default="fedavg_classifier")
    parser.add_argument("--mode", help="of crash_points.BINARIES (default: the binary's first)")
    parser.add_argument("--victim", choices=VICTIMS, default=WRITER)
    parser.add_argument("--inner", default=BEFORE,
                        help="the victim's child: tests.crash_points, or tests.crash_writes:HOW")
    parser.add_argument("--points", type=lambda text: [int(p) for p in text.split(",")],
                        help="comma-separated write points (default: all)")
    parser.add_argument("--double", type=int, default=0,
                        help="kill before this write, then the rerun at each of its own")
    parser.add_argument("--scratch", type=pathlib.Path,
                        help="a folder for the workdirs (default: a new temp one)")
    parser.add_argument("--sigkill", type=int, default=0, help="instead: SIGKILL this many "
                        "jobs, every process at once, at random times (no tracing)")
    parser.add_argument("--seed", type=int, default=0, help="of --sigkill's random times")
    args = parser.parse_args(argv)
    mode, binary = crash_points.binary_of(parser, args.binary, args.mode)
    start = time.time()
    scratch = args.scratch or pathlib.Path(tempfile.mkdtemp(prefix="crash_multihost-"))
    name = f"{args.binary} {mode}, 2 processes"
    if args.sigkill:
        killed = crash_points.sigkill(job(binary, scratch / "logs"), scratch, args.sigkill,
                                      args.seed)
        print(f"{name}: {crash_points.held(binary)} held after {args.sigkill} SIGKILLs "
              f"({killed} while running), {time.time() - start:.0f} s")
        return
    outcomes = sweep(scratch, Sweep(args.victim, args.inner, args.points, args.double), binary)
    print(f"{name}, victim {args.victim} ({args.inner}): {crash_points.held(binary)} held at "
          f"{len(outcomes)} points, {time.time() - start:.0f} s")


if __name__ == "__main__":
    crash_points.script(_child, _main)
