"""The experiment workdir: crash-safe JSON files, the metrics log, hashes, versions.

A workdir (DESIGN.md, "Workdir contract") is the unit of an experiment: it holds
`metrics.jsonl`, `summary.json`, `report.md`, `ledger.json`, images and
`checkpoints/`. The first four and the images are the run's *releases*: DP releases,
what is computed from them alone, public data (a test split) and settings. Figures
computed from raw private data (a federated simulation's cohort sizes, client losses,
per-client accuracies) go to `diagnostics.jsonl` instead: a simulation diagnostic, not
covered by the privacy guarantee, never to be published with the release. Nor is
`checkpoints/` a release: it holds the whole simulation state, client states included.
Nor, least of all, is `secret_seed.json` (`--secret_seed`, `Workdir.pin_seed`): anyone
holding it can subtract the noise of every release; config.json and the releases say
"secret" where its seed would be (`seeds`).
Two labelled exceptions in `report.md`: the debug pipelines' ground-truth section
(`diagnostics.json`'s figures, headed "not a DP release") and `experiments.evaluate`'s
section (its feature CNN is trained on the real train split; it says so).

In a multi-host job (several JAX processes on one shared workdir, `--distributed`), only
process 0 writes the workdir's files (`writes_files`), each write between two barriers
(`one_write`); the other processes compute the same run and read them, and every process
takes part in the checkpoints (orbax).

JSON files are replaced atomically, so a crash leaves either the old or the new file,
never half of one. JSON is strict (RFC 8259): numpy and jax scalars and arrays become
Python numbers and lists, and the non-finite floats become the strings "NaN",
"Infinity" and "-Infinity", which the readers here turn back into floats.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import pathlib
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dpfed.train import seeds
from dpfed.train.config import ConfigError

METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"  # raw-data figures: not a release (module docstring)
# report.md's evaluation section (`dpfed.eval.evaluation`) lies between these markers.
EVAL_BEGIN = "<!-- dpfed.eval: begin -->"
EVAL_END = "<!-- dpfed.eval: end -->"
# Starts the terminal lines that show raw-data figures (thresholds, group sizes, counts).
RAW_LOG_PREFIX = "[simulation diagnostics, raw data, not a DP release] "
DIAGNOSTICS_JSON = "diagnostics.json"  # a whole run's raw-data figures: not a release
DIAGNOSTICS_JSON_NOTE = (
    "Not a DP release: simulation ground truth and figures computed from raw client data, "
    "not covered by the privacy guarantee; do not publish them with the release."
)
# The sentence reports end with where their run wrote such figures.
DIAGNOSTICS_NOTE = (
    f"Figures computed from raw client data (cohort sizes, client losses and update norms, "
    f"per-client accuracies) are in `{DIAGNOSTICS_FILE}`: non-private simulation "
    f"diagnostics, not covered by the privacy guarantee; do not publish them with this "
    f"report."
)
SUMMARY_FILE = "summary.json"
LEDGER_FILE = "ledger.json"  # before each metrics record (RDP only) and at the end
AUDIT_FILE = "audit.json"  # an audit run's canary figures (`dpfed.privacy.audit`)
REPORT_FILE = "report.md"
CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # a digest of the run's training data (`Workdir.pin_data`)
# Metrics records a resume dropped that its replay has not logged again (`truncate_logs`).
UNREPLAYED_FILE = "unreplayed.jsonl"
# A record's step field leads its line (`_line`): a line torn by a crash names its step
# before any released value, or holds none (`Workdir.torn_release`).
_STEP_KEYS = ("step", "round")
# Marks the record `Workdir.torn_release` makes of a torn line: its step, its whole pairs.
TORN_KEY = "torn"
# Config fields a resumed run may change: how long it runs and how often it reports.
# Any other change would continue a checkpoint under settings it was not trained with.
RESUMABLE_FIELDS = frozenset(
    {"steps", "rounds", "target_epsilon", "eval_every", "checkpoint_every", "num_synthetic",
     "data_dir"}
)

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_to_json(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(value)


def _array_to_python(value: Any) -> Any:
    """A numpy/jax array or scalar as Python numbers (nested lists for arrays)."""
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    array = np.asarray(value)
    if jnp.issubdtype(array.dtype, jnp.floating):  # Includes bfloat16 and friends.
        array = array.astype(np.float64)
    return array.tolist()


def to_jsonable(obj: Any) -> Any:
    """`obj` with every value made strict-JSON serialisable (see the module docstring)."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return _float_to_json(obj)
    if isinstance(obj, dict):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, np.ndarray | np.generic | jax.Array):
        return to_jsonable(_array_to_python(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text for `obj` after `to_jsonable`."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """Parses JSON written by `dumps`, turning "NaN"/"Infinity"/"-Infinity" back into floats."""
    return from_jsonable(json.loads(text))


def as_object(value: Any) -> dict:
    """`value` if it is a dict (a parsed JSON object); else ValueError saying what it is.

    The files of a workdir hold JSON objects; a damaged one may parse as something else.
    """
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def from_jsonable(obj: Any) -> Any:
    """Undoes `to_jsonable`'s encoding of non-finite floats in parsed JSON."""
    if isinstance(obj, str):
        return _NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {key: from_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(value) for value in obj]
    return obj


def writes_files() -> bool:
    """Whether this process writes the workdir's files: the only process, or process 0 of
    a multi-host job (the others would write the same records again)."""
    return jax.process_index() == 0


@contextlib.contextmanager
def one_write(name: str) -> Iterator[bool]:
    """Brackets one write of file `name` by a barrier across the processes of a
    multi-host job on each side; yields whether this process writes (`writes_files`).

    Every process runs the same code and so reaches the same writes in the same order;
    with the barriers, no process reads a file while process 0 writes it, and all of them
    see the same files between two writes. Without them a process could read a file
    before process 0 wrote it (fedgan_debug's read-back of its generator failed so), or
    after, where the others read it before (a check-then-write would then branch apart).
    The barriers check that all processes name the same file. Nothing with one process.
    """
    barrier = jax.process_count() > 1
    if barrier:
        multihost_utils.sync_global_devices(f"dpfed: before writing {name}")
    yield writes_files()
    if barrier:
        multihost_utils.sync_global_devices(f"dpfed: after writing {name}")


def _fsync_dir(directory: pathlib.Path) -> None:
    """Makes a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode(path: pathlib.Path) -> int:
    """`path`'s permission bits, or those of a new file under the process's umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_TMP_SUFFIX = ".tmp"  # of atomic writes' temp files: `.<name>.<random>.tmp`


def atomic_write_bytes(path: pathlib.Path, payload: bytes, mode: int | None = None) -> None:
    """Writes `payload` to `path` atomically: temp file in the same dir, fsync, os.replace.

    A kill (or power loss) at any moment leaves the old file or the new one, never part
    of one. The file keeps its mode (a new one gets the umask's, as `open` would give it),
    not the 0600 of the temp file; `mode` sets it instead. In a multi-host job only
    process 0 writes, between barriers (`one_write`).
    """
    with one_write(path.name) as writes:
        if writes:
            atomic_write_local_bytes(path, payload, mode)


def atomic_write_local_bytes(path: pathlib.Path, payload: bytes, mode: int | None = None) -> None:
    """Writes `payload` to `path` atomically, as `atomic_write_bytes`, but in every process
    of a multi-host job and without barriers: for a host's own cache outside the workdir.

    Hosts each have their own cache and may find different ones (one trained an extractor
    in an earlier job, another did not), so a write that some processes skip must not
    wait for the others. Processes sharing the folder each write a temp file of their own
    and rename it into place: the last rename wins, and a reader sees a whole file.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        os.fchmod(fd, _file_mode(path) if mode is None else mode)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def with_eval_section(report: str, section: str | None) -> str:
    """`report` with `section` between `EVAL_BEGIN` and `EVAL_END`, in place of the one it
    holds (else at its end); `report` as it is when `section` is None."""
    if section is None:
        return report
    before, _, rest = report.partition(EVAL_BEGIN)
    _, _, after = rest.partition(EVAL_END)
    block = f"{EVAL_BEGIN}\n{section}{EVAL_END}\n"
    separator = "\n" if before and not before.endswith("\n\n") else ""
    return before + separator + block + after.lstrip("\n")


def eval_section(report: str) -> str | None:
    """The section `with_eval_section` put in `report`, or None where it holds none."""
    _, begin, rest = report.partition(EVAL_BEGIN)
    section, end, _ = rest.partition(EVAL_END)
    return section.removeprefix("\n") if begin and end else None


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically, as `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Writes what `write(file)` writes (e.g. `np.savez`, `Figure.savefig`) to `path`
    atomically, as `atomic_write_bytes`."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write_bytes(pathlib.Path(path), buffer.getvalue())


LOCK_FILE = ".lock"
_held_locks: dict[pathlib.Path, int] = {}  # workdir lock file -> its open descriptor
# What a run writes before anything else: its lock, its secret seed (`Workdir.pin_seed`),
# its config and its data's digest.
_SETUP_FILES = frozenset({LOCK_FILE, seeds.SECRET_SEED_FILE, CONFIG_FILE, DATA_FILE})
# What shows that a run started in a workdir (every trainer pins config.json first).
_RUN_FILES = (CONFIG_FILE, METRICS_FILE, LEDGER_FILE, SUMMARY_FILE, "checkpoints")


def remove_if_unused(path: str | os.PathLike, up_to: str | os.PathLike | None = None) -> bool:
    """Removes the workdir tree `path` if it holds no file but locks and pins (configs,
    data digests, a secret seed), then its parents up to `up_to` (an ancestor or `path`
    itself) while they are empty.

    For a run refused for a bad flag in a workdir it created (`dpfed.train.cli.run`): it
    leaves nothing behind. A tree holding any other file (metrics, a ledger, a
    checkpoint) is kept whole, and a parent holding anything else (another run's
    workdir) is kept. Returns whether the workdir was removed.
    """
    path = pathlib.Path(path).absolute()
    if any(f.name not in _SETUP_FILES for f in path.rglob("*") if not f.is_dir()):
        return False
    for lock in [lock for lock in _held_locks if lock.is_relative_to(path)]:
        os.close(_held_locks.pop(lock))
    shutil.rmtree(path)
    top = path if up_to is None else pathlib.Path(up_to).absolute()
    for parent in path.parents:
        if not parent.is_relative_to(top):
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
    return True


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What a run trains on, as `Workdir.pin_data` pins it: the `params_sha256` of its
    arrays and the flag that chooses them (named when a resume's data differ)."""

    sha256: str
    flag: str

    @classmethod
    def of(cls, arrays: Any, flag: str) -> "TrainingData":
        """The digest of `arrays` (a pytree: exactly what the run trains on) and `flag`."""
        return cls(params_sha256(arrays), flag)


class Workdir:
    """An experiment's output directory (created if missing)."""

    def __init__(self, path: str | os.PathLike):
        """Creates the directory if missing.

        Raises:
          ConfigError: naming "workdir", for an empty path (which would be the current
            directory) or a path that cannot be a directory (a file, or unwritable).
        """
        if not os.fspath(path):
            raise ConfigError("workdir", "must name a directory, got an empty path")
        self._path = pathlib.Path(path).absolute()
        try:
            self._path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                "workdir", f"cannot be used as a directory: {error.strerror}: {self._path}"
            ) from None
        self._tail_checked: set[str] = set()
        self._metrics_records: int | None = None
        self._unreplayed: list[dict] | None = None  # unreplayed.jsonl, read once
        self._replayed: set[int] = set()  # its steps this process logged again

    @property
    def path(self) -> pathlib.Path:
        """The absolute path of the workdir."""
        return self._path

    def file(self, name: str) -> pathlib.Path:
        """The path of `name` inside the workdir (not created)."""
        return self._path / name

    def lock(self) -> None:
        """Takes an exclusive lock on the workdir, held until this process exits (or `unlock`).

        Two runs at once on one workdir would interleave their metrics, checkpoints and
        ledgers, leaving releases that no ledger covers; the experiment binaries take
        this lock first (`dpfed.train.cli.run`). Taking it again in this process is a
        no-op. Once it is held, the temp files of atomic writes that a killed run left
        anywhere under the workdir are removed (no other process can be writing them).

        Raises:
          ConfigError: naming "workdir", when another process holds the lock.
        """
        path = self.file(LOCK_FILE)
        if path in _held_locks:
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(
                "workdir", f"cannot be written: {error.strerror}: {self.path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                "workdir", f"{self.path} is in use by another run: wait for it to end or "
                "use another workdir"
            ) from None
        except OSError as error:  # a file system without locks (Lustre without -o flock)
            os.close(fd)
            logging.warning("%s cannot be locked on this file system (%s): nothing keeps a "
                            "second run off it", self.path, error.strerror)
            return
        _held_locks[path] = fd
        for leftover in self.path.rglob(f".*{_TMP_SUFFIX}"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)

    def unlock(self) -> None:
        """Releases this process's lock on the workdir (`lock`), if it holds it: for a
        process that locks a workdir only while it readies or moves it (`launch.reproduce`),
        even once moved."""
        fd = _held_locks.pop(self.file(LOCK_FILE), None)
        if fd is not None:
            os.close(fd)

    def write_json(self, name: str, obj: Any) -> pathlib.Path:
        """Atomically writes `obj` as indented strict JSON to `name`; returns its path."""
        path = self.file(name)
        atomic_write_text(path, dumps(obj, indent=2, sort_keys=True) + "\n")
        return path

    def write_bytes(self, name: str, payload: bytes) -> pathlib.Path:
        """Atomically writes `payload` to `name` (e.g. released parameters); returns its path."""
        path = self.file(name)
        atomic_write_bytes(path, payload)
        return path

    def read_json(self, name: str) -> Any:
        """Reads a JSON file written by `write_json`."""
        return loads(self.file(name).read_text(encoding="utf-8"))

    def read_json_object(self, name: str) -> dict:
        """Reads a JSON file that must hold an object (config.json, ledger.json, ...).

        Raises:
          ValueError: the file is not JSON (truncated, say) or holds no object.
        """
        return as_object(self.read_json(name))

    def pin_config(
        self, config: Any, resuming: bool, resumable: frozenset[str] = RESUMABLE_FIELDS
    ) -> None:
        """Records the run's config (a dataclass) in config.json; on a resume, first checks it.

        Raises:
          ConfigError: as `check_config`.
        """
        pin = self._public_pin(config)  # reads secret_seed.json once, for both
        self._check_pin(pin, resuming, resumable, required=False)
        self.write_json(CONFIG_FILE, pin)

    def check_config(
        self, config: Any, resuming: bool, resumable: frozenset[str] = RESUMABLE_FIELDS,
        required: bool = False,
    ) -> None:
        """On a resume, checks the run's config (a dataclass) against config.json.

        Both as config.json holds them (`seeds.public_config`): a secret seed is "secret",
        so a run started with `--secret_seed` resumes with it, and without it is refused.
        With a secret seed whose secret_seed.json is here, config.json also pins that
        file's nonce (`seeds.NONCE_FIELD`): a resume with another run's file is refused.

        Raises:
          ConfigError: `resuming` and a field outside `resumable` differs from the
            config.json of the run being resumed (named, with both values), so a changed
            flag never silently continues another run's checkpoint and ledger; or
            config.json is unreadable, or missing where `required` (a checkpoint or
            releases of an earlier run are here: without config.json nothing checks the
            flags they were made with, so a copied checkpoints/ would continue under any
            flags). Otherwise a workdir from before config.json existed passes. Naming
            "secret_seed", as `check_secret_is_this_runs`; naming "seed", as `_public_pin`.
        """
        self._check_pin(self._public_pin(config), resuming, resumable, required)

    def _check_pin(
        self, pin: dict, resuming: bool, resumable: frozenset[str], required: bool
    ) -> None:
        """`check_config` of the run's config.json object `pin` (`_public_pin`)."""
        current = loads(dumps(pin))
        path = self.file(CONFIG_FILE)
        if resuming and required and not path.exists():
            raise ConfigError(
                "workdir",
                f"{path} is missing, but {self.path} holds a checkpoint or releases of an "
                "earlier run: nothing says with which settings they were made (was "
                "checkpoints/ copied from another workdir?). Restore it or use a new workdir",
            )
        pinned = self.read_pin(CONFIG_FILE, resuming)
        if pinned is not None:
            if current.get("secret_seed"):
                self.check_secret_is_this_runs(current.get(seeds.NONCE_FIELD), pinned)
            for field in sorted(set(pinned) | set(current)):
                if field not in resumable and pinned.get(field) != current.get(field):
                    raise ConfigError(
                        field,
                        f"is {current.get(field)!r} but the run being resumed in {self.path} "
                        f"used {pinned.get(field)!r}: use the same value or a new workdir",
                    )

    def _public_pin(self, config: Any) -> dict:
        """config.json's object for the run's `config`: `seeds.public_config`, and where
        the seed is secret and secret_seed.json is here, that file's nonce (none in a file
        from before nonces existed) under `seeds.NONCE_FIELD`.

        Raises:
          ConfigError: naming "seed", when the secret seed is not the one in
            secret_seed.json (a config built outside `cli.seed_fields`); naming "workdir",
            when that file is unreadable.
        """
        pin = seeds.public_config(config)
        stored = self._read_secret_file() if pin.get("secret_seed") else None
        if stored is not None:
            if config.seed != stored["seed"]:
                raise ConfigError(
                    "seed",
                    f"is not the secret seed in {self.file(seeds.SECRET_SEED_FILE)}, which "
                    f"the run in {self.path} draws from (`Workdir.pin_seed`): use that one "
                    "or a new workdir",
                )
            nonce = seeds.read_nonce(stored)
            if nonce is not None:
                pin[seeds.NONCE_FIELD] = nonce
        return pin

    def _read_secret_file(self) -> dict | None:
        """The parsed secret_seed.json, its seed and nonce checked; None where it is not.

        Raises:
          ConfigError: naming "workdir", when it is unreadable.
        """
        path = self.file(seeds.SECRET_SEED_FILE)
        if not path.exists():
            return None
        try:
            stored = self.read_json_object(seeds.SECRET_SEED_FILE)
            seeds.read_secret(stored)
            seeds.read_nonce(stored)
        except ValueError as error:
            raise ConfigError(
                "workdir", f"{path} is unreadable ({error}): restore it or use a new workdir",
            ) from None
        return stored

    def check_secret_is_this_runs(self, nonce: str | None, pinned: dict | None) -> None:
        """Refuses a secret_seed.json (its nonce `nonce`; None for none or no file) that
        is not the one of the secret run config.json pins (`pinned`; None: no run yet).

        A secret_seed.json copied from another workdir would continue this run with that
        run's seed: its later releases would draw noise correlated with the other run's,
        and replay none of this run's. config.json pins the nonce of this run's file
        (`seeds.draw_nonce`: random, so public; no function of the seed, which hashing
        every 64-bit seed would find). A run from before nonces pinned none, nor did its
        file hold one: it passes unchecked, as before (its runs stay resumable).

        Raises:
          ConfigError: naming "secret_seed", when the nonces differ.
        """
        if pinned is None or not pinned.get("secret_seed"):
            return  # no run yet, or a public one: `check_config` names --secret_seed
        theirs = pinned.get(seeds.NONCE_FIELD)
        if nonce == theirs:
            return
        path = self.file(seeds.SECRET_SEED_FILE)
        held = (f"{path} holds the nonce {nonce or 'none (a file from before nonces)'}"
                if path.exists() else f"there is no {path}")
        raise ConfigError(
            "secret_seed",
            f"config.json pins the secret seed of the run in {self.path} by the nonce "
            f"{theirs or 'none (a run from before nonces)'}, but {held}: it is another "
            "run's (copied from another workdir?), whose seed would give this run's next "
            f"releases that run's noise. Restore this run's {seeds.SECRET_SEED_FILE} or "
            "use a new workdir",
        )

    def read_pin(self, name: str, resuming: bool) -> dict | None:
        """The JSON object an earlier run pinned in `name` (config.json, data.json, a
        demo's groups.json) when `resuming`; None for a fresh run or a workdir without it.

        Raises:
          ConfigError: naming "workdir", when the file is unreadable.
        """
        if not (resuming and self.file(name).exists()):
            return None
        try:
            return self.read_json_object(name)
        except ValueError as error:
            raise ConfigError(
                "workdir",
                f"{self.file(name)} is unreadable ({error}): restore it or use a new workdir",
            ) from None

    def pin_seed(self, seed: int, secret: bool) -> int:
        """The run's seed: `seed`, or with `secret` the secret seed in secret_seed.json.

        A secret seed is drawn (`seeds.draw_secret`) only in a workdir where no run has
        started, and written (mode 0600, atomically) before anything uses it; every later
        invocation (a resume, a rerun of a finished or killed run) reads it back, so the
        releases of one workdir never mix two seeds. In a multi-host job every process
        reads the one that process 0 wrote. With the seed the file holds a nonce
        (`seeds.draw_nonce`) that config.json pins (`pin_config`): every later invocation
        checks that the file is its run's (`check_secret_is_this_runs`). A file here
        before any run started (copied in, or a run killed before it pinned its config)
        is used, with a warning: two runs of one seed draw the same noise.

        Raises:
          ConfigError: naming "secret_seed", when `secret` and a run started here without
            a secret_seed.json (so without `--secret_seed`, or it was lost), or with
            another run's (`check_secret_is_this_runs`), or when not `secret` and
            secret_seed.json is here; naming "workdir", when it or config.json is
            unreadable.
        """
        path = self.file(seeds.SECRET_SEED_FILE)
        if not secret:
            if path.exists():
                raise ConfigError(
                    "secret_seed",
                    f"{self.path} holds {seeds.SECRET_SEED_FILE}: its run was started with "
                    "--secret_seed; rerun with it (and without --seed) or use a new workdir",
                )
            return seed
        if not path.exists():
            started = [name for name in _RUN_FILES if self.file(name).exists()]
            if started:
                raise ConfigError(
                    "secret_seed",
                    f"{self.path} holds a run ({', '.join(started)}) but no "
                    f"{seeds.SECRET_SEED_FILE}: a secret seed is drawn only where no run "
                    "started. Rerun without --secret_seed if that run had none, restore its "
                    f"{seeds.SECRET_SEED_FILE} if it had, or use a new workdir",
                )
            drawn = {"seed": seeds.draw_secret(), "nonce": seeds.draw_nonce(),
                     "note": seeds.SECRET_SEED_NOTE}
            atomic_write_bytes(path, (dumps(drawn, indent=2) + "\n").encode(), mode=0o600)
        elif not any(self.file(name).exists() for name in _RUN_FILES) and writes_files():
            # Nothing tells a copy from a run killed before it pinned its config.
            logging.warning(
                "%s was here before any run started in %s: if it was copied from another "
                "workdir, this run draws that run's noise, and the two runs' releases "
                "together undo it (their differences hold no noise). Use a fresh secret "
                "(remove the file) unless it is this workdir's own.", path, self.path)
        stored = self._read_secret_file()
        assert stored is not None  # written above, or there before
        self.check_secret_is_this_runs(
            seeds.read_nonce(stored), self.read_pin(CONFIG_FILE, resuming=True))
        return seeds.read_secret(stored)

    def pin_data(self, data: TrainingData, resuming: bool) -> None:
        """Records the digest of the run's training data in data.json; on a resume, first
        checks it.

        Raises:
          ConfigError: as `check_data`.
        """
        self.check_data(data, resuming)
        self.write_json(DATA_FILE, {"sha256": data.sha256})

    def check_data(self, data: TrainingData, resuming: bool) -> None:
        """On a resume, checks the digest of the run's training data against data.json.

        `config.json` pins the flags, not the data they name: `data_dir` may move
        (`RESUMABLE_FIELDS`), and another folder may hold another version of the data.

        Raises:
          ConfigError: naming `data.flag`, when `resuming` and the data differ from those
            of the run being resumed, so its model and ledger never continue on other
            data; naming "workdir", when data.json is unreadable. A workdir without
            data.json (from before it existed) passes.
        """
        pin = self.read_pin(DATA_FILE, resuming)
        if pin is None:
            return
        pinned = pin.get("sha256")
        if pinned != data.sha256:
            raise ConfigError(
                data.flag,
                f"the training data differ from those of the run being resumed in "
                f"{self.path} (sha256 {data.sha256:.12}..., pinned {pinned!s:.12}...): "
                "restore those data or use a new workdir",
            )

    def write_summary(self, summary: dict) -> pathlib.Path:
        """Atomically writes `summary.json`."""
        return self.write_json(SUMMARY_FILE, summary)

    def write_report(self, markdown: str, keep_evaluation: bool = False) -> pathlib.Path:
        """Atomically writes `report.md`; with `keep_evaluation`, the evaluation section
        (`experiments.evaluate`'s, between `EVAL_BEGIN` and `EVAL_END`) of the report there
        is carried over to the end: a rerun of a finished run trains nothing, so the
        evaluation still holds (a run that trained on would leave it stale: dropped)."""
        path = self.file(REPORT_FILE)
        text = markdown if markdown.endswith("\n") else markdown + "\n"
        if keep_evaluation and path.exists():
            text = with_eval_section(text, eval_section(path.read_text(encoding="utf-8")))
        atomic_write_text(path, text)
        return path

    def append_metrics(self, record: dict) -> None:
        """Appends `record` (releases only) as one JSON line to `metrics.jsonl`, durably."""
        count = self.metrics_records
        self._append(METRICS_FILE, record)
        self._metrics_records = count + 1

    def append_release(self, record: dict, ledger: Any | None) -> None:
        """Writes `ledger` (a `PrivacyLedger` that counts `record`'s release; None for a
        non-private run) as ledger.json, then appends `record` to metrics.jsonl.

        A kill between any two writes thus leaves a ledger.json that covers every record
        of metrics.jsonl. This copy's eps is RDP only (its PLD eps takes ~0.5 s): the
        run's end writes ledger.json again, with both.

        A resume's replay counts each step a killed run logged once, as the same release
        again; so a private record must equal the killed run's record of its step
        (`unreplayed.jsonl`; a torn one in the pairs it holds), or nothing is written.
        While the replay is behind a step the killed run logged, ledger.json is left as
        it is: it counts that later release, and the replay's would not.

        Raises:
          ConfigError: naming "workdir", for a private record that differs from the
            killed run's record of its step (other random numbers or arithmetic: another
            JAX version or `JAX_THREEFRY_PARTITIONABLE`, other devices, changed code), or
            that passes a step the killed run logged and this replay did not.
        """
        key = next((k for k in _STEP_KEYS if k in record), None)
        behind = False
        if ledger is not None and key is not None:
            unreplayed = self._read_unreplayed()
            self._check_replay(record, [r for r in unreplayed if r.get(key, 0) <= record[key]],
                               key)
            behind = any(r.get(key, 0) > record[key] for r in unreplayed)
        if ledger is not None and not behind:
            self.write_json(LEDGER_FILE, ledger.to_json(with_pld=False))
        self.append_metrics(record)

    def _read_unreplayed(self) -> list[dict]:
        if self._unreplayed is None:
            self._unreplayed = self._read(UNREPLAYED_FILE)
        return self._unreplayed

    def _check_replay(self, record: dict, earlier: list[dict], key: str) -> None:
        """Raises unless `record` holds the pairs of the killed run's record of its step
        (in `earlier`, the unreplayed records up to it), with the same values (compared as
        logged), and this replay logged each earlier one too (a changed `eval_every`
        would skip some: their releases could not be checked)."""
        step = record[key]
        skipped = [r[key] for r in earlier if r[key] < step and r[key] not in self._replayed]
        if skipped:
            raise ConfigError(
                "workdir",
                f"this resume's replay logs {key} {step} but not {key}s {skipped}, which a "
                f"killed run logged ({self.file(UNREPLAYED_FILE)}), so it cannot check that it "
                "released them again alike (was the evaluation interval changed?). Resume "
                "with the killed run's settings (its config.json), or use a new workdir",
            )
        logged = next((r for r in earlier if r[key] == step), None)
        if logged is None:
            return
        now = loads(_line(record))
        names = [n for n in logged if n != TORN_KEY] if logged.get(TORN_KEY) else list(now | logged)
        differ = sorted(n for n in names
                        if n not in now or n not in logged or dumps(now[n]) != dumps(logged[n]))
        if differ:
            shown = ", ".join(f"{n}: {logged.get(n)!r} logged, {now.get(n)!r} now"
                              for n in differ[:3])
            raise ConfigError(
                "workdir",
                f"the replay of {key} {record[key]} differs from the release a killed run "
                f"logged there ({self.file(UNREPLAYED_FILE)}; {shown}): the same step "
                "released twice with other values, which the ledger counts once. Were the "
                "random numbers or the arithmetic changed (JAX version, "
                "JAX_THREEFRY_PARTITIONABLE, devices, code)? Resume where the killed run "
                "ran, or use a new workdir",
            )
        self._replayed.add(step)

    @property
    def metrics_records(self) -> int:
        """How many records `metrics.jsonl` holds (read once, then counted as appended):
        what a checkpoint stores, so a resume can tell records removed by hand."""
        if self._metrics_records is None:
            self._metrics_records = len(self.read_metrics())
        return self._metrics_records

    def append_diagnostics(self, record: dict) -> None:
        """Appends `record` (raw-data figures, not a release) to `diagnostics.jsonl`."""
        self._append(DIAGNOSTICS_FILE, record)

    def read_metrics(self) -> list[dict]:
        """All records of `metrics.jsonl` in order; a torn last line (a crash) is ignored."""
        return self._read(METRICS_FILE)

    def read_diagnostics(self) -> list[dict]:
        """All records of `diagnostics.jsonl` in order; a torn last line is ignored."""
        return self._read(DIAGNOSTICS_FILE)

    def read_released(self, key: str = "step") -> list[dict]:
        """The records of every release logged here: metrics.jsonl's, then those of
        `unreplayed.jsonl` past its last `key` (dropped by a resume, not yet logged again),
        and the release of its torn last line (`torn_release`), if it holds one.

        Raises:
          ConfigError: as `torn_release`.
        """
        records = self.read_metrics()
        logged = max((r[key] for r in records if key in r), default=0)
        later = [r for r in self._read(UNREPLAYED_FILE) if r.get(key, 0) > logged]
        torn = self.torn_release(key)
        if torn is not None and torn[key] > logged and all(r.get(key) != torn[key] for r in later):
            later.append(torn)
        return records + later

    def torn_release(self, key: str = "step") -> dict | None:
        """The release of metrics.jsonl's torn last line (a run killed while logging it),
        as `{key: its step, TORN_KEY: True}` with the pairs the line holds whole (each
        followed by a comma: a number cut short is not one); None where no line is torn,
        or the torn one holds no released value (it ends within its leading
        `{"<key>": <step>`).

        Its bytes are on disk, so it is a release: ledger.json counts it (written first,
        `append_release`), and a resume must replay its step as any other logged one
        (`read_released`), or be refused, lest it end with a ledger that does not.

        Raises:
          ConfigError: naming "workdir", for a torn line that holds more but names no
            step first (written before steps led the lines): its step is unknown.
        """
        path = self.file(METRICS_FILE)
        if not path.exists():
            return None
        data = path.read_bytes()
        tail = data[data.rfind(b"\n") + 1:].decode("utf-8", errors="replace")
        lead = f'{{"{key}": '
        if not tail or lead.startswith(tail) or re.fullmatch(re.escape(lead) + r"\d*", tail):
            return None
        step = re.match(re.escape(lead) + r"(\d+)[,}]", tail)
        if step is None:
            raise ConfigError(
                "workdir",
                f"{path} ends in a line torn by a crash that names no {key}: it may hold a "
                "release, and this run cannot tell which one to replay. Remove that line by "
                "hand and resume with the killed run's settings (its config.json), so that "
                "the replay logs that release again, or use a new workdir",
            )
        return {**_complete_pairs(tail), key: int(step[1]), TORN_KEY: True}

    def truncate_logs(self, after_step: int, key: str = "step") -> int:
        """Drops the records with `record[key] > after_step` from both logs.

        Call it on resume with the restored checkpoint's step, so records logged after
        that checkpoint by a killed run are not duplicated. Records without `key` stay.
        The releases dropped (with those an earlier resume dropped and no replay has
        logged again) go to `unreplayed.jsonl` first: if this run is killed before its
        replay logs them again, the next resume still sees them (`read_released`), so
        it must replay them too, with the same mechanism, or is refused.

        Returns:
          How many records of `metrics.jsonl` were dropped.
        """
        unreplayed = [r for r in self.read_released(key) if r.get(key, 0) > after_step]
        path = self.file(UNREPLAYED_FILE)
        if unreplayed or path.exists():
            atomic_write_text(path, "".join(_line(r) for r in unreplayed))
        self._unreplayed, self._replayed = None, set()
        dropped = {}
        for name in (METRICS_FILE, DIAGNOSTICS_FILE):
            records = self._read(name)
            kept = [r for r in records if key not in r or r[key] <= after_step]
            path = self.file(name)
            if path.exists():  # atomic_write_text: process 0 of a multi-host job only
                atomic_write_text(path, "".join(_line(r) for r in kept))
            self._tail_checked.add(name)
            dropped[name] = len(records) - len(kept)
            if name == METRICS_FILE:
                self._metrics_records = len(kept)
        return dropped[METRICS_FILE]

    def _append(self, name: str, record: dict) -> None:
        """Appends one JSON line to `name` with flush + fsync (a torn tail is cut first);
        in a multi-host job process 0 alone, between barriers (`one_write`)."""
        path = self.file(name)
        with one_write(name) as writes:
            if not writes:
                return
            if name not in self._tail_checked:
                _drop_torn_last_line(path)
                self._tail_checked.add(name)
            with path.open("a", encoding="utf-8") as f:
                f.write(_line(record))
                f.flush()
                os.fsync(f.fileno())

    def _read(self, name: str) -> list[dict]:
        """The records of the JSON-lines file `name`; a torn last line is ignored.

        Raises:
          ConfigError: naming "workdir", for a complete line that is not a JSON object.
        """
        path = self.file(name)
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8")
        complete, _, _ = text.rpartition("\n")
        records = []
        for number, line in enumerate(complete.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = as_object(loads(line))
            except ValueError as error:
                raise ConfigError(
                    "workdir",
                    f"{path}, line {number}, is not a record ({error}): repair or remove that "
                    "line, or use a new workdir",
                ) from None
            records.append(record)
        return records


def _line(record: dict) -> str:
    """`record` as one JSON line, its keys sorted but its step field (`_STEP_KEYS`) first,
    so that a line torn by a crash names its step before any released value."""
    first = next((k for k in _STEP_KEYS if k in record), None)
    rest = dumps({k: v for k, v in record.items() if k != first}, sort_keys=True)
    if first is None:
        return rest + "\n"
    lead = dumps({first: record[first]})
    return lead + "\n" if rest == "{}" else f"{lead[:-1]}, {rest[1:]}\n"


def _complete_pairs(torn: str) -> dict:
    """The `"key": value` pairs a torn JSON-object line holds whole: those before its last
    `, "` that parse as an object (a value cut short has no comma after it yet)."""
    for cut in reversed([m.start() for m in re.finditer(r', "', torn)]):
        try:
            record = loads(torn[:cut] + "}")
        except ValueError:  # the cut fell inside a string value: try an earlier one
            continue
        if isinstance(record, dict):
            return record
    return {}


def _drop_torn_last_line(path: pathlib.Path) -> None:
    """Cuts a last line without its newline (a write cut short by a crash)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def _leaf_as_array(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def params_sha256(params: Any) -> str:
    """A SHA-256 hex digest of a pytree of arrays, stable across runs and machines.

    Leaves are taken in the order of their sorted `jax.tree_util.keystr` paths; each
    contributes its dtype name, its shape and its C-contiguous little-endian bytes
    (read in place, not copied: training data of hundreds of MB are hashed too).
    Typed PRNG keys are hashed through their raw key data.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    digest = hashlib.sha256()
    for _, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = _leaf_as_array(leaf)
        little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        digest.update(f"{array.dtype.name}{array.shape}".encode())
        digest.update(little_endian.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_VERSIONED = ("jax", "jaxlib", "flax", "optax", "dp-accounting", "orbax-checkpoint", "numpy")


# Vector units XLA:CPU compiles for: the same program on CPUs with others may round floats
# differently (a long, noisy run then ends elsewhere).
_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The host CPU's model name and which of `_SIMD_FLAGS` it has (from /proc/cpuinfo;
    the model alone where that file cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"cpu": platform.processor() or "unknown"}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name") or platform.processor() or "unknown",
            "cpu_simd": [f for f in _SIMD_FLAGS if f in flags]}


# JAX settings that change the numbers of a run: every random draw of a seed, the
# precision of matmuls, the default float width.
_JAX_NUMERIC_CONFIG = (
    "jax_threefry_partitionable", "jax_default_matmul_precision", "jax_enable_x64")


def xla_flags(flags: str | None = None) -> list[str]:
    """`XLA_FLAGS` (default: this process's) as a list, path values masked as `<path>`.

    They change the floats a run computes (LLVM's optimisation level, fast math), so the
    same seed and flags on the same machine can end with another `params_sha256`; a dump
    folder's path can name a user.
    """
    if flags is None:
        flags = os.environ.get("XLA_FLAGS", "")
    masked = []
    for flag in flags.split():
        name, sep, value = flag.partition("=")
        masked.append(f"{name}=<path>" if sep and "/" in value else flag)
    return masked


def environment_info() -> dict:
    """Software versions, the CPU and accelerator facts, `XLA_FLAGS` and the JAX settings
    that change results, for `summary.json` (no host or user names)."""
    devices = jax.devices()
    return {
        "python": platform.python_version(),
        **{name.replace("-", "_"): _version(name) for name in _VERSIONED},
        "platform": f"{platform.system()}-{platform.machine()}",
        **cpu_info(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "xla_flags": xla_flags(),
        "jax_config": {name: getattr(jax.config, name) for name in _JAX_NUMERIC_CONFIG},
    }
