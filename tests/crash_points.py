"""Crash points: an experiment binary killed before each of its writes, then rerun.

The project's promise: a run killed at any moment resumes from its workdir without
losing or double-counting privacy spend. A *write point* is each write a run makes
under its workdir: a JSON, PNG or msgpack file (`workdir.atomic_write_local_bytes`), a
line of a log (`Workdir._append`), a checkpoint (`Checkpointer.save`), and the rename
that completes a checkpoint (orbax's `finalize`: a kill there leaves it half written).

A run of the binary in a child process (`python -m tests.crash_points child ...`)
records each write point in a trace file and SIGKILLs itself before the k-th one,
so nothing after it runs (no `finally`, no `atexit`), as a real kill would leave it.
The same command is then run again on the workdir, and `check_crashed`,
`crash_and_rerun` and `assert_same_workdir` judge:

  (a) after the kill, every released file (metrics records, model files, samples,
      summaries, report, group sizes) is counted by a ledger present; a model without
      one (a `--nodp` run's) states no eps and writes no ledger;
  (b) the rerun exits 0 (never refused) and draws no release again that is on disk
      (the noised group sizes: `group_sizes.noisy_group_sizes`);
  (c) the rerun ends with the uninterrupted run's files: ledgers, metrics and
      diagnostics records, summaries (wall times aside), model files and samples byte
      for byte (`assert_same_workdir`);
  (d) in a `--secret_seed` mode, no file but secret_seed.json ever holds the secret
      seed (`assert_secret_kept`).

As a script it sweeps every write point of one binary's mode (WORKSPACE.md, "Crash
points"), or, with `--double=K`, every write of the rerun of a run killed at K:

  JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache .venv/bin/python -m tests.crash_points \
    fedgan_debug --mode=group [--points=3,17] [--double=20]

A binary that reads another's finished workdir (`experiments.evaluate`) names it as
`Binary.prepared`: each of its runs starts from a copy of that workdir.

The tests (`tests/test_crash_points.py`) keep a few of the riskiest points.
"""

import argparse
import atexit
import dataclasses
import json
import math
import os
import pathlib
import re
import runpy
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The first argument of a child run (`python -m tests.crash_points child ...`).
CHILD = "child"
KILLED = -signal.SIGKILL  # A child's exit code when it killed itself at its point.
# A multi-host job's launcher's exit code when one of its processes was killed so (it
# reports it as a shell does: `launch.multihost`; `tests.crash_multihost`).
KILLED_IN_JOB = 128 + signal.SIGKILL

# Files a run writes that are no release and may differ between runs (a resume's).
_NOT_COMPARED = (".lock", "unreplayed.jsonl")
# JSON keys whose values are wall times (they differ run to run).
_WALL_TIME_KEYS = ("wall_seconds", "wall_seconds_earlier", "seconds_per_round", "elapsed",
                   "eval_wall_seconds", "train_wall_seconds")


@dataclasses.dataclass(frozen=True)
class Binary:
    """An experiment binary at the tests' tiny settings, in one mode.

    Attributes:
      module: the binary, e.g. "experiments.fedgan_debug".
      flags: its flags but `--workdir`.
      models: the sub-workdirs holding one model's ledger.json and metrics.jsonl each
        ("" for the workdir itself).
      prepared: a binary whose finished workdir each run of this one starts from (the
        evaluation binary's: a trained generator), made once per process and copied.
      secret: with `--secret_seed` among `flags`, the secret seed each new workdir starts
        with in its secret_seed.json (written here, as a fresh run's first write would
        write a drawn one), so the uninterrupted run and every killed run draw the same
        noise; (d) no other file ever holds its digits (`assert_secret_kept`).
      launcher: the module and first arguments that start each run of it (a multi-host
        job's `launch.multihost local ...`: `tests.crash_multihost`); () for
        `python -m module` itself.
    """

    module: str
    flags: tuple[str, ...]
    models: tuple[str, ...]
    prepared: "Binary | None" = None
    secret: int | None = None
    launcher: tuple[str, ...] = ()

    def args(self, workdir: pathlib.Path) -> list[str]:
        """Its flags for `workdir` (`{workdir}` in a flag replaced by it, and
        `{inception_weights}` by `inception_weights()`)."""
        return [_with_inputs(f).replace("{workdir}", str(workdir)) for f in self.flags] + [
            f"--workdir={workdir}"]


# The files that flags name as a user's inputs, outside every workdir (no write point,
# not compared), each made once per process.
_INPUTS: dict[str, pathlib.Path] = {}


