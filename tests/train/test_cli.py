"""Tests for dpfed.train.cli: bad flags end with exit code 2 and one stderr line."""

import os
import pathlib

import pytest
from absl import flags

from dpfed.train import cli
from tests.binary import run_binary, workdir_locked_by_another_process

_REPO = pathlib.Path(__file__).resolve().parents[2]
_EXAMPLE = "tests.train.cli_example"


def _run(*args, env=None):
    """`python -m tests.train.cli_example args`: forked from a process that has imported
    the libraries unless `env` is given (`tests.binary.run_binary`)."""
    return run_binary(_EXAMPLE, *args, check=False, timeout=60, env=env)


def test_help_shows_the_docstring_as_written():
    # absl %-formats the docstring with the program's name: "89.4% at" became
    # "89.4'/path/binary.py't" (%a) before cli.run escaped it.
    result = _run("--helpshort")
    assert "A test binary: 89.4% at eps 9." in result.stdout, (
        f"--helpshort must print the docstring unchanged: {result.stdout[:300]}")


def test_help_lists_the_flags_cli_defines_for_the_binary():
    # absl's --help lists the main module's key flags; --seed, defined by
    # `cli.define_seed_flag`, was cli's key flag and left out of every binary's --help.
    result = _run("--helpshort")
    assert "--seed: Random seed." in result.stdout, (
        f"--helpshort must list --seed with the binary's own flags: {result.stdout}")


def _stderr_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--model=resnet"], "--model"),
        (["--clip_norm=-1"], "--clip_norm"),
        (["--delta=1.5"], "--delta"),
        (["--no_such_flag=1"], "--no_such_flag"),
        (["--flagfile=launch/no_such_file.flags"], "--flagfile"),
        (["--clip_norm=inf"], "--clip_norm"),
        (["--clip_norm=nan"], "--clip_norm"),
        (["--seed=-1"], "--seed"),  # numpy's generators refuse it, deep in a run
        (["--seed=4294967296"], "--seed"),  # a JAX key takes 32 bits: this would be seed 0
    ],
    ids=["enum", "lower_bound", "flag_error", "unknown", "missing_flagfile", "inf", "nan",
         "negative_seed", "seed_over_32_bits"],
)
def test_bad_flag_exits_2_with_one_line(args, flag):
    result = _run(*args)
    lines = _stderr_lines(result)
    assert result.returncode == 2, f"{args}: exit code {result.returncode}, stderr {lines}"
    assert len(lines) == 1, f"{args}: expected one stderr line, got {lines}"
    assert lines[0].startswith(f"error: {flag}"), f"{args}: line does not name {flag}: {lines}"


def test_every_binary_bounds_its_seed_with_the_shared_flag():
    # An unbounded --seed overflowed jax.random.key (a traceback) or was refused by numpy
    # under another flag's name.
    for path in sorted((_REPO / "experiments").glob("*.py")):
        text = path.read_text()
        assert 'DEFINE_integer("seed"' not in text, (
            f"{path.name} defines --seed itself: use cli.define_seed_flag (bounded)")


def test_every_binary_with_dp_releases_reads_its_seed_through_seed_fields():
    # --secret_seed draws the seed in `cli.seed_fields`: a binary reading --seed's value
    # itself would train on 32 guessable bits and write them into summary.json.
    seeded = [path for path in sorted((_REPO / "experiments").glob("*.py"))
              if "define_seed_flag" in path.read_text() or "define_debug_flags" in path.read_text()]
    releasing = [path for path in seeded if path.name != "evaluate.py"]  # evaluates only
    assert len(releasing) == 6, f"the DP binaries are not where they were: {releasing}"
    for path in releasing:
        text = path.read_text()
        assert "cli.seed_fields(_WORKDIR.value)" in text and "_SEED.value" not in text, (
            f"{path.name} must read its seed through cli.seed_fields (--secret_seed)")
    assert "define_secret_seed_flag()" in (_REPO / "dpfed/generative/debug_flags.py").read_text()


def test_flag_error_line_format():
    lines = _stderr_lines(_run("--delta=2"))
    assert lines == ["error: --delta: must be < 1"], f"unexpected FlagError line {lines}"


