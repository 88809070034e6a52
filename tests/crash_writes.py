"""Crash writes: an experiment binary killed *inside* one of its writes, then rerun.

`tests.crash_points` kills a run before each of its write points (or, `--double`, its
rerun too). A kill can also land inside a write, and each kind of write leaves
something of its own there:

  inside  a JSON, PNG or msgpack file (`workdir.atomic_write_local_bytes`): the temp file
          `.<name>.<random>.tmp` written and fsynced beside the old file (or none), and
          killed before its rename: the temp file is left;
          a line of a log (`Workdir._append`): the first 3/4 of the line's bytes on
          disk, no newline: a *torn* last line (a write cut short, a disk full);
          a checkpoint's rename (orbax's `finalize`): its metadata and commit-success
          file written in the temp folder, killed before the folder's rename;
          (a checkpoint's save (`Checkpointer.save`) is killed before, as crash_points
          kills it: the kill inside it is the one before its rename);
  after   the write done, killed before anything else: for a run's last write, the one
          moment after it that `crash_points` does not reach.

The runs, checks and sweeps are crash_points' (`crash_points.sweep`,
`crash_and_rerun`: checks (a)-(d)), each run a child of this module
(`python -m tests.crash_writes child HOW ...`), which puts its kill inside the write.
HOW may add `draw`: a `--secret_seed` mode's child then lets the binary draw the secret
itself (as `crash_points.SECRET`, its nonce `SECRET_NONCE`) and write secret_seed.json,
a write point of its own, instead of the pre-written one.

  JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m tests.crash_writes \
    dpsgd_classifier --mode=default [--how=after] [--points=4,8] [--double=8]

The tests (`tests/test_crash_writes.py`) keep the riskiest points.
"""

import argparse
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

from tests import crash_points
from tests.crash_points import Binary

CHILD = crash_points.CHILD  # the first argument of a child run
INSIDE, AFTER, DRAW = "inside", "after", "draw"
# The write points that have an inside: all but the checkpoint's save (killed before).
INSIDE_KINDS = ("file", "append", "checkpoint-rename")


class _Tracer(crash_points._Tracer):  # noqa: SLF001 -- its numbering and trace.
    """crash_points' tracer that, at point `kill_at`, does not kill before the write:
    it arms (`armed`: the point's kind and path) for the write's own wrapper to kill
    inside or after it; a checkpoint's save it kills before."""

    def __init__(self, trace: pathlib.Path, kill_at: int, root: pathlib.Path, how: str):
        super().__init__(trace, kill_at, root)
        self._how = how
        self.armed: tuple[str, pathlib.Path] | None = None

    def at_kill_point(self, kind: str, path: pathlib.Path) -> None:
        self.event(f"killed {self._how}" if kind in INSIDE_KINDS else "killed before")
        if kind not in INSIDE_KINDS:
            crash_points.kill_self()
        self.armed = (kind, path)

    def at(self, kind: str, path: str | os.PathLike) -> str | None:
        """How to kill the write of `kind` to `path`: INSIDE or AFTER where it is the
        armed one, else None (write it)."""
        if self.armed == (kind, pathlib.Path(path).absolute()):
            return self._how
        return None