def inception_weights() -> pathlib.Path:
    """An FID Inception weights file (`--inception_weights`): the tests' random arrays in
    the real file's format (`tests.eval.inception_weights`), made on first use."""
    if "inception_weights" not in _INPUTS:
        from tests.eval import inception_weights as weights  # Imports jax: see `run`.

        scratch = tempfile.mkdtemp(prefix="crash_points-inputs-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        path = pathlib.Path(scratch) / "inception_weights.npz"
        weights.write(path)
        _INPUTS["inception_weights"] = path
    return _INPUTS["inception_weights"]


def _with_inputs(flag: str) -> str:
    """`flag` with `{inception_weights}` replaced by its file (made only if named)."""
    placeholder = "{inception_weights}"
    return flag.replace(placeholder, str(inception_weights())) if placeholder in flag else flag


# The debug demos' tests' TINY settings (tests/experiments/test_fed*_debug.py): 2 rounds,
# evaluated and checkpointed every round.
_FEDGAN_TINY = (
    "--num_clients=24", "--classifier_epochs=1", "--rounds=2", "--clients_per_round=2",
    "--sampling=fixed", "--noise_multiplier=0.5", "--d_conv_features=4,8",
    "--d_dense_features=16", "--g_dense_features=16", "--g_base_features=8",
    "--g_convt_features=8,4", "--noise_dim=8", "--batch_size=4", "--client_d_steps=1",
    "--server_g_steps=1", "--num_samples=16", "--eval_every=1", "--checkpoint_every=1")
_FEDLM_TINY = (
    "--min_lines=200", "--seq_len=16", "--max_seqs=4", "--embed_dim=4", "--hidden=8",
    "--local_steps=1", "--local_batch_size=2", "--rounds=2", "--clients_per_round=2",
    "--sampling=fixed", "--noise_multiplier=0.5", "--num_sample_lines=4",
    "--sample_length=20", "--top_k=3", "--eval_every=1", "--checkpoint_every=1")
# --group_sampling=population as the tests run it: Poisson cohorts, given thresholds.
_POPULATION = ("--clients_per_round=4", "--sampling=poisson", "--group_sampling=population",
               "--low_threshold=0.3", "--high_threshold=0.7")
# tests/experiments/test_dpd_fvae.py's TINY.
_DPD_FVAE_TINY = (
    "--dataset=digits", "--num_clients=8", "--client_fraction=0.5", "--rounds=2",
    "--local_epochs=1", "--batch_size=90", "--latent_dim=2", "--encoder_features=4",
    "--decoder_features=4", "--eval_every=1", "--checkpoint_every=1", "--noevaluate")

# tests/experiments/test_dpsgd_classifier.py's logreg runs, 2 steps, each evaluated and
# checkpointed.
_DPSGD_TINY = ("--model=logreg", "--steps=2", "--batch_size=64", "--noise_multiplier=1.1",
               "--eval_every=1", "--checkpoint_every=1")
# tests/experiments/test_fedavg_classifier.py's FAST logreg: 2 rounds of Poisson cohorts.
_FEDAVG_TINY = ("--model=logreg", "--local_steps=2", "--local_batch_size=10",
                "--num_clients=20", "--clients_per_round=5", "--rounds=2",
                "--noise_multiplier=1.0", "--eval_every=1", "--checkpoint_every=1")


def _no_noise(tiny: tuple[str, ...]) -> tuple[str, ...]:
    """`tiny`'s flags without `--noise_multiplier` (for a target eps or `--nodp`)."""
    return tuple(f for f in tiny if not f.startswith("--noise_multiplier="))


# tests/experiments/test_datalens.py's TINY: 2 generator steps.
_DATALENS_TINY = (
    "--dataset=digits", "--num_teachers=12", "--topk=6", "--sigma=30", "--beta=0.3",
    "--z_dim=4", "--pretrain_steps=1", "--batch_size=4", "--real_batch=4",
    "--teacher_features=4", "--generator_hidden=16", "--generator_width=4",
    "--teacher_chunk=2", "--num_synthetic=20", "--steps=2", "--eval_every=1",
    "--checkpoint_every=1")

# tests/experiments/test_evaluate.py's _SMALL, one downstream model, the fid_domain
# extractor's cache in the workdir (its two writes are points too), of DataLens's
# finished workdir.
_EVALUATE_SMALL = ("--num_samples=200", "--max_epochs=1", "--extractor_steps=10",
                   "--models=logreg", "--cache_dir={workdir}/extractor_cache")
# The secret seed of the `--secret_seed` modes: 64 bits (the largest 64-bit prime), 20
# digits that no other number a run writes is likely to hold.
SECRET = 2**64 - 59
# The nonce written beside it (a fresh run draws one, `seeds.draw_nonce`, that config.json
# pins): one fixed nonce, so every workdir of a mode pins the same config.json.
SECRET_NONCE = "5ec2e7" * 5 + "00"

# The finished DataLens workdir that evaluate's modes start from.
_DATALENS_DONE = Binary("experiments.datalens", (*_DATALENS_TINY, "--noevaluate"), ("",))

BINARIES: dict[str, dict[str, Binary]] = {
    "fedgan_debug": {
        "group": Binary("experiments.fedgan_debug", _FEDGAN_TINY, ("gan_low", "gan_high")),
        "population": Binary("experiments.fedgan_debug", (*_FEDGAN_TINY, *_POPULATION),
                             ("gan_low", "gan_high")),
        # An audit run: 20 canary users per GAN (Poisson cohorts), audit.json at the end of
        # each GAN (beside its ledger) and of the demo.
        "audit": Binary("experiments.fedgan_debug",
                        (*_FEDGAN_TINY, "--sampling=poisson", "--audit_canaries=20"),
                        ("gan_low", "gan_high")),
    },
    "fedlm_debug": {
        "group": Binary("experiments.fedlm_debug", _FEDLM_TINY, ("lm_high_oov", "lm_low_oov")),
        "population": Binary("experiments.fedlm_debug", (*_FEDLM_TINY, *_POPULATION),
                             ("lm_high_oov", "lm_low_oov")),
        # The groups' seeds and the noised group sizes derived from a 64-bit secret.
        "population_secret": Binary(
            "experiments.fedlm_debug", (*_FEDLM_TINY, *_POPULATION, "--secret_seed"),
            ("lm_high_oov", "lm_low_oov"), secret=SECRET),
        # An audit run: Poisson cohorts, 20 canary users in each LM, each LM's audit.json
        # written once it has trained, the workdir's once both have.
        "audit": Binary("experiments.fedlm_debug",
                        (*_FEDLM_TINY, "--sampling=poisson", "--audit_canaries=20"),
                        ("lm_high_oov", "lm_low_oov")),
    },
    "dpd_fvae": {
        "central": Binary("experiments.dpd_fvae", (
            *_DPD_FVAE_TINY, "--dp=central", "--sync=d", "--noise_multiplier=2"), ("",)),
        "local": Binary("experiments.dpd_fvae", (
            *_DPD_FVAE_TINY, "--dp=local", "--sync=d", "--noise_multiplier=2",
            "--target_epsilon=30"), ("",)),
        # An audit run: 20 canary users take part, audit.json is written at the end.
        "audit": Binary("experiments.dpd_fvae", (
            *_DPD_FVAE_TINY, "--dp=central", "--sync=d", "--noise_multiplier=2",
            "--audit_canaries=20"), ("",)),
    },
    "dpsgd_classifier": {
        "default": Binary("experiments.dpsgd_classifier", _DPSGD_TINY, ("",)),
        "secret": Binary("experiments.dpsgd_classifier", (*_DPSGD_TINY, "--secret_seed"),
                         ("",), secret=SECRET),
        # The noise calibrated to the target at --steps (on a resume: the checkpoint's kept,
        # `resume.calibrate_rest`): z 1.050, eps 0.99999 after the 2 steps.
        "target": Binary("experiments.dpsgd_classifier",
                         (*_no_noise(_DPSGD_TINY), "--target_epsilon=1"), ("",)),
        # No ledger: (a) checks that nothing it leaves states an eps.
        "nodp": Binary("experiments.dpsgd_classifier", (*_no_noise(_DPSGD_TINY), "--nodp"),
                       ("",)),
        # An audit run: 20 canary examples take part, audit.json is written at the end.
        "audit": Binary("experiments.dpsgd_classifier", (*_DPSGD_TINY, "--audit_canaries=20"),
                        ("",)),
    },
    "fedavg_classifier": {
        "poisson": Binary("experiments.fedavg_classifier", _FEDAVG_TINY, ("",)),
        "adaptive": Binary("experiments.fedavg_classifier",
                           (*_FEDAVG_TINY, "--adaptive_clipping", "--clipped_count_stddev=2"),
                           ("",)),
        # Cohorts of exactly --clients_per_round (replace-one accounting).
        "fixed": Binary("experiments.fedavg_classifier", (*_FEDAVG_TINY, "--sampling=fixed"),
                        ("",)),
        "nodp": Binary("experiments.fedavg_classifier", (*_no_noise(_FEDAVG_TINY), "--nodp"),
                       ("",)),
        # The noise calibrated to the target at --rounds: z 0.857, eps 4.999 after the 2 rounds.
        "target": Binary("experiments.fedavg_classifier",
                         (*_no_noise(_FEDAVG_TINY), "--target_epsilon=5"), ("",)),
        # The cohorts' and the noise's seeds derived from a 64-bit secret.
        "secret": Binary("experiments.fedavg_classifier", (*_FEDAVG_TINY, "--secret_seed"),
                         ("",), secret=SECRET),
        # An audit run: 20 canary clients take part, audit.json is written at the end.
        "audit": Binary("experiments.fedavg_classifier", (*_FEDAVG_TINY, "--audit_canaries=20"),
                        ("",)),
    },
    "datalens": {
        "default": Binary("experiments.datalens", (*_DATALENS_TINY, "--noevaluate"), ("",)),
        # The binary's own evaluation of its generator (the extractor from the host's cache,
        # outside the workdir) once trained.
        "evaluated": Binary("experiments.datalens", (*_DATALENS_TINY, "--evaluate"), ("",)),
        # Stopped by the budget guard after 2 of 4 steps (eps 0.93 after 2, over 1 after 3).
        "budget": Binary("experiments.datalens", (
            *_DATALENS_TINY, "--noevaluate", "--steps=4", "--target_epsilon=1"), ("",)),
        # An audit run: 20 canary teachers' votes in every step's vote sum, their sums of
        # scores checkpointed, audit.json written at the end.
        "audit": Binary("experiments.datalens", (
            *_DATALENS_TINY, "--noevaluate", "--audit_canaries=20"), ("",)),
    },
    "evaluate": {
        "datalens": Binary("experiments.evaluate", _EVALUATE_SMALL, ("",), prepared=_DATALENS_DONE),
        # A classifier's workdir: its own test accuracy, the curves of its metrics (no
        # flags: evaluate refuses the image flags for it, `evaluation.unused_flags`).
        "dpsgd_classifier": Binary("experiments.evaluate", (), ("",),
                                   prepared=Binary("experiments.dpsgd_classifier",
                                                   _DPSGD_TINY, ("",))),
        # --synthetic=FILE: DataLens's released synthetic.npz as a file (not its generator
        # sampled again), beside that run's ledger.
        "synthetic": Binary("experiments.evaluate", (
            *_EVALUATE_SMALL, "--synthetic={workdir}/synthetic.npz"), ("",),
            prepared=_DATALENS_DONE),
        # --inception_weights=FILE: fid_inception too, from the tests' random weights (the
        # real ones cannot be fetched offline); no write of its own, 20 synthetic images
        # (Inception at 299x299 of them and the 359 real test images is the run's cost).
        "inception": Binary("experiments.evaluate", (
            *(f for f in _EVALUATE_SMALL if not f.startswith("--num_samples=")),
            "--num_samples=20", "--inception_weights={inception_weights}"),
            ("",), prepared=_DATALENS_DONE),
        # The ceiling row: the real train split, in a new workdir (no ledger).
        "real_data": Binary("experiments.evaluate",
                            (*_EVALUATE_SMALL, "--real_data", "--dataset=digits"), ("",)),
    },
}


# ---------------------------------------------------------------------------------------
# The child: a binary run that traces its write points and kills itself at one.


class _Tracer:
    """Numbers the write points under `root`, appends each to `trace` (one JSON line),
    and SIGKILLs this process before point `kill_at` (0: never)."""

    def __init__(self, trace: pathlib.Path, kill_at: int, root: pathlib.Path):
        self._trace, self._kill_at, self._root = trace, kill_at, root.absolute()
        self.count = 0

    def _log(self, record: dict) -> None:
        with self._trace.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def point(self, kind: str, path: str | os.PathLike) -> None:
        """A write of `kind` to `path`: numbered and logged when under the workdir."""
        absolute = pathlib.Path(path).absolute()
        if not absolute.is_relative_to(self._root):
            return  # A host cache outside the workdir: no release.
        self.count += 1
        where = str(absolute.relative_to(self._root))
        killed = self.count == self._kill_at
        self._log({"n": self.count, "kind": kind, "path": where, "killed": killed})
        if killed:
            self.at_kill_point(kind, absolute)

    def at_kill_point(self, kind: str, path: pathlib.Path) -> None:
        """What happens at point `kill_at` (a write of `kind` to `path`, not yet made):
        here, a kill before it; a subclass's tracer may kill elsewhere."""
        kill_self()

    def event(self, kind: str) -> None:
        """Something that is no write (a draw of a release), logged unnumbered."""
        self._log({"n": None, "kind": kind})


def kill_self() -> None:
    """SIGKILLs this process, its output flushed: no `finally` or `atexit` runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(tracer: _Tracer) -> None:
    """Wraps the library's writes (and the group sizes' draw) to go through `tracer`."""
    import orbax.checkpoint._src.path.atomicity as atomicity

    from dpfed.generative import group_sizes
    from dpfed.train import checkpoint, workdir

    write = workdir.atomic_write_local_bytes

    def traced_write(path: pathlib.Path, payload: bytes, mode: int | None = None) -> None:
        tracer.point("file", path)
        write(path, payload, mode)

    append = workdir.Workdir._append  # noqa: SLF001 -- the write it wraps.

    def traced_append(self: workdir.Workdir, name: str, record: dict) -> None:
        tracer.point("append", self.file(name))
        append(self, name, record)

    save = checkpoint.Checkpointer.save

    def traced_save(self: checkpoint.Checkpointer, step: int, state: Any, extra: dict) -> None:
        tracer.point("checkpoint", self.directory / str(step))
        save(self, step, state, extra)

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def traced_finalize(self: Any) -> None:
        final = pathlib.Path(self.get_final())
        if final.name.isdigit():  # the step's rename (not its items'): all written but it
            tracer.point("checkpoint-rename", final)
        await finalize(self)

    draw = group_sizes.noisy_group_sizes

    def traced_draw(*args: Any, **kwargs: Any) -> dict[str, int]:
        tracer.event("draw group sizes")
        return draw(*args, **kwargs)

    workdir.atomic_write_local_bytes = traced_write
    workdir.Workdir._append = traced_append  # noqa: SLF001
    checkpoint.Checkpointer.save = traced_save  # type: ignore[method-assign]
    atomicity.AtomicRenameTemporaryPath.finalize = traced_finalize  # type: ignore[method-assign]
    group_sizes.noisy_group_sizes = traced_draw


def _child(argv: list[str]) -> None:
    """`child TRACE KILL_AT MODULE ARGS...`: runs MODULE as `python -m` would, its write
    points traced to TRACE and a kill before point KILL_AT (0: none)."""
    trace, kill_at, module, *args = argv
    workdir = pathlib.Path(flag_value(args, "workdir"))
    _install(_Tracer(pathlib.Path(trace), int(kill_at), workdir))
    run_as_main(module, args)


def flag_value(args: list[str], name: str) -> str:
    """The value of the flag `--name=...` among a child's `args`."""
    return next(a.partition("=")[2] for a in args if a.startswith(f"--{name}="))