def test_an_infinite_float_flag_is_refused_before_the_workdir_is_made(tmp_path):
    # absl parses "inf" and its lower_bound=0.0 lets it through: a learning rate of inf
    # trained on NaN, and a clip norm of inf would clip nothing.
    workdir = tmp_path / "w"
    lines = _stderr_lines(_run("--clip_norm=inf", f"--workdir={workdir}"))
    assert lines == ["error: --clip_norm: must be a finite number, not inf"], lines
    assert not workdir.exists(), "a refused run must not create its workdir"


def test_a_multi_float_flag_of_inf_or_nan_is_refused(monkeypatch):
    # No binary defines one yet (latent): a list of floats is checked item by item.
    flag_values = flags.FlagValues()
    flags.DEFINE_multi_float("rates", [1.0, float("nan")], "Rates.", flag_values=flag_values)
    flag_values.mark_as_parsed()
    monkeypatch.setattr(cli.flags, "FLAGS", flag_values)
    with pytest.raises(cli.FlagError) as error:
        cli._check_floats_are_finite()
    assert error.value.flag == "rates", f"a nan inside a multi float flag: {error.value}"


def test_good_run_exits_0():
    result = _run("--model=mlp")
    assert result.returncode == 0, f"good flags failed: {result.stderr}"
    assert result.stdout.strip() == "trained mlp", f"main did not run: {result.stdout!r}"


def test_backend_probing_leaves_no_line_on_the_terminal():
    # On CPU-only machines every binary's first line was jax's INFO record "Unable to
    # initialize backend 'tpu': ... libtpu.so ...".
    # The tests pin JAX_PLATFORMS=cpu (tests/conftest.py); a user's shell does not.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = _run("--devices", env=env)
    assert result.returncode == 0 and result.stdout.strip() == "trained cnn", result.stderr
    assert "Unable to initialize backend" not in result.stderr, result.stderr


def test_other_exceptions_keep_their_traceback():
    result = _run("--crash")
    assert result.returncode == 1, f"a bug should exit 1, got {result.returncode}"
    assert "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr, (
        f"a bug's traceback was hidden: {result.stderr}"
    )


def test_check_raises_flag_error_with_fields():
    with pytest.raises(cli.FlagError) as excinfo:
        cli.check(False, "clip_norm", "must be positive")
    error = excinfo.value
    assert (error.flag, error.message) == ("clip_norm", "must be positive"), vars(error)


def test_check_passes_when_condition_holds():
    cli.check(True, "clip_norm", "must be positive")  # Must not raise.


def _parsed(tmp_path, *args):
    """Flags `alpha` (default 0.5) and `partition` parsed from `args`; a flagfile holds
    those of `args` after "--flagfile:", as a table row's would."""
    values = flags.FlagValues()
    flags.DEFINE_float("alpha", 0.5, "Label skew.", flag_values=values)
    flags.DEFINE_string("partition", "iid", "Split.", flag_values=values)
    if "--flagfile:" in args:
        at = args.index("--flagfile:")
        flagfile = tmp_path / "row.flags"
        flagfile.write_text("\n".join(args[at + 1:]) + "\n")
        args = (*args[:at], f"--flagfile={flagfile}")
    values(["binary", *args])
    return values


@pytest.mark.parametrize(
    "args", [("--alpha=0.3",), ("--alpha=0.5",), ("--flagfile:", "--alpha=0.3")],
    ids=["given", "given_at_its_default", "in_a_flagfile"])
def test_refuse_unused_refuses_a_given_flag_that_its_mode_ignores(tmp_path, args):
    values = _parsed(tmp_path, *args)
    with pytest.raises(cli.FlagError) as raised:
        cli.refuse_unused({"alpha": (True, "with --partition=iid")}, values)
    assert raised.value.flag == "alpha" and "--partition=iid" in raised.value.message, (
        f"must name --alpha and the mode that ignores it: {raised.value}")


@pytest.mark.parametrize(("args", "ignored"), [((), True), (("--alpha=0.3",), False)],
                         ids=["left_at_its_default", "applies"])
def test_refuse_unused_accepts_a_default_or_a_flag_that_applies(tmp_path, args, ignored):
    # A flag the user did not give cannot be a mistake; one the mode uses is not ignored.
    cli.refuse_unused({"alpha": (ignored, "with --partition=iid")}, _parsed(tmp_path, *args))


