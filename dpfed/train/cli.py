"""Helpers for thin absl experiment binaries: one clear line and exit code 2 on bad flags.

The workdir contract (DESIGN.md) asks that a bad flag -- an unknown flag, a value an
absl validator rejects, or a value the binary itself finds unusable -- ends the run
with exit code 2 and one line naming the flag, without a traceback or a usage dump.

Typical use::

    def main(argv):
        cli.check(FLAGS.clip_norm > 0, "clip_norm", "must be positive")
        ...

    if __name__ == "__main__":
        cli.run(main)
"""

import logging
import math
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from absl import app, flags

from dpfed.privacy import audit
from dpfed.train import preemption
from dpfed.train.config import ConfigError

# The flags defined below (`define_seed_flag`, `define_distributed_flags`) are the calling
# binary's key flags, so its --help lists them with its own (absl's --help shows only the
# main module's key flags).
flags.disclaim_key_flags()

EXIT_BAD_FLAG = 2


class FlagError(Exception):
    """A flag value the binary cannot use; `run` reports it as `error: --flag: message`."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag
        self.message = message


def define_seed_flag(default: int, help_text: str = "Random seed.") -> flags.FlagHolder[int]:
    """`--seed`, bounded to 32 bits (`jax.random.key` took no more: seeds 2**32 apart
    were one run) and what numpy's generators accept (no negatives), so a bad one is a
    flag error. It is published (summary.json): a secret one is `--secret_seed`'s."""
    return flags.DEFINE_integer("seed", default, f"{help_text} In [0, 2**32 - 1].",
                                lower_bound=0, upper_bound=2**32 - 1)


def define_secret_seed_flag() -> flags.FlagHolder[bool]:
    """`--secret_seed`, for a binary with `--seed`, `--workdir` and DP releases: its main
    reads the run's seed through `seed_fields`."""
    return flags.DEFINE_bool(
        "secret_seed", False,
        "For a real release: draw a 64-bit seed from the OS's entropy instead of --seed and "
        "keep it in the workdir's secret_seed.json (never share it: it undoes the noise); "
        "summary.json and report.md say 'secret'. A 32-bit --seed can be found by trying "
        "them all. Resumes read it back and need the flag again.")


def define_audit_flag(records: str) -> flags.FlagHolder[int]:
    """`--audit_canaries`, for a trainer whose config has `audit_canaries`
    (`dpfed.privacy.audit`); `records` names what a canary is, e.g. "clients"."""
    return flags.DEFINE_integer(
        "audit_canaries", 0,
        f"Audit run: draw twice this many canary {records}, each inserted by a fair coin "
        f"(about as many inserted as held out; 0 or >= {audit.MIN_CANARIES}), and write "
        "audit.json, an empirical eps estimate and lower bound (Andrew et al. 2024). The "
        "model then holds the canaries: not for release. 0: no audit.", lower_bound=0)


def seed_fields(workdir: str) -> dict[str, Any]:
    """The config fields `seed` and `secret_seed` of a run in `workdir`: `--seed`, or with
    `--secret_seed` the workdir's secret seed (`Workdir.pin_seed`: drawn and written
    before anything uses it, by a fresh run; read back by every later one).

    Call it after `define_distributed_flags`' initialisation (process 0 writes the seed
    that every process of a multi-host job reads).

    Raises:
      FlagError: naming "secret_seed", with an explicit `--seed` (the secret seed replaces
        it), or where the workdir's run started with the other setting of the flag.
    """
    secret = flags.FLAGS.secret_seed
    check(not (secret and flags.FLAGS["seed"].present), "secret_seed",
          "draws the seed itself: drop --seed")
    from dpfed.train.workdir import Workdir  # Imports jax: not needed to parse flags.

    try:
        seed = Workdir(workdir).pin_seed(flags.FLAGS.seed, secret)
    except ConfigError as error:
        raise FlagError(error.field, error.message) from None
    return {"seed": seed, "secret_seed": secret}


def check(condition: bool, flag: str, message: str) -> None:
    """Raises `FlagError(flag, message)` unless `condition` holds."""
    if not condition:
        raise FlagError(flag, message)


