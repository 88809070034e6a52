"""Multi-host launchers: --dry_run prints the commands every host would run."""

import subprocess
import sys

from launch import multihost

FLAGS = ["experiments.fedavg_classifier", "--rounds=5", "--workdir=/shared/w"]


def test_tpu_dry_run_runs_the_binary_with_distributed_on_every_worker(capsys):
    code = multihost.main(["tpu", "--tpu_name=pod", "--zone=us-central2-b", "--dry_run", *FLAGS])
    out = capsys.readouterr().out
    assert code == 0, "a dry run succeeds"
    assert "tpu-vm ssh pod" in out and "--worker=all" in out, f"all TPU workers: {out}"
    assert "-m experiments.fedavg_classifier --rounds=5 --workdir=/shared/w --distributed" in out, (
        f"the binary, its flags and --distributed: {out}")


def test_slurm_dry_run_prints_an_sbatch_script_with_one_task_per_node(capsys):
    code = multihost.main(["slurm", "--nodes=4", "--gpus_per_node=8", "--dry_run", *FLAGS])
    out = capsys.readouterr().out
    assert code == 0, "a dry run succeeds"
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out, out
    assert "srun bash -c" in out and "--distributed" in out, f"srun starts every process: {out}"


def test_launcher_runs_as_a_module_in_dry_run_mode():
    result = subprocess.run(
        [sys.executable, "-m", "launch.multihost", "slurm", "--nodes=2", "--dry_run", *FLAGS],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2" in result.stdout, "the printed script names the node count"


def test_zero_nodes_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "launch.multihost", "slurm", "--nodes=0", "--dry_run", *FLAGS],
        capture_output=True, text=True, check=False)
    assert result.returncode == 2, "argparse usage errors exit with 2"
    assert "--nodes must be >= 1" in result.stderr, result.stderr


def test_a_home_relative_repo_dir_stays_expandable_by_the_remote_shell():
    command = multihost.remote_python_command("~/my repo", "experiments.x", ["--a=1"])
    assert command.startswith("cd ~/'my repo' && "), f"~ must stay unquoted: {command}"


def test_tpu_dry_run_names_the_zone(capsys):
    multihost.main(["tpu", "--tpu_name=pod", "--zone=us-central2-b", "--dry_run", *FLAGS])
    out = capsys.readouterr().out
    assert "--zone=us-central2-b" in out, f"gcloud must be told the TPU's zone: {out}"


def test_slurm_script_asks_for_the_gpus_per_node():
    args = multihost.parse_args(["slurm", "--nodes=4", "--gpus_per_node=2", *FLAGS])
    lines = multihost.slurm_script(args).splitlines()
    assert "#SBATCH --gpus-per-node=2" in lines, f"--gpus_per_node=2 must reach sbatch: {lines}"
