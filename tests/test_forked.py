"""tests/forked.py: a forked binary run behaves as `python -m` in a subprocess."""

import os

import pytest

from tests import forked
from tests.binary import kill_when_written, run_binary

_EXAMPLE = "tests.forked_example"
_FORKING = pytest.mark.skipif(
    os.environ.get("DPFED_TEST_SUBPROCESS") == "1", reason="DPFED_TEST_SUBPROCESS=1: no forks")


def _both(*args):
    """The example run forked, and in a new interpreter."""
    return (run_binary(_EXAMPLE, *args, check=False),
            run_binary(_EXAMPLE, *args, check=False, fresh_process=True))


@_FORKING
def test_runs_in_this_environment_are_forked_and_see_it(monkeypatch):
    # A forked child's parent is the fork server, a subprocess's is this process: if the
    # runs stopped being forked (e.g. over a variable an import sets), the suite slows.
    monkeypatch.setenv("DPFED_FORKED_PROBE", "set after the server started")
    parent, probe = run_binary(_EXAMPLE, "parent").stdout.split(maxsplit=1)
    assert int(parent) != os.getpid(), "run_binary must fork runs that keep the env"
    assert probe.strip() == "set after the server started", (
        f"the child takes this process's environment as it is now: {probe!r}")


@pytest.mark.parametrize("what", ["exit3", "message", "shutdown"])
def test_a_forked_run_ends_with_the_output_and_exit_code_of_a_subprocess(what):
    fork, sub = _both(what)
    assert (fork.returncode, fork.stdout, fork.stderr) == (
        sub.returncode, sub.stdout, sub.stderr), f"{what}: forked {fork}, subprocess {sub}"


def test_a_forked_run_joins_its_threads_then_runs_atexit():
    result = run_binary(_EXAMPLE, "shutdown")
    assert result.stdout == "main\nthread\natexit\n", (
        f"the interpreter's end: threads joined, then atexit: {result.stdout!r}")


def test_a_forked_run_that_raises_prints_the_traceback_and_exits_1():
    fork, sub = _both("raise")
    assert fork.returncode == sub.returncode == 1, (fork.returncode, sub.returncode)
    assert fork.stderr.splitlines()[-1] == sub.stderr.splitlines()[-1] == "RuntimeError: a bug"


def test_the_fork_server_starts_no_jax_backend():
    # A child forked from a process with a live XLA backend would share its threads'
    # state; each child must start its own, with this environment's 8 CPU devices.
    result = run_binary(_EXAMPLE, "backend")
    assert result.stdout.split() == ["0", "8"], (
        f"backends before the child's first jax call, devices: {result.stdout!r}")


def test_a_hung_forked_run_fails_with_its_stack(tmp_path):
    with pytest.raises(AssertionError) as failure:
        kill_when_written(_EXAMPLE, "hang", workdir=tmp_path, pattern="done", timeout=3)
    message = str(failure.value)
    assert "still running after 3 s" in message and "waiting" in message, message
    assert "in main" in message, f"the failure shows where it hung: {message}"


@_FORKING
def test_only_runs_that_keep_this_environment_are_forked(monkeypatch):
    assert forked.usable(None), "the suite's own environment: forked"
    assert not forked.usable(dict(os.environ)), "an env of the run's own: a subprocess"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    assert forked.usable(None), "a variable no preloaded library reads at import: forked"
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    assert not forked.usable(None), "a test changed what Python reads at start: a subprocess"
