"""Runs an experiment binary in a subprocess, as a user would (shared by the binaries' tests)."""

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_binary(
    module: str, *args: str, check: bool = True, timeout: int = 600, **kw
) -> subprocess.CompletedProcess:
    """`python -m module args` from the repo root; asserts exit 0 when `check`."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stderr[-3000:]}"
    return proc


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