def run_as_main(module: str, args: list[str]) -> None:
    """Runs `module` with `args` in this process, as `python -m module args` would."""
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------------------------------
# The parent: runs, kills, reruns and checks.


@dataclasses.dataclass(frozen=True)
class Run:
    """One child run: its exit code, trace records and stderr's tail."""

    returncode: int
    trace: list[dict]
    stderr: str
    seconds: float

    @property
    def points(self) -> list[dict]:
        """The write points it reached (the killed one last, when killed)."""
        return [r for r in self.trace if r["n"] is not None]

    @property
    def draws(self) -> int:
        """How many times it drew the noised group sizes."""
        return sum(r["kind"] == "draw group sizes" for r in self.trace)


# The finished workdirs that binaries start from (`Binary.prepared`), made once.
_PREPARED: dict[Binary, pathlib.Path] = {}


def _start_from(binary: Binary, workdir: pathlib.Path) -> None:
    """A new `workdir` of `binary`: a copy of its prepared binary's finished workdir, if
    it has one (made on first use), holding its `secret` seed, if it has one; an
    existing one is left as it is (a rerun's)."""
    if workdir.exists():
        return
    if binary.secret is not None:
        from dpfed.train import seeds  # Imports jax: after `_use_the_tests_settings`.

        workdir.mkdir(parents=True)
        workdir.joinpath(seeds.SECRET_SEED_FILE).write_text(
            json.dumps({"seed": binary.secret, "nonce": SECRET_NONCE,
                        "note": seeds.SECRET_SEED_NOTE}))
    if binary.prepared is None:
        return
    if binary.prepared not in _PREPARED:
        scratch = tempfile.mkdtemp(prefix="crash_points-prepared-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # the process's copies
        prepared = pathlib.Path(scratch) / "whole"
        expect_finished(run(binary.prepared, prepared), f"the prepared {binary.prepared.module}")
        _PREPARED[binary.prepared] = prepared
    shutil.copytree(_PREPARED[binary.prepared], workdir)


def run(binary: Binary, workdir: pathlib.Path, kill_at: int = 0, timeout: int = 1200,
        child: tuple[str, ...] = ()) -> Run:
    """Runs `binary` on `workdir` in a child (forked when it can: `tests.binary`), killed
    before its write point `kill_at` (0: run to the end). `child`: the child's module and
    its first arguments, where another module's child (`tests.crash_writes`) runs it;
    default this one's (`python -m tests.crash_points child ...`); started by the
    binary's `launcher`, if it has one. `timeout` only stops a hung run: evaluate's
    Inception crash point, the slowest, took 741 s for its three runs and the DataLens run
    they start from on 2 cores (stop 69), and one run passed 600 s at load 7-10."""
    from tests.binary import run_binary  # Imports jax: after `_use_the_tests_settings`.

    _start_from(binary, workdir)
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as trace:
        start = time.time()
        proc = run_binary(*binary.launcher, *(child or ("tests.crash_points", CHILD)),
                          trace.name, str(kill_at),
                          binary.module,
                          *binary.args(workdir), check=False, timeout=timeout)
        records = [json.loads(line) for line in trace.read().splitlines()]
    return Run(proc.returncode, records, proc.stderr[-4000:], time.time() - start)


# How a crashed run's end is checked: the run and the write point it was killed at.
Expect = Callable[[Run, int], None]


def expect_killed(result: Run, kill_at: int) -> None:
    """`result` is a run that killed itself at its point `kill_at`."""
    assert result.returncode in (KILLED, KILLED_IN_JOB) and result.points[-1]["n"] == kill_at, (
        f"the run was to be killed before write {kill_at}, but it exited {result.returncode} "
        f"after {len(result.points)} writes:\n{result.stderr}")


def expect_finished(result: Run, what: str) -> None:
    """`result` ran to its end (exit 0): a rerun is never refused."""
    assert result.returncode == 0, f"{what} exited {result.returncode}:\n{result.stderr}"


def _read_json(path: pathlib.Path) -> Any:
    from dpfed.train import workdir  # Imports jax: after `_use_the_tests_settings`.

    return workdir.loads(path.read_text(encoding="utf-8"))


def _records(path: pathlib.Path) -> list[dict]:
    """The records of a JSON-lines file of the workdir (none if it is missing)."""
    from dpfed.train import workdir

    if not path.exists():
        return []  # (Workdir would create a missing folder.)
    return workdir.Workdir(path.parent)._read(path.name)  # noqa: SLF001 -- its reader.


def _ledger(model: pathlib.Path) -> dict | None:
    path = model / "ledger.json"
    return _read_json(path) if path.exists() else None


# Files that a model (or the whole run) writes once it has trained all its rounds.
_FINAL_SUFFIXES = (".msgpack", ".png", ".md", ".npz")
_FINAL_NAMES = ("summary.json", "samples.json", "diagnostics.json", "eval.json", "audit.json")


def _finals(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*") if p.is_file() and (
        p.suffix in _FINAL_SUFFIXES or p.name in _FINAL_NAMES))