def _install(tracer: _Tracer) -> None:
    """Wraps the library's writes to be killed inside or after the armed one, then
    crash_points' tracing around them."""
    from orbax.checkpoint._src.path import async_path

    from dpfed.train import workdir

    write = workdir.atomic_write_local_bytes

    def killed_write(path: pathlib.Path, payload: bytes, mode: int | None = None) -> None:
        how = tracer.at("file", path)
        if how == INSIDE:  # the temp file written and fsynced; killed before its rename
            replace = os.replace
            os.replace = lambda src, dst: crash_points.kill_self()  # type: ignore[assignment]
            write(path, payload, mode)
            os.replace = replace
            raise AssertionError(f"the write of {path} was not killed at its rename")
        write(path, payload, mode)
        if how == AFTER:
            crash_points.kill_self()

    append = workdir.Workdir._append  # noqa: SLF001 -- the write it wraps.

    def killed_append(self: workdir.Workdir, name: str, record: dict) -> None:
        how = tracer.at("append", self.file(name))
        append(self, name, record)
        if how == INSIDE:  # the line's second half cut: as a write cut short leaves it
            path = self.file(name)
            data = path.read_bytes()
            start = data.rstrip(b"\n").rfind(b"\n") + 1
            with path.open("r+b") as f:
                f.truncate(start + (len(data) - start) * 3 // 4)
                f.flush()
                os.fsync(f.fileno())
        if how is not None:
            crash_points.kill_self()

    rename = async_path.rename

    async def killed_rename(src: Any, dst: Any) -> None:
        how = tracer.at("checkpoint-rename", dst)
        if how == INSIDE:  # the commit-success file written in the temp folder
            crash_points.kill_self()
        await rename(src, dst)
        if how == AFTER:
            crash_points.kill_self()

    workdir.atomic_write_local_bytes = killed_write
    workdir.Workdir._append = killed_append  # noqa: SLF001
    async_path.rename = killed_rename
    crash_points._install(tracer)  # noqa: SLF001 -- the tracing, around the kills.


def _child(argv: list[str]) -> None:
    """`child HOW TRACE KILL_AT MODULE ARGS...`: as crash_points' child, the kill at
    point KILL_AT inside or after its write (HOW: INSIDE or AFTER, `,draw` added: a
    pre-written secret_seed.json in a new workdir removed and the secret drawn)."""
    how, trace, kill_at, module, *args = argv
    kill, *extra = how.split(",")
    workdir = pathlib.Path(crash_points.flag_value(args, "workdir"))
    if DRAW in extra:
        draw_secret_in(workdir)
    _install(_Tracer(pathlib.Path(trace), int(kill_at), workdir, kill))
    crash_points.run_as_main(module, args)


def draw_secret_in(workdir: pathlib.Path) -> None:
    """Lets the binary run in this process draw the secret seed of `workdir` itself and
    write secret_seed.json: removes the one that `crash_points` writes in a new workdir
    (the workdir holds nothing else) and fixes the draw to `crash_points.SECRET` (its
    nonce `SECRET_NONCE`, which config.json pins)."""
    from dpfed.train import seeds

    files = [p for p in workdir.rglob("*") if p.is_file()] if workdir.exists() else []
    if [p.name for p in files] == [seeds.SECRET_SEED_FILE]:
        files[0].unlink()
    seeds.draw_secret = lambda: crash_points.SECRET
    seeds.draw_nonce = lambda: crash_points.SECRET_NONCE


def child(how: str) -> tuple[str, ...]:
    """`crash_points.run`'s `child` for a kill `how` (INSIDE or AFTER, `,draw` added)."""
    return ("tests.crash_writes", CHILD, how)


def inside_points(reference: crash_points.Run) -> list[int]:
    """The write points of `reference` that have an inside (`INSIDE_KINDS`)."""
    return [p["n"] for p in reference.points if p["kind"] in INSIDE_KINDS]


def sweep(
    binary: Binary, scratch: pathlib.Path, how: str = INSIDE, points: list[int] | None = None,
    report: Callable[[str], None] = print, double: int = 0,
) -> list[crash_points.Outcome]:
    """Kills `binary` `how` each of `points` (default: INSIDE, every point with an
    inside; AFTER, the last point), reruns it and checks (a)-(d) (`crash_points.sweep`);
    with `double`, kills it `how` point `double`, then its rerun `how` each of `points`
    (default: all of the rerun's)."""
    if points is None and not double:
        reference = crash_points.uninterrupted(binary, scratch / "probe", child(how))
        points = (inside_points(reference) if how.startswith(INSIDE)
                  else [len(reference.points)])
    return crash_points.sweep(binary, scratch, points, double, report, child(how))


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", choices=sorted(crash_points.BINARIES))
    parser.add_argument("--mode", help="default: the binary's first")
    parser.add_argument("--how", default=INSIDE,
                        help=f"{INSIDE} or {AFTER}, `,{DRAW}` added: the binary draws the secret")
    parser.add_argument("--points", type=crash_points.point_list,
                        help="comma-separated write points (default: "
                        f"{INSIDE}: every one with an inside; {AFTER}: the last)")
    parser.add_argument("--double", type=int, default=0,
                        help="kill at this write, then the rerun at each of its own")
    parser.add_argument("--scratch", help="a folder for the workdirs (default: a new temp one)")
    args = parser.parse_args(argv)
    mode, binary = crash_points.binary_of(parser, args.binary, args.mode)
    scratch = crash_points.scratch_dir(args.scratch, "crash_writes")
    start = time.time()
    outcomes = sweep(binary, scratch, args.how, args.points, double=args.double)
    print(f"{args.binary} {mode} ({args.how}): {crash_points.held(binary)} held at "
          f"{len(outcomes)} points, {time.time() - start:.0f} s")


if __name__ == "__main__":
    crash_points.script(_child, _main)