def refuse_unused(
    table: Mapping[str, tuple[bool, str]], flag_values: flags.FlagValues = flags.FLAGS
) -> None:
    """Raises `FlagError` for a flag given (on the command line or in a flagfile) where
    another flag chose a mode that ignores it: the user meant it to matter, and the run
    would go on without it (e.g. `--dirichlet_alpha` with `--partition=iid`).

    For flags with a default: a config sees their value, not whether the user gave it.
    A flag left at its default is never refused.

    Args:
      table: {flag name: (ignored, why)}, `ignored` whether this run's mode ignores the
        flag, `why` the mode, e.g. "with --partition=iid (no label skew)".
      flag_values: the parsed flags (the binary's by default).

    Raises:
      FlagError: naming the first flag of `table` that is given and ignored.
    """
    for name, (ignored, why) in table.items():
        check(not (ignored and flag_values[name].present), name, f"has no effect {why}: drop it")


def _exit_bad_flag(line: str) -> NoReturn:
    """Writes `error: <line>` (collapsed to one line) to stderr and exits with code 2."""
    one_line = " ".join(line.split())
    sys.stderr.write(f"error: {one_line}\n")
    sys.stderr.flush()
    sys.exit(EXIT_BAD_FLAG)


def _describe(error: flags.Error) -> str:
    """absl's message for a parsing error, led by the flag name like a `FlagError`."""
    if isinstance(error, flags.UnrecognizedFlagError):
        _, found, suggestions = str(error).partition("Did you mean: ")
        tip = f"; did you mean {suggestions.rstrip(' ?')}?" if found else ""
        return f"--{error.flagname}: unknown flag{tip}"
    if isinstance(error, flags.CantOpenFlagFileError):
        return f"--flagfile: {str(error).removeprefix('ERROR:: ')}"
    return str(error).removeprefix("flag ")


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses absl flags; on any flag error exits with code 2 and one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _exit_bad_flag(_describe(error))


def _check_floats_are_finite() -> None:
    """Raises `FlagError` for a float flag set to inf or nan: absl parses both (and a
    bound like `lower_bound=0.0` lets nan and inf through), but no setting of ours means
    either: a learning rate of inf trains on NaN, a clip norm of inf clips nothing."""
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if not isinstance(flag.parser, flags.FloatParser) or flag.value is None:
            continue
        values = flag.value if isinstance(flag.value, list) else [flag.value]
        for value in values:
            check(math.isfinite(value), name, f"must be a finite number, not {value}")


def define_distributed_flags() -> Callable[[], bool]:
    """Defines `--distributed` and its coordinator flags; returns what `main` calls first.

    A multi-host job runs the same command in every process (`launch/multihost.py`); with
    `--distributed` each calls `jax.distributed.initialize()`, which finds the job on
    Cloud TPU and SLURM; elsewhere `--coordinator_address`, `--num_processes` and
    `--process_id` say where process 0 listens and which process this is (all three or
    none). The returned function checks them (`FlagError`), initialises when asked, and
    returns whether it did; it must run before any other JAX call.
    """
    distributed = flags.DEFINE_bool(
        "distributed", False, "Multi-host job: call jax.distributed.initialize() first.")
    coordinator = flags.DEFINE_string(
        "coordinator_address", None, "With --distributed, where JAX cannot find the job from "
        "the environment (Cloud TPU and SLURM need none of these three): host:port of "
        "process 0.")
    num_processes = flags.DEFINE_integer(
        "num_processes", None, "With --coordinator_address: processes in the job.",
        lower_bound=1)
    process_id = flags.DEFINE_integer(
        "process_id", None, "With --coordinator_address: this process, 0 .. num_processes - 1.",
        lower_bound=0)

    def initialize() -> bool:
        address, count, index = coordinator.value, num_processes.value, process_id.value
        job = {"coordinator_address": address, "num_processes": count, "process_id": index}
        given = [name for name, value in job.items() if value is not None]
        if given:
            check(distributed.value, given[0], "needs --distributed")
            for name, value in job.items():
                check(value is not None, name, f"needed with --{given[0]}")
            assert count is not None and index is not None  # checked just above
            check(index < count, "process_id", f"must be < --num_processes={count}")
        from dpfed.federated.mesh import initialize_distributed  # Imports jax.

        enabled = initialize_distributed(distributed.value, address, count, index)
        if enabled:
            _lock_job_workdir()
        return enabled

    return initialize


# The top-most directory that process 0 of a multi-host job created for the workdir
# when it locked it (`_lock_job_workdir`), for `run` to remove if the run is refused.
_created_by_job: pathlib.Path | None = None