def check_crashed(binary: Binary, workdir: pathlib.Path, whole: pathlib.Path) -> None:
    """(a): what a killed run left in `workdir` is counted by a ledger present.

    Each model's ledger.json counts every metrics record it logged (its eps at least
    each record's); once a model's file, samples or summary exist, its ledger is the
    uninterrupted run's (`whole`) whole ledger; once the workdir's summary, report,
    samples or ground truth exist, every model's is; the noised group sizes exist only
    beside their ledger. A model without ledger.json states no eps: neither a metrics
    record nor its summary.json or eval.json; and one whose uninterrupted run keeps no
    ledger (`--nodp`, the real data's evaluation) writes none: a non-private run's (a)
    is that nothing it leaves claims a guarantee.
    """
    for name in binary.models:
        model = workdir / name
        ledger = _ledger(model)
        if _ledger(whole / name) is None:
            assert ledger is None, (
                f"{name or '.'}/ledger.json written, but the uninterrupted run keeps none")
        if ledger is None:
            _assert_states_no_eps(name, model)
        for record in _records(model / "metrics.jsonl"):
            eps = _epsilon(record)
            assert eps is None or (ledger is not None and ledger["epsilon_rdp"] >= eps), (
                f"{name or '.'}/metrics.jsonl logs a release at eps {eps} that no "
                f"ledger.json counts (its eps: {ledger and ledger['epsilon_rdp']})")
        finals = _finals(model) if name else []
        if finals:
            _assert_whole_ledger(name, ledger, whole, finals)
    for released in _finals(workdir):
        for name in _models_of(binary, released):
            _assert_whole_ledger(name, _ledger(workdir / name), whole, [released])
    if (workdir / "group_sizes.json").exists():
        sizes = workdir / "group_sizes_ledger.json"
        assert sizes.exists(), "group_sizes.json released without group_sizes_ledger.json"
        assert len(_read_json(sizes)["events"]) == 1, "the sizes are one release"


