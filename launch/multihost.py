r"""Launches an experiment binary on every host of a multi-host job (Cloud TPU VM, SLURM, local).

A multi-host JAX job runs the *same* command on every host; each process calls
`jax.distributed.initialize()` (the binaries' `--distributed` flag, added here) and then
sees the devices of all hosts, so the `clients` mesh of `dpfed.federated` spans the pod.

Cloud TPU VM (a pod slice; the repo and .venv must exist at --repo_dir on every worker):

  .venv/bin/python -m launch.multihost tpu --tpu_name=my-v4-32 --zone=us-central2-b --dry_run -- \
    experiments.fedavg_classifier --clients_per_round=256 --workdir=/mnt/bucket/run1

SLURM GPU cluster (one process per node, all its GPUs; JAX reads the SLURM variables):

  .venv/bin/python -m launch.multihost slurm --nodes=4 --gpus_per_node=8 --dry_run -- \
    experiments.fedavg_classifier --clients_per_round=256 --workdir=/shared/run1

One machine, several processes (a multi-host job in miniature: each process its own JAX
runtime, CPU devices split per process, collectives between processes over gloo; try a
pod job here first):

  .venv/bin/python -m launch.multihost local --num_processes=2 --devices_per_process=2 -- \
    experiments.fedavg_classifier --clients_per_round=16 --workdir=workdirs/two_hosts

Process 0 prints to this terminal and writes the workdir; the others log to files under
--log_dir. If one process fails, the others are stopped (they would wait for it forever).

--dry_run prints the commands (and the sbatch script) without running anything.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

DISTRIBUTED_FLAG = "--distributed"
STOP_GRACE_SECONDS = 10.0  # how long stopped processes get to exit before they are killed
# After a SIGTERM, once one process has exited, how long the others get to follow before they
# are killed: they save the same round together, so a process still running this long after
# the first one is blocked (in a collective with a process that is gone).
PREEMPTION_LAG_SECONDS = 120.0
PREEMPTED_CODES = (0, 143)  # exit codes of a process that stopped as a SIGTERM asked
SLURM_SIGTERM_SECONDS = 120  # SLURM sends SIGTERM this long before the time limit


def remote_python_command(repo_dir: str, module: str, flags: Sequence[str]) -> str:
    """The shell command each host runs: the module with its flags and --distributed."""
    args = [".venv/bin/python", "-m", module, *flags]
    if DISTRIBUTED_FLAG not in flags:
        args.append(DISTRIBUTED_FLAG)
    # exec: the shell becomes Python, so a scheduler's SIGTERM reaches the run itself.
    return f"cd {_quote_path(repo_dir)} && exec " + shlex.join(args)


def _quote_path(path: str) -> str:
    """Shell-quotes `path`, leaving a leading `~/` unquoted so the shell expands it."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def tpu_command(args: argparse.Namespace) -> list[str]:
    """`gcloud ... tpu-vm ssh --worker=all`: the same command on every TPU VM worker."""
    command = [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu_name,
        f"--zone={args.zone}", "--worker=all",
        f"--command={remote_python_command(args.repo_dir, args.module, args.flags)}",
    ]
    if args.project:
        command.insert(6, f"--project={args.project}")
    return command


def slurm_script(args: argparse.Namespace) -> str:
    """An sbatch script: one task per node, `srun` starts the binary on all of them; SIGTERM
    `SLURM_SIGTERM_SECONDS` before the time limit makes the run checkpoint and stop."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --time={args.time}",
        # SIGTERM this long before the time limit: the run checkpoints and exits 143.
        f"#SBATCH --signal=TERM@{SLURM_SIGTERM_SECONDS}",
    ]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    # JAX's SLURM detection gives each process the GPU of its SLURM_LOCALID alone (with
    # one task per node: GPU 0) unless JAX_LOCAL_DEVICE_IDS names them
    # (jax/_src/distributed.py): every GPU of the node, one process.
    gpus = ",".join(str(i) for i in range(args.gpus_per_node))
    lines += ["", f"export JAX_LOCAL_DEVICE_IDS={gpus}", "srun bash -c " + shlex.quote(
        remote_python_command(args.repo_dir, args.module, args.flags))]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    """A TCP port of localhost that no one listens on now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def local_commands(args: argparse.Namespace, port: int) -> list[list[str]]:
    """One command per process: the module with --distributed and the coordinator flags."""
    return [
        [sys.executable, "-m", args.module, *args.flags, DISTRIBUTED_FLAG,
         f"--coordinator_address=localhost:{port}", f"--num_processes={args.num_processes}",
         f"--process_id={i}"]
        for i in range(args.num_processes)
    ]


def local_env(devices_per_process: int | None) -> dict[str, str]:
    """This environment, with XLA's host device count set to `devices_per_process`."""
    env = dict(os.environ)
    if devices_per_process is not None:
        kept = [f for f in env.get("XLA_FLAGS", "").split()
                if not f.startswith("--xla_force_host_platform_device_count")]
        kept.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(kept)
    return env


