"""`python -m module args` started by forking a process that has imported the libraries.

Each experiment binary spends ~2.5 s of a 2-core machine importing jax, flax, optax,
orbax and dp_accounting before it reads its flags, and the suite runs binaries in every
test of a binary, kill and resume. multiprocessing's fork server imports them once per test
process (`_PRELOAD`); each run is a child forked from it that runs the module as
`python -m` would (`runpy`, `__main__`, the repo root first on `sys.path` and as its
cwd) and ends as the interpreter would (non-daemon threads joined, `atexit` run, the
exit code of its `SystemExit`). Importing those libraries starts no backend, so the
child initialises jax itself, reading the environment as a fresh process does.

What a forked child cannot do: start with other values of what Python and those
libraries read as they start (PYTHONPATH, jax's JAX_* configuration), or show what
importing the libraries prints. Runs with an `env` of their own, or after a test changed
one of those variables, start with `subprocess` (`usable`); so do all runs when
DPFED_TEST_SUBPROCESS=1. The child takes the rest of the test process's environment.
"""

import atexit
import faulthandler
import multiprocessing
import os
import pathlib
import runpy
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Imported by every binary; importing them starts no jax backend (tests/test_forked.py).
_PRELOAD = ("numpy", "scipy.stats", "jax", "jax.numpy", "flax.linen", "optax",
            "orbax.checkpoint", "dp_accounting", "absl.app", "absl.flags", "PIL.Image")

# What Python reads when it starts and the preloaded libraries read when imported (jax
# its JAX_* configuration): a run is forked only while these are as they were when this
# module was imported (tests/conftest.py had set them), and so as the fork server has
# them. Others (e.g. TF_CPP_MIN_LOG_LEVEL, which importing tensorflow_datasets sets) the
# child takes from this process when it starts, as a subprocess would.
_READ_AT_START = ("JAX_", "XLA_", "PYTHON", "LD_", "DPFED_TEST_SUBPROCESS")


def _read_at_start(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(_READ_AT_START)}


_AT_IMPORT = _read_at_start(os.environ)


def usable(env: dict[str, str] | None) -> bool:
    """Whether a run with `env` (None: this process's) can be a forked child: no `env`
    of its own, `_READ_AT_START` variables unchanged since import (no test has changed,
    e.g., its PYTHONPATH), and DPFED_TEST_SUBPROCESS is not 1."""
    return (env is None and _read_at_start(os.environ) == _AT_IMPORT
            and _AT_IMPORT.get("DPFED_TEST_SUBPROCESS") != "1")


def _context() -> multiprocessing.context.ForkServerContext:
    """multiprocessing's fork server, preloading `_PRELOAD` (started at the first run)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOAD))
    return context


class ForkedRun:
    """A `subprocess.Popen`-like handle on a forked `python -m module args`: `pid` (also
    its process group's id), `args`, `returncode`, `poll`, `wait`, `send_signal`."""

    def __init__(self, module: str, args: list[str], stdout: str, stderr: str):
        self.args = [sys.executable, "-m", module, *args]
        self._process = _context().Process(
            target=_run_module, args=(module, args, stdout, stderr, dict(os.environ)),
            daemon=False)
        self._process.start()
        self.pid = self._process.pid
        _wait_for_own_group(self.pid)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)


def _wait_for_own_group(pid: int, timeout: float = 30) -> None:
    """Returns once the child leads a process group of its own (its first act), so that
    signalling its group reaches it and every process it starts."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if os.getpgid(pid) == pid:
                return
        except ProcessLookupError:
            return  # It has ended already.
        time.sleep(0.001)
    raise AssertionError(f"forked child {pid} did not start within {timeout} s")


def _run_module(
    module: str, args: list[str], stdout: str, stderr: str, environ: dict[str, str]
) -> None:
    """In the forked child: runs `module` as `python -m module args` from the repo root
    in the test process's `environ`, writing to the files `stdout` and `stderr`, and
    exits as the interpreter would."""
    os.setsid()
    os.environ.clear()
    os.environ.update(environ)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    faulthandler.enable()  # As PYTHONFAULTHANDLER=1: SIGABRT prints every stack.
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:  # noqa: BLE001 -- printed as the interpreter prints it.
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # noqa: SLF001 -- the interpreter's own wait for threads.
    atexit._run_exitfuncs()  # noqa: SLF001 -- multiprocessing's children skip atexit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(code: object) -> int:
    """The exit status of `SystemExit(code)`, as the interpreter sets it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