def test_a_second_run_on_a_workdir_in_use_exits_2_naming_it(tmp_path):
    workdir = tmp_path / "w"
    with workdir_locked_by_another_process(workdir):
        result = _run(f"--workdir={workdir}")
    lines = _stderr_lines(result)
    assert result.returncode == 2 and len(lines) == 1, f"exit {result.returncode}: {lines}"
    assert lines[0].startswith("error: --workdir:") and "in use" in lines[0], lines
    assert _run(f"--workdir={workdir}").returncode == 0, "the lock must die with it"


@pytest.mark.parametrize("kind", ["empty", "file"])
def test_a_workdir_that_cannot_be_a_directory_exits_2_naming_it(tmp_path, kind):
    (tmp_path / "a_file").write_text("not a directory")
    workdir = "" if kind == "empty" else tmp_path / "a_file"
    result = _run(f"--workdir={workdir}")
    lines = _stderr_lines(result)
    assert result.returncode == 2 and len(lines) == 1, f"exit {result.returncode}: {lines}"
    assert lines[0].startswith("error: --workdir:"), (
        f"an empty --workdir (the current directory) or a file must be refused: {lines}")


def test_a_multi_host_run_shares_its_workdir_without_the_lock(tmp_path):
    workdir = tmp_path / "w"
    with workdir_locked_by_another_process(workdir):  # another host of the job
        result = _run(f"--workdir={workdir}", "--distributed")
    assert result.returncode == 0, f"every host runs on the shared workdir: {result.stderr}"


def test_a_refused_run_removes_the_workdir_it_created(tmp_path):
    workdir = tmp_path / "new" / "run"
    written = "--write=config.json,sub/config.json,sub/checkpoints/config.json"
    result = _run(f"--workdir={workdir}", "--delta=2", written)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr}"
    assert not (tmp_path / "new").exists(), (
        "a refused run must not leave the folders it created (only a lock and configs in them)")


def test_a_refused_run_keeps_a_workdir_that_existed(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    assert _run(f"--workdir={workdir}", "--delta=2").returncode == 2
    assert workdir.is_dir(), "the user's own folder must stay"


def test_a_refused_run_keeps_a_created_workdir_holding_other_files(tmp_path):
    workdir = tmp_path / "run"
    result = _run(f"--workdir={workdir}", "--delta=2", "--write=sub/metrics.jsonl")
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr}"
    assert (workdir / "sub" / "metrics.jsonl").exists(), "a run's output must never be deleted"


def test_a_good_run_keeps_the_workdir_it_created(tmp_path):
    workdir = tmp_path / "run"
    assert _run(f"--workdir={workdir}").returncode == 0
    assert workdir.is_dir(), "a run that went ahead keeps its workdir"


def test_secret_seed_with_an_explicit_seed_exits_2_naming_the_flag(tmp_path):
    workdir = tmp_path / "run"
    result = _run(f"--workdir={workdir}", "--secret_seed", "--seed=3")
    lines = _stderr_lines(result)
    assert result.returncode == 2 and len(lines) == 1, f"exit {result.returncode}: {lines}"
    assert lines[0].startswith("error: --secret_seed: "), (
        f"the secret seed replaces --seed: giving both must be refused naming it: {lines}")
    assert not workdir.exists(), "the refused run drew no secret and left no workdir"


def test_secret_seed_is_drawn_once_and_a_rerun_without_the_flag_exits_2(tmp_path):
    workdir = tmp_path / "run"
    first = _run(f"--workdir={workdir}", "--secret_seed")
    assert first.returncode == 0 and "seeded secret" in first.stdout, first.stderr[-2000:]
    stored = (workdir / "secret_seed.json").read_text()
    assert _run(f"--workdir={workdir}", "--secret_seed").returncode == 0
    assert (workdir / "secret_seed.json").read_text() == stored, "a rerun must never draw again"
    lines = _stderr_lines(_run(f"--workdir={workdir}"))
    assert len(lines) == 1 and lines[0].startswith("error: --secret_seed: "), (
        f"a rerun without the flag would use --seed's noise: it must be refused: {lines}")