# The keys in which a model's summary.json and eval.json state its privacy.
_PRIVACY_KEYS = {"summary.json": ("epsilon_rdp", "epsilon_pld"), "eval.json": ("privacy",)}


def _assert_states_no_eps(name: str, model: pathlib.Path) -> None:
    """The files of `model`, which has no ledger.json, state no privacy guarantee."""
    for file, keys in _PRIVACY_KEYS.items():
        path = model / file
        record = _read_json(path) if path.exists() else {}
        stated = {k: record[k] for k in keys if record.get(k) is not None}
        assert not stated, f"{name or '.'}/{file} states {stated} without a ledger.json"


def _models_of(binary: Binary, released: str) -> tuple[str, ...]:
    """The models whose ledgers must be whole for the workdir's file `released`: the
    group's for its samples (fedgan_debug's `samples_low.png`, written as soon as the
    low group's GAN is), every model's for the rest (summary, report, ground truth)."""
    group = re.fullmatch(r"samples_(\w+)\.png", released)
    if group:
        return tuple(m for m in binary.models if m.endswith(f"_{group[1]}")) or binary.models
    return binary.models


def _epsilon(record: dict) -> float | None:
    """The RDP eps a metrics record states: its `epsilon_rdp`, or where that is None (local
    DP: no central guarantee) its `epsilon_rdp_worst_client`; None if it states none."""
    for key in ("epsilon_rdp", "epsilon_rdp_worst_client"):
        if isinstance(record.get(key), int | float):
            return float(record[key])
    return None


