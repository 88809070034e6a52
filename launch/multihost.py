r"""Launches an experiment binary on every host of a multi-host job (Cloud TPU VM or SLURM).

A multi-host JAX job runs the *same* command on every host; each process calls
`jax.distributed.initialize()` (the binaries' `--distributed` flag, added here) and then
sees the devices of all hosts, so the `clients` mesh of `dpfed.federated` spans the pod.

Cloud TPU VM (a pod slice; the repo and .venv must exist at --repo_dir on every worker):

  python -m launch.multihost tpu --tpu_name=my-v4-32 --zone=us-central2-b --dry_run -- \
    experiments.fedavg_classifier --clients_per_round=256 --workdir=/mnt/bucket/run1

SLURM GPU cluster (one process per node, all its GPUs; JAX reads the SLURM variables):

  python -m launch.multihost slurm --nodes=4 --gpus_per_node=8 --dry_run -- \
    experiments.fedavg_classifier --clients_per_round=256 --workdir=/shared/run1

--dry_run prints the commands (and the sbatch script) without running anything.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence

DISTRIBUTED_FLAG = "--distributed"


def remote_python_command(repo_dir: str, module: str, flags: Sequence[str]) -> str:
    """The shell command each host runs: the module with its flags and --distributed."""
    args = [".venv/bin/python", "-m", module, *flags]
    if DISTRIBUTED_FLAG not in flags:
        args.append(DISTRIBUTED_FLAG)
    return f"cd {_quote_path(repo_dir)} && " + shlex.join(args)


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
    """An sbatch script: one task per node, `srun` starts the binary on all of them."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --time={args.time}",
    ]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    lines += ["", "srun bash -c " + shlex.quote(
        remote_python_command(args.repo_dir, args.module, args.flags))]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="target", required=True)
    for name in ("tpu", "slurm"):
        p = sub.add_parser(name)
        p.add_argument("--repo_dir", default="~/dpfed", help="Repo path on every host.")
        p.add_argument("--dry_run", action="store_true", help="Print, do not run.")
        p.add_argument("module", help="Experiment module, e.g. experiments.fedavg_classifier.")
        p.add_argument("flags", nargs=argparse.REMAINDER, help="The module's flags.")
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
    if args.target == "slurm" and args.nodes < 1:
        parser.error("--nodes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