def run_local(commands: list[list[str]], env: dict[str, str], log_dir: pathlib.Path) -> int:
    """Runs the processes; returns 0 when all succeed, else the first failure's exit code.

    Process 0 inherits this terminal; process i writes `log_dir/process_<i>.log`. When a
    process fails, the others are terminated (killed after `STOP_GRACE_SECONDS`): they
    would wait for it at their next collective. Runs are crash-safe: rerun to resume.
    A SIGTERM to the launcher (a preempted job) goes to every process, and the launcher
    waits for them: they agree on a round, checkpoint it and exit with 143
    (`dpfed.train.preemption`). A process that fails meanwhile stops the others, and those
    still running `PREEMPTION_LAG_SECONDS` after the first one exited are killed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    terminated = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    for i, command in enumerate(commands):
        log = None if i == 0 else open(log_dir / f"process_{i}.log", "w")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    try:
        while not terminated.is_set():
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                return _report_failure(*failed[0], log_dir)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
        print("SIGTERM: passed on to every process; waiting for their checkpoint",
              file=sys.stderr)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return _wait_for_checkpoint(procs, log_dir)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        # A process blocked in a collective cannot run Python's SIGTERM handling: kill it.
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            if log is not None:
                log.close()


def _report_failure(i: int, code: int, log_dir: pathlib.Path) -> int:
    """Prints that process `i` exited with `code` and the others will stop; returns the
    shell's exit status of it."""
    where = "above" if i == 0 else f"in {log_dir / f'process_{i}.log'}"
    print(f"process {i} exited with {_exit_code(code)} (its output is {where}); "
          "stopping the others", file=sys.stderr)
    return _exit_code(code)


def _wait_for_checkpoint(procs: list[subprocess.Popen], log_dir: pathlib.Path) -> int:
    """Waits for SIGTERMed processes to save their round and exit; returns the first
    non-zero exit status, or that of a failure (the caller stops the others)."""
    first_exit = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes)
                  if c is not None and _exit_code(c) not in PREEMPTED_CODES]
        if failed:
            return _report_failure(*failed[0], log_dir)
        if all(c is not None for c in codes):
            return next((_exit_code(c) for c in codes if c != 0), 0)
        if first_exit is None and any(c is not None for c in codes):
            first_exit = time.monotonic()
        if first_exit is not None and time.monotonic() - first_exit > PREEMPTION_LAG_SECONDS:
            running = [i for i, c in enumerate(codes) if c is None]
            print(f"processes {running} still running {PREEMPTION_LAG_SECONDS:.0f} s after "
                  "another saved and exited: killing them (blocked in a collective?)",
                  file=sys.stderr)
            return _exit_code(-signal.SIGKILL)
        time.sleep(0.2)


def _exit_code(code: int) -> int:
    """A process's exit status as a shell reports it: killed by signal N gives 128 + N."""
    return code if code >= 0 else 128 - code


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="target", required=True)
    for name in ("tpu", "slurm", "local"):
        p = sub.add_parser(name)
        p.add_argument("--dry_run", action="store_true", help="Print, do not run.")
        p.add_argument("module", help="Experiment module, e.g. experiments.fedavg_classifier.")
        p.add_argument("flags", nargs=argparse.REMAINDER, help="The module's flags.")
        if name == "local":
            p.add_argument("--num_processes", type=int, default=2)
            p.add_argument("--devices_per_process", type=int, default=None,
                           help="CPU devices of each process (default: XLA_FLAGS or 1).")
            p.add_argument("--port", type=int, default=None, help="Coordinator port (free).")
            p.add_argument("--log_dir", default=None, help="Logs of processes 1.. (a tmp dir).")
            continue
        p.add_argument("--repo_dir", default="~/dpfed", help="Repo path on every host.")
        if name == "tpu":
            p.add_argument("--tpu_name", required=True)
            p.add_argument("--zone", required=True)
            p.add_argument("--project", default=None)
        else:
            p.add_argument("--nodes", type=int, required=True)
            p.add_argument("--gpus_per_node", type=int, default=8)
            p.add_argument("--time", default="04:00:00")
            p.add_argument("--partition", default=None)
            p.add_argument("--job_name", default="dpfed")
    args = parser.parse_args(argv)
    if "--dry_run" in args.flags:
        parser.error("--dry_run must come before the module: after it, it is the module's "
                     "flag, and the job would be launched")
    if args.target == "slurm" and args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.target == "slurm" and args.gpus_per_node < 1:
        parser.error("--gpus_per_node must be >= 1")
    if args.target == "local" and args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    if args.target == "local" and args.devices_per_process is not None and (
            args.devices_per_process < 1):
        parser.error("--devices_per_process must be >= 1")
    return args


def _main_local(args: argparse.Namespace) -> int:
    """Prints the processes' commands and, unless --dry_run, runs them (`run_local`)."""
    commands = local_commands(args, args.port or free_port())
    env = local_env(args.devices_per_process)
    prefix = "" if args.devices_per_process is None else (
        f"XLA_FLAGS={shlex.quote(env['XLA_FLAGS'])} ")
    for command in commands:
        print(prefix + shlex.join(command))
    if args.dry_run:
        return 0
    log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix="dpfed_local_"))
    print(f"processes 1..{args.num_processes - 1} log to {log_dir}", flush=True)
    return run_local(commands, env, log_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.target == "local":
        return _main_local(args)
    if args.target == "tpu":
        command = tpu_command(args)
        print(shlex.join(command))
        return 0 if args.dry_run else subprocess.call(command)
    script = slurm_script(args)
    if args.dry_run:
        print(script, end="")
        print("sbatch <the script above>")
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    print(f"sbatch {f.name}")
    return subprocess.call(["sbatch", f.name])


if __name__ == "__main__":
    sys.exit(main())