def _lock_job_workdir() -> None:
    """Process 0 of a multi-host job locks `--workdir` (`Workdir.lock`); if another run
    holds it, every process of the job raises `FlagError` (none waits for process 0).

    The job's processes share the workdir, so they cannot each take the lock as a
    single-process run does (`_lock_workdir`); process 0, the one that writes, takes it
    for all of them. A second job on the same workdir (a requeued job while the first
    still runs) would otherwise interleave its checkpoints and ledger with the first's.
    """
    if not _has_workdir():
        return
    import jax  # Already imported by the caller.
    import numpy as np
    from jax.experimental import multihost_utils

    global _created_by_job
    refusal = ""
    if jax.process_index() == 0:
        try:
            _created_by_job = _lock(flags.FLAGS.workdir)
        except ConfigError as error:
            refusal = error.message
    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))):
        raise FlagError("workdir", refusal or "process 0 of this job could not lock it "
                        "(its log says why: in use by another run, or not a directory)")


def _first_missing(path: pathlib.Path) -> pathlib.Path | None:
    """The top-most of `path` and its parents that does not exist (None if `path` does)."""
    missing = None
    for directory in (path, *path.parents):
        if directory.exists():
            return missing
        missing = directory
    return missing


def _lock_workdir() -> pathlib.Path | None:
    """Locks the binary's `--workdir` for the whole process (`Workdir.lock`), if it has one.

    Not with `--distributed`: every host of a multi-host job runs the binary on the one
    shared workdir, so a per-process lock would refuse all hosts but the first; process 0
    takes it for the job once JAX knows which process it is (`_lock_job_workdir`).

    Returns:
      The top-most directory created for the workdir, None if it existed (or no lock).
    """
    if not _has_workdir():
        return None
    if "distributed" in flags.FLAGS and flags.FLAGS.distributed:
        return None
    try:
        return _lock(flags.FLAGS.workdir)
    except ConfigError as error:
        raise FlagError(error.field, error.message) from None


def _has_workdir() -> bool:
    """Whether the binary has a `--workdir` flag and it is set."""
    return "workdir" in flags.FLAGS and flags.FLAGS.workdir is not None


def _lock(workdir: str) -> pathlib.Path | None:
    """Locks `workdir` (`Workdir.lock`, creating it); returns the top-most directory
    created for it, None if it existed.

    Raises:
      ConfigError: the workdir is in use or cannot be a directory.
    """
    from dpfed.train.workdir import Workdir  # Imports jax: not needed to parse flags.

    created = _first_missing(pathlib.Path(workdir).absolute())
    Workdir(workdir).lock()
    return created


def _quiet_backend_probing() -> None:
    """Drops jax's INFO records about backends it probes and does not find.

    On a CPU-only machine every binary's first terminal line was "Unable to initialize
    backend 'tpu': ... libtpu.so ..."; jax's warnings (e.g. a GPU without a CUDA jaxlib)
    still show.
    """
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def _escape_percent_in_usage() -> None:
    """Doubles each '%' of the main module's docstring: absl's `--help` %-formats it with
    the program's name, and "89.4% at" would print as "89.4'<path>'t" (a %a)."""
    main_module = sys.modules.get("__main__")
    if main_module is not None and main_module.__doc__:
        main_module.__doc__ = main_module.__doc__.replace("%", "%%")


def run(main: Callable[[list[str]], Any]) -> NoReturn:
    """Like `absl.app.run(main)`, but bad flags exit with code 2 and one stderr line.

    Flag parsing errors (unknown flag, unparsable or out-of-range value, failed
    validator, required flag missing), a float flag set to inf or nan, and a
    `FlagError` raised from `main` all end
    the process with exit code 2 and a single line; other exceptions propagate. A
    binary with a `--workdir` flag first locks it (in a multi-host job process 0 does,
    for the job, once `main` initialises it: `define_distributed_flags`): a second run
    on the same workdir exits 2 naming the flag while the first is running. A refused
    run leaves no workdir behind that it created and wrote nothing into but its lock,
    config and secret seed (`workdir.remove_if_unused`). A run preempted by SIGTERM in its
    training loop, once that loop saved its checkpoint (`preemption`), exits with code 143
    and one stderr line.
    """

    def main_reporting_flag_errors(argv: list[str]) -> Any:
        _quiet_backend_probing()
        created = None
        try:
            _check_floats_are_finite()
            created = _lock_workdir()
            return main(argv)
        except preemption.PreemptedError as stopped:
            sys.stderr.write(f"{stopped}\n")
            sys.stderr.flush()
            sys.exit(preemption.EXIT_CODE)
        except FlagError as error:
            created = created or _created_by_job
            if created is not None:
                from dpfed.train.workdir import remove_if_unused  # Already imported.

                remove_if_unused(flags.FLAGS.workdir, up_to=created)
            _exit_bad_flag(str(error))

    _escape_percent_in_usage()
    app.run(main_reporting_flag_errors, flags_parser=_parse_flags)
