"""Runs an experiment binary in a process of its own, as a user would (shared by the binaries'
tests): forked from one that has imported the libraries (`tests.forked`) or a new one."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from launch import multihost
from tests import forked

ROOT = pathlib.Path(__file__).resolve().parents[1]


# A binary's run: a subprocess, or a child of the fork server (`tests.forked`).
_Process = subprocess.Popen | forked.ForkedRun

# After a hung binary's timeout, how long its processes get to print their stacks.
STACK_DUMP_SECONDS = 20


def run_binary(
    module: str, *args: str, check: bool = True, timeout: int = 600,
    env: dict[str, str] | None = None, fresh_process: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m module args` from the repo root; asserts exit 0 when `check`.

    The run is forked from a process that has imported the libraries (`tests.forked`),
    unless it has an `env` of its own or `fresh_process` asks for a new interpreter, as
    a user starts it: then what importing them prints is seen too.

    A run still going after `timeout` seconds fails the test with what it wrote to stderr
    and every thread's Python stack (`_end_group`). A hang that shows up once in many runs
    is then seen where it hangs.
    """
    cmd = [sys.executable, "-m", module, *args]
    with tempfile.NamedTemporaryFile("w+") as out, tempfile.NamedTemporaryFile("w+") as err:
        proc = _start(cmd, env, stdout=out, stderr=err, fresh_process=fresh_process)
        result = _finish(proc, out, err, timeout, f"was still running after {timeout} s")
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stderr[-3000:]}"
    return result


def _finish(
    proc: _Process, out, err, timeout: float, hung: str
) -> subprocess.CompletedProcess:
    """Waits up to `timeout` s for `proc` to end, then ends its group and returns what it
    wrote to `out` and `err`. Still running then (a hang), it fails the test: `hung` says
    how, followed by its stderr with every thread's stack (`_end_group`)."""
    still_running = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        still_running = True
    finally:
        _end_group(proc, dump_stacks=still_running)
    stdout, stderr = _read(out), _read(err)
    if still_running:
        raise AssertionError(
            f"{proc.args} {hung}; its stderr, with every thread's stack at SIGABRT:\n"
            f"{without_module_lists(stderr)[-12000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _start(cmd: list[str], env: dict[str, str] | None, stdout, stderr,
           fresh_process: bool = False) -> _Process:
    """Starts `cmd` from the repo root in a process group of its own (which the processes
    it starts join), with `PYTHONFAULTHANDLER` on: SIGABRT prints every thread's stack.

    `stdout` and `stderr` are named temporary files (`stdout` None: discarded). A
    `python -m module ...` that keeps this environment is forked from a process that
    has imported the libraries (`tests.forked`) unless `fresh_process`; others start
    with `subprocess`.
    """
    if cmd[1] == "-m" and not fresh_process and forked.usable(env):
        return forked.ForkedRun(cmd[2], cmd[3:], stdout=stdout.name if stdout else os.devnull,
                                stderr=stderr.name)
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL if stdout is None else stdout,
                            stderr=stderr, start_new_session=True)


def _end_group(proc: _Process, dump_stacks: bool) -> None:
    """Ends every process of `proc`'s group, so none outlives the test. With `dump_stacks`
    (a hang) the group first gets SIGABRT and up to `STACK_DUMP_SECONDS` to print its
    stacks, e.g. every process of a `launch.multihost local` job."""
    if dump_stacks:
        deadline = time.time() + STACK_DUMP_SECONDS
        _signal_group(proc.pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STACK_DUMP_SECONDS)
        while _group_exists(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _read(file) -> str:
    """All that was written to the temporary `file`."""
    file.seek(0)
    return file.read()


def without_module_lists(text: str) -> str:
    """`text` without faulthandler's "Extension modules: ..." lines (thousands of
    characters after each stack dump, which would push the stacks out of a message)."""
    return "\n".join(
        line for line in text.split("\n") if not line.startswith("Extension modules:"))


def _signal_group(pgid: int, signum: int) -> None:
    """Sends `signum` to every process of the group `pgid`, if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_exists(pgid: int) -> bool:
    """Whether any process of the group `pgid` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def cpu_devices_env(count: int) -> dict[str, str]:
    """This environment with `count` CPU devices for a subprocess, other XLA flags kept."""
    return multihost.local_env(count)


def with_fusion_emitters(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this environment) for a subprocess that runs at demo or table size:
    XLA:CPU's own fusion emitters back in place of the tests' elemental ones
    (tests/conftest.py), which compile faster but compute such runs slower (12-05: the
    2-device demo and the DPD-fVAE smoke table passed their 900 s timeouts with them)."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_cpu_use_fusion_emitters=false", "")
    return env


