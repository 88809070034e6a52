"""tests/binary.py: a binary that hangs or crashes fails its test with its stderr and stacks,
and leaves no process."""

import os
import time

import pytest

from tests.binary import kill_when_written, run_binary

HANGS = """
import subprocess, sys, time

def wait_in_a_named_function():
    time.sleep(3600)

child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print(child.pid, file=open(sys.argv[1], "w"), flush=True)
print("started", file=sys.stderr, flush=True)
wait_in_a_named_function()
"""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_hung_binary_fails_with_its_stack_and_its_processes_are_killed(tmp_path):
    (tmp_path / "hangs.py").write_text(HANGS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    pid_file = tmp_path / "child.pid"
    with pytest.raises(AssertionError) as failure:
        run_binary("hangs", str(pid_file), timeout=3, env=env)
    message = str(failure.value)
    assert "still running after 3 s" in message, f"the failure names the timeout: {message}"
    assert "started" in message, f"the failure keeps the binary's stderr: {message}"
    assert "wait_in_a_named_function" in message, f"the failure shows where it hung: {message}"
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while _running(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running(child), "a process the hung binary started outlived the test"


def test_a_binary_that_exits_gives_its_output_and_code(tmp_path):
    (tmp_path / "fails.py").write_text(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = run_binary("fails", check=False, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n"), result


def test_a_binary_that_hangs_before_it_can_be_killed_fails_with_its_stack(tmp_path, monkeypatch):
    (tmp_path / "hangs_early.py").write_text(
        "import sys, time\nprint('waiting', file=sys.stderr, flush=True)\n"
        "def never_writes():\n    time.sleep(3600)\nnever_writes()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(AssertionError) as failure:
        kill_when_written("hangs_early", workdir=tmp_path / "w", pattern="done", timeout=3)
    message = str(failure.value)
    assert "still running after 3 s" in message, f"the failure names the timeout: {message}"
    assert "waiting" in message and "never_writes" in message, (
        f"the failure shows the stderr and where it hung: {message}")


def test_a_binary_that_crashes_before_it_can_be_killed_fails_with_its_stderr(
    tmp_path, monkeypatch
):
    (tmp_path / "crashes.py").write_text("raise RuntimeError('broken before any checkpoint')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(AssertionError) as failure:
        kill_when_written("crashes", workdir=tmp_path / "w", pattern="done", timeout=60)
    message = str(failure.value)
    assert "ended with exit code 1 first" in message, f"the failure names the exit: {message}"
    assert "broken before any checkpoint" in message, f"the failure shows why: {message}"
