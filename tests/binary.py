"""Runs an experiment binary in a subprocess, as a user would (shared by the binaries' tests)."""

import pathlib
import subprocess
import sys

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