def _wait_until(proc: _Process, cmd: list[str], condition, timeout: float,
                interval: float, err) -> None:
    """Returns once `condition()` holds (the run may have ended just after). Fails the test,
    with the run's stderr (`err`), if the run ended before `condition()` held (a crash, or
    the run finished too soon), or if `timeout` seconds passed first (a hang: then with
    every thread's stack, as `run_binary`); either way its process group is ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(interval)
    if condition():
        return
    running = proc.poll() is None
    _end_group(proc, dump_stacks=running)
    how = (f"was still running after {timeout} s (stacks at SIGABRT below)" if running
           else f"ended with exit code {proc.returncode} first")
    raise AssertionError(
        f"{cmd}: the condition to signal it never held; it {how}. Its stderr:\n"
        f"{without_module_lists(_read(err))[-12000:]}")


def _kill_when(
    module: str, args: tuple[str, ...], workdir: pathlib.Path, condition, timeout: float,
    interval: float,
) -> bool:
    """Runs `python -m module args --workdir=workdir` and SIGKILLs it once `condition()`
    holds (`_wait_until`). Returns whether it was still running when killed."""
    cmd = [sys.executable, "-m", module, *args, f"--workdir={workdir}"]
    with tempfile.NamedTemporaryFile("w+") as err:
        proc = _start(cmd, None, stdout=None, stderr=err)
        _wait_until(proc, cmd, condition, timeout, interval, err)
        running = proc.poll() is None
        _end_group(proc, dump_stacks=False)
    return running


def kill_after_checkpoint(
    module: str,
    *args: str,
    workdir: pathlib.Path,
    step: int,
    timeout: float = 300,
    checkpoints: str = "checkpoints",
) -> None:
    """Runs `python -m module args --workdir=workdir`; SIGKILLs it once a checkpoint of a
    step >= `step` is complete in `workdir / checkpoints` (a sub-workdir's, e.g.
    "gan_high/checkpoints"). Asserts it was killed before it finished (no summary.json)."""

    _kill_when(module, args, workdir, _checkpointed(workdir / checkpoints, step), timeout,
               interval=0.05)
    assert not (workdir / "summary.json").exists(), "the run finished before it could be killed"


def _checkpointed(directory: pathlib.Path, step: int):
    """A condition: a complete checkpoint of a step >= `step` is in `directory`."""

    def checkpointed() -> bool:
        steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit()]
        return bool(steps) and max(steps) >= step

    return checkpointed


def terminate_after_checkpoint(
    module: str, *args: str, workdir: pathlib.Path, step: int, timeout: float = 300,
    checkpoints: str = "checkpoints",
) -> subprocess.CompletedProcess:
    """Runs `python -m module args --workdir=workdir`; sends it SIGTERM (a preemption) once
    a checkpoint of a step >= `step` is in `workdir / checkpoints`, and waits for it to
    end on its own. Fails the test if it ended first, or hung (with every thread's stack).
    `module` may be `launch.multihost`: its whole job then gets the SIGTERM."""
    cmd = [sys.executable, "-m", module, *args, f"--workdir={workdir}"]
    with tempfile.NamedTemporaryFile("w+") as out, tempfile.NamedTemporaryFile("w+") as err:
        proc = _start(cmd, None, stdout=out, stderr=err)
        _wait_until(proc, cmd, _checkpointed(workdir / checkpoints, step), timeout, 0.05, err)
        if proc.poll() is not None:
            _end_group(proc, dump_stacks=False)
            raise AssertionError(
                f"{cmd} ended (exit {proc.returncode}) before it could get SIGTERM:\n"
                f"{without_module_lists(_read(err))[-6000:]}")
        proc.send_signal(signal.SIGTERM)
        return _finish(proc, out, err, timeout, f"did not end within {timeout} s of SIGTERM")


def kill_when_written(
    module: str, *args: str, workdir: pathlib.Path, pattern: str, timeout: float = 300
) -> None:
    """Runs `python -m module args --workdir=workdir`; SIGKILLs it within about a
    millisecond of a path matching `pattern` (a glob under the workdir) appearing, e.g.
    while the files after it are being written. Asserts it was killed while running."""
    assert _kill_when(
        module, args, workdir, lambda: any(workdir.glob(pattern)), timeout, interval=0.0005
    ), f"the run ended before {pattern} appeared: nothing was killed"


def finished_run(tmp_path_factory, module: str, *args: str) -> pathlib.Path:
    """The workdir, in a new temporary folder, of `python -m module args` run to its end:
    the uninterrupted run that a module's kill and preemption tests compare with."""
    workdir = tmp_path_factory.mktemp("whole")
    run_binary(module, *args, f"--workdir={workdir}")
    return workdir


def assert_kill_resumes_like_uninterrupted(
    module: str, *args: str, whole: pathlib.Path, killed: pathlib.Path, step: int,
    step_key: str = "step", params_key: str = "params_sha256",
) -> None:
    """SIGKILL after the checkpoint of `step` (`kill_after_checkpoint`); the rerun ends as
    the uninterrupted run in `whole` (`assert_resumed_like_uninterrupted`)."""
    kill_after_checkpoint(module, *args, workdir=killed, step=step)
    run_binary(module, *args, f"--workdir={killed}")
    assert_resumed_like_uninterrupted(whole, killed, step_key=step_key, params_key=params_key)
    assert_wall_time_counts_the_first_invocation(killed)


def assert_preemption_resumes_like_uninterrupted(
    module: str, *args: str, whole: pathlib.Path, stopped: pathlib.Path, step: int,
    unit: str = "step",
) -> None:
    """SIGTERM (a preemption) after the checkpoint of `step`: the run saves the step it is
    at, exits 143 with one line naming it, releases nothing; the rerun resumes from that
    step and ends as the uninterrupted run in `whole` (`assert_resumed_like_uninterrupted`)."""
    proc = terminate_after_checkpoint(module, *args, workdir=stopped, step=step)
    assert proc.returncode == 143, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    saved = max(int(p.name) for p in (stopped / "checkpoints").glob("*") if p.name.isdigit())
    assert f"the checkpoint of {unit} {saved} is saved" in proc.stderr, (
        f"one line must name the {unit} saved, {saved}: {proc.stderr[-1000:]}")
    assert not (stopped / "summary.json").exists(), "a preempted run releases nothing yet"
    rerun = run_binary(module, *args, f"--workdir={stopped}")
    assert f"resumed from {unit} {saved}" in rerun.stdout + rerun.stderr, (
        f"the rerun must resume from the {unit} saved at SIGTERM, {saved}")
    assert_resumed_like_uninterrupted(whole, stopped, step_key=unit)
    assert_wall_time_counts_the_first_invocation(stopped)


SUMMARY_AND_LEDGER = ("summary.json", "ledger.json")


def assert_wall_time_counts_the_first_invocation(resumed: pathlib.Path) -> None:
    """The summary of a run resumed from a checkpoint counts the time the invocation that
    wrote it had spent (`dpfed.train.run_clock`), and says so in its report."""
    summary = json.loads((resumed / "summary.json").read_text())
    earlier, total = summary["wall_seconds_earlier"], summary["wall_seconds"]
    assert earlier > 0, "the resumed run's wall time must include the killed invocation's"
    assert total > earlier, f"and its own: {total} s in all, {earlier} s earlier"
    report = (resumed / "report.md").read_text()
    assert "s of them in earlier invocations" in report, "the report must say so"


def assert_resumed_like_uninterrupted(
    whole: pathlib.Path,
    resumed: pathlib.Path,
    step_key: str = "step",
    params_key: str = "params_sha256",
) -> None:
    """A killed-and-resumed run's workdir ends as the uninterrupted run's: the same params
    (summary.json's `params_key`), ledger events and metrics.jsonl steps (none lost, none
    repeated)."""

    def read(path):
        summary, ledger = (json.loads((path / n).read_text()) for n in SUMMARY_AND_LEDGER)
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return summary[params_key], ledger["events"], [json.loads(x)[step_key] for x in lines]

    (params, events, steps), (params_w, events_w, steps_w) = read(resumed), read(whole)
    assert params == params_w, "the resumed run's params differ from the uninterrupted run's"
    assert events == events_w, "the resumed ledger differs: privacy spend lost or double-counted"
    assert steps == steps_w, f"metrics.jsonl lost or repeated {step_key}s: {steps} vs {steps_w}"


_HOLD_LOCK = """
import sys, time
from dpfed.train.workdir import Workdir
Workdir(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def workdir_locked_by_another_process(workdir: pathlib.Path) -> Iterator[None]:
    """Another process holds `workdir`'s lock (`Workdir.lock`) inside the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(workdir)], stdout=subprocess.PIPE, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked", "the holder could not lock"
        yield
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