def _assert_whole_ledger(
    name: str, ledger: dict | None, whole: pathlib.Path, released: list[str]
) -> None:
    """`ledger` (model `name`'s) holds the events of the uninterrupted run's ledger."""
    expected = _ledger(whole / name)
    assert expected is None or (ledger is not None and ledger["events"] == expected["events"]), (
        f"{released} released beside {name or '.'}/ledger.json with "
        f"{ledger and len(ledger['events'])} events, not the whole run's")


def _without_wall_times(value: Any, workdir: pathlib.Path | None = None) -> Any:
    """`value` without its wall-time keys, and with `workdir`'s path, where a string
    starts with it (eval.json's source), as "{workdir}": the runs compared have two."""
    if isinstance(value, dict):
        return {k: _without_wall_times(v, workdir) for k, v in value.items()
                if k not in _WALL_TIME_KEYS}
    if isinstance(value, list):
        return [_without_wall_times(v, workdir) for v in value]
    if isinstance(value, str) and workdir is not None and (
            value == str(workdir) or value.startswith(f"{workdir}{os.sep}")):
        return "{workdir}" + value[len(str(workdir)):]
    return value


def _compared_files(workdir: pathlib.Path) -> set[str]:
    return {str(p.relative_to(workdir)) for p in workdir.rglob("*")
            if p.is_file() and "checkpoints" not in p.relative_to(workdir).parts
            and p.name not in _NOT_COMPARED}


def _report_lines(path: pathlib.Path) -> list[str]:
    """report.md's lines but those with wall times."""
    return [line for line in path.read_text().splitlines()
            if "wall" not in line.lower() and "seconds" not in line.lower()]


def assert_same_workdir(whole: pathlib.Path, resumed: pathlib.Path) -> None:
    """(c): `resumed` holds the files of the uninterrupted run's `whole` (checkpoints
    aside) and the same contents: JSON and JSON lines as parsed, wall times aside and
    each one's own path as "{workdir}"; report.md without its wall-time lines; the rest
    byte for byte."""
    names = _compared_files(whole)
    extra, missing = _compared_files(resumed) - names, names - _compared_files(resumed)
    assert not extra and not missing, f"files: {sorted(extra)} extra, {sorted(missing)} missing"
    for name in sorted(names):
        a, b = whole / name, resumed / name
        if name.endswith(".jsonl"):
            same = (_without_wall_times(_records(a), whole)
                    == _without_wall_times(_records(b), resumed))
        elif name.endswith(".json"):
            same = (_without_wall_times(_read_json(a), whole)
                    == _without_wall_times(_read_json(b), resumed))
        elif name.endswith(".md"):
            same = _report_lines(a) == _report_lines(b)
        else:
            same = a.read_bytes() == b.read_bytes()
        assert same, f"{name} differs from the uninterrupted run's"


def assert_secret_kept(binary: Binary, workdir: pathlib.Path) -> None:
    """(d): with a `secret` seed, no file of `workdir` but secret_seed.json holds its
    digits (checkpoints included: anyone holding the seed can subtract the noise), or
    the temp file of its own atomic write that a kill inside it leaves (mode 0600 as the
    file's: `tests.crash_writes`), which the next run removes."""
    if binary.secret is None:
        return
    digits = str(binary.secret).encode()
    leaking = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")
                     if p.is_file() and p.name != "secret_seed.json" and digits in p.read_bytes()
                     and not _secret_seed_temp(p))
    assert not leaking, f"the secret seed is written in {leaking}"


def _secret_seed_temp(path: pathlib.Path) -> bool:
    """`path` is a temp file of secret_seed.json's atomic write, readable by its owner
    alone."""
    return (path.name.startswith(".secret_seed.json.") and path.name.endswith(".tmp")
            and path.stat().st_mode & 0o777 == 0o600)


def held(binary: Binary) -> str:
    """The checks a run of `binary` passes: (a)-(c), and (d) in a secret mode."""
    return "(a)-(d)" if binary.secret is not None else "(a)-(c)"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One crash point: where the run was killed (the rerun, in a double crash), how long
    the kills and reruns took, and how many writes the last rerun made."""

    point: dict
    seconds: float
    rerun_points: int


def crash_and_rerun(
    binary: Binary, whole: pathlib.Path, workdir: pathlib.Path, kill_at: int,
    rerun_kill_at: int = 0, child: tuple[str, ...] = (), expect: Expect | None = None,
) -> Outcome:
    """Kills `binary` before write `kill_at` on a new `workdir` and checks (a); with
    `rerun_kill_at`, kills the rerun before its own write of that number and checks (a)
    again; reruns to the end and checks (b) and (c) against the uninterrupted `whole`.
    Each run in `child` (`run`'s), its end at its point checked by `expect` (default
    `expect_killed`; `tests.crash_sigterm`'s run goes on after a SIGTERM there)."""
    expect = expect or expect_killed
    start = time.time()
    crashed = run(binary, workdir, kill_at, child=child)
    expect(crashed, kill_at)
    check_crashed(binary, workdir, whole)
    assert_secret_kept(binary, workdir)
    point = crashed.points[kill_at - 1]
    if rerun_kill_at:
        sizes = (workdir / "group_sizes.json").exists()
        again = run(binary, workdir, rerun_kill_at, child=child)
        expect(again, rerun_kill_at)
        point = again.points[rerun_kill_at - 1]
        assert not (sizes and again.draws), "a rerun drew the released group sizes again"
        check_crashed(binary, workdir, whole)
    sizes = (workdir / "group_sizes.json").exists()
    rerun = run(binary, workdir, child=child)
    expect_finished(rerun, "the rerun")
    assert not (sizes and rerun.draws), "the rerun drew the released group sizes again"
    assert_same_workdir(whole, workdir)
    assert_secret_kept(binary, workdir)
    return Outcome(point, time.time() - start, len(rerun.points))


def uninterrupted(binary: Binary, workdir: pathlib.Path, child: tuple[str, ...] = ()) -> Run:
    """The run to its end that the crashed ones are compared with; its trace lists the
    write points."""
    result = run(binary, workdir, child=child)
    expect_finished(result, "the uninterrupted run")
    assert_secret_kept(binary, workdir)
    return result


def sweep(
    binary: Binary, scratch: pathlib.Path, points: list[int] | None = None, double: int = 0,
    report: Callable[[str], None] = print, child: tuple[str, ...] = (),
    expect: Expect | None = None,
) -> list[Outcome]:
    """Kills `binary` at each of `points` (default: every write point of an
    uninterrupted run), or with `double`, at write `double` and then its rerun at each
    of its writes (`points` of the rerun); checks (a)-(c) at each, in `scratch`; raises
    at the first failure. Each run in `child` (`run`'s), which kills its own way (this
    module's: before the write), its end checked by `expect` (`crash_and_rerun`'s)."""
    expect = expect or expect_killed
    whole = scratch / "whole"
    reference = uninterrupted(binary, whole, child)
    report(f"uninterrupted: {len(reference.points)} write points, {reference.seconds:.1f} s")
    for point in reference.points:
        report(f"  {point['n']:3d} {point['kind']:18s} {point['path']}")
    todo = points or list(range(1, len(reference.points) + 1))
    if double:
        probe = scratch / "probe"
        expect(run(binary, probe, double, child=child), double)
        rerun = uninterrupted(binary, probe, child)
        report(f"killed at write {double} (the child's way), "
               f"the rerun makes {len(rerun.points)} writes:")
        for point in rerun.points:
            report(f"  {point['n']:3d} {point['kind']:18s} {point['path']}")
        todo = points or list(range(1, len(rerun.points) + 1))
        shutil.rmtree(probe)
    outcomes = []
    for k in todo:
        workdir = scratch / f"k{k}"
        outcome = (crash_and_rerun(binary, whole, workdir, double, k, child, expect) if double
                   else crash_and_rerun(binary, whole, workdir, k, child=child, expect=expect))
        outcomes.append(outcome)
        what = f"killed at {double}, its rerun at {k}" if double else f"point {k}"
        report(f"{what} ({outcome.point['kind']} {outcome.point['path']}): {held(binary)} held, "
               f"{outcome.seconds:.1f} s")
        shutil.rmtree(workdir)
    return outcomes


def point_number(reference: Run, path: str, occurrence: int = 1, kind: str | None = None) -> int:
    """The number of the `occurrence`-th write point of `reference` to `path` (of `kind`
    when given): the tests name their points so, not by number, which moves whenever a
    binary writes one more file."""
    found = [p["n"] for p in reference.points
             if p["path"] == path and kind in (None, p["kind"])]
    assert len(found) >= occurrence, f"the run writes {path} {len(found)} times: {found}"
    return found[occurrence - 1]


def _kill_after(binary: Binary, workdir: pathlib.Path, seconds: float) -> bool:
    """Runs `binary` on `workdir` as `tests.binary` starts it and SIGKILLs its process
    group `seconds` after its start, unless it ended first (then with exit 0). Returns
    whether it was still running."""
    from tests import binary as binary_lib

    _start_from(binary, workdir)
    cmd = [sys.executable, "-m", *binary.launcher, binary.module, *binary.args(workdir)]
    with tempfile.NamedTemporaryFile("w+") as err:
        proc = binary_lib._start(cmd, None, stdout=None, stderr=err)  # noqa: SLF001
        deadline = time.time() + seconds
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.001)
        running = proc.poll() is None
        binary_lib._end_group(proc, dump_stacks=False)  # noqa: SLF001 -- the SIGKILL.
        err.seek(0)
        assert running or proc.returncode == 0, f"exit {proc.returncode}: {err.read()[-3000:]}"
    return running


def sigkill(
    binary: Binary, scratch: pathlib.Path, count: int, seed: int = 0,
    report: Callable[[str], None] = print,
) -> int:
    """SIGKILLs `count` runs of `binary` (no tracing: the binary as a user starts it) at
    uniform random times within an uninterrupted run's wall time, reruns each and checks
    (a)-(c). Returns how many were killed while running (the others had ended first).
    """
    import random

    whole = scratch / "whole"
    _start_from(binary, whole)  # (a prepared binary's run: not in the time drawn from)
    start = time.time()
    assert not _kill_after(binary, whole, math.inf), "a run not killed ended"
    seconds = time.time() - start  # untraced: how long a user's run takes
    report(f"uninterrupted: {seconds:.1f} s")
    times = random.Random(seed)
    killed = 0
    for i in range(count):
        workdir = scratch / f"kill{i}"
        at = times.uniform(0.0, seconds)
        start = time.time()
        running = _kill_after(binary, workdir, at)
        killed += running
        left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file())
        check_crashed(binary, workdir, whole)
        rerun = run(binary, workdir)
        expect_finished(rerun, "the rerun")
        assert_same_workdir(whole, workdir)
        assert_secret_kept(binary, workdir)
        report(f"kill {i} at {at:.1f} s ({'running' if running else 'already ended'}, "
               f"{len(left)} files left): {held(binary)} held, {time.time() - start:.1f} s")
        shutil.rmtree(workdir)
    return killed


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", choices=sorted(BINARIES))
    parser.add_argument("--mode", help="default: the binary's first (" + ", ".join(
        f"{b}: {'/'.join(m)}" for b, m in BINARIES.items()) + ")")
    parser.add_argument("--points", type=point_list,
                        help="comma-separated write points (default: all)")
    parser.add_argument("--double", type=int, default=0,
                        help="kill before this write, then the rerun before each of its own")
    parser.add_argument("--sigkill", type=int, default=0,
                        help="instead: SIGKILL this many runs at random times (no tracing)")
    parser.add_argument("--seed", type=int, default=0, help="of --sigkill's random times")
    parser.add_argument("--scratch", help="a folder for the workdirs (default: a new temp one)")
    args = parser.parse_args(argv)
    mode, binary = binary_of(parser, args.binary, args.mode)
    scratch = scratch_dir(args.scratch, "crash_points")
    start = time.time()
    if args.sigkill:
        killed = sigkill(binary, scratch, args.sigkill, args.seed)
        print(f"{args.binary} {mode}: {held(binary)} held after {args.sigkill} SIGKILLs ({killed} "
              f"while running), {time.time() - start:.0f} s")
        return
    outcomes = sweep(binary, scratch, args.points, args.double)
    print(f"{args.binary} {mode}: {held(binary)} held at {len(outcomes)} points, "
          f"{time.time() - start:.0f} s")


def point_list(text: str) -> list[int]:
    """A script's `--points`: comma-separated write point numbers."""
    return [int(p) for p in text.split(",")]


def scratch_dir(scratch: str | os.PathLike | None, script: str) -> pathlib.Path:
    """A script's `--scratch` folder for the workdirs, or a new temp one named for it."""
    return pathlib.Path(scratch or tempfile.mkdtemp(prefix=f"{script}-"))


def binary_of(
    parser: argparse.ArgumentParser, name: str, mode: str | None
) -> tuple[str, Binary]:
    """A script's `--mode` of the binary `name` (default: its first) and its `Binary`;
    a usage error for a mode it does not have."""
    modes = BINARIES[name]
    mode = mode or next(iter(modes))
    if mode not in modes:
        parser.error(f"--mode of {name} must be one of {', '.join(modes)}")
    return mode, modes[mode]


def _use_the_tests_settings() -> None:
    """As a script: the XLA flags and compilation cache of the tests (tests/conftest.py),
    set before jax is imported, so the forked children run as the tests' do."""
    import tests.conftest  # noqa: F401 -- sets the environment as it is imported.


def script(child: Callable[[list[str]], None], main: Callable[[list[str]], None]) -> None:
    """A crash module run as a script: `child` for a child's arguments (`child ...`),
    else `main`, under the tests' settings."""
    if sys.argv[1:2] == [CHILD]:
        child(sys.argv[2:])
    else:
        _use_the_tests_settings()
        main(sys.argv[1:])


if __name__ == "__main__":
    script(_child, _main)
