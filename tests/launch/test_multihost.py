"""Multi-host launchers: --dry_run prints the commands every host would run; `local` runs
a multi-host job as several processes of this machine."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir
from launch import multihost
from tests.binary import (
    ROOT,
    cpu_devices_env,
    run_binary,
    terminate_after_checkpoint,
    without_module_lists,
    workdir_locked_by_another_process,
)

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


def test_slurm_script_sigterms_the_run_before_its_time_limit(capsys):
    multihost.main(["slurm", "--nodes=2", "--dry_run", *FLAGS])
    out = capsys.readouterr().out
    assert f"#SBATCH --signal=TERM@{multihost.SLURM_SIGTERM_SECONDS}" in out, (
        f"at the time limit the run must get SIGTERM early enough to checkpoint: {out}")


def test_every_host_execs_python_so_a_sigterm_reaches_the_run():
    command = multihost.remote_python_command("~/dpfed", "experiments.datalens", ["--steps=2"])
    assert " && exec .venv/bin/python -m experiments.datalens" in command, (
        f"a shell waiting for Python would take the scheduler's SIGTERM itself: {command}")


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


@pytest.mark.parametrize("flag", ["--num_processes=0", "--devices_per_process=0"])
def test_local_needs_a_process_and_a_device(flag, capsys):
    with pytest.raises(SystemExit) as error:
        multihost.parse_args(["local", flag, *FLAGS])
    assert error.value.code == 2, "argparse usage errors exit with 2"
    assert f"{flag.split('=')[0]} must be >= 1" in capsys.readouterr().err


def test_a_home_relative_repo_dir_stays_expandable_by_the_remote_shell():
    command = multihost.remote_python_command("~/my repo", "experiments.x", ["--a=1"])
    assert command.startswith("cd ~/'my repo' && "), f"~ must stay unquoted: {command}"


def test_tpu_dry_run_names_the_zone(capsys):
    multihost.main(["tpu", "--tpu_name=pod", "--zone=us-central2-b", "--dry_run", *FLAGS])
    out = capsys.readouterr().out
    assert "--zone=us-central2-b" in out, f"gcloud must be told the TPU's zone: {out}"


def test_tpu_dry_run_names_the_project(capsys):
    multihost.main(["tpu", "--tpu_name=pod", "--zone=b", "--project=my-proj", "--dry_run",
                    *FLAGS])
    out = capsys.readouterr().out
    assert "--project=my-proj" in out, f"gcloud must be told the TPU's project: {out}"


def test_tpu_without_dry_run_runs_gcloud_and_exits_with_its_code(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(multihost.subprocess, "call", lambda command: calls.append(command) or 5)
    code = multihost.main(["tpu", "--tpu_name=pod", "--zone=b", *FLAGS])
    assert calls and calls[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"], (
        f"without --dry_run the launcher must run gcloud's ssh to the workers: {calls}")
    assert code == 5, f"the launcher exits with gcloud's exit code, got {code}"


def test_zero_gpus_per_node_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as error:
        multihost.parse_args(["slurm", "--nodes=2", "--gpus_per_node=0", *FLAGS])
    assert error.value.code == 2, "argparse usage errors exit with 2"
    assert "--gpus_per_node must be >= 1" in capsys.readouterr().err


def test_slurm_script_asks_for_the_gpus_per_node():
    args = multihost.parse_args(["slurm", "--nodes=4", "--gpus_per_node=2", *FLAGS])
    lines = multihost.slurm_script(args).splitlines()
    assert "#SBATCH --gpus-per-node=2" in lines, f"--gpus_per_node=2 must reach sbatch: {lines}"


def test_slurm_script_gives_its_one_process_every_gpu_of_the_node():
    # JAX's SLURM detection would give the node's one process only GPU SLURM_LOCALID (0).
    args = multihost.parse_args(["slurm", "--nodes=4", "--gpus_per_node=4", *FLAGS])
    lines = multihost.slurm_script(args).splitlines()
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines, (
        f"the process must see all 4 GPUs of its node, not GPU 0 alone: {lines}")
    assert lines.index("export JAX_LOCAL_DEVICE_IDS=0,1,2,3") < next(
        i for i, line in enumerate(lines) if line.startswith("srun")), "set before srun"


@pytest.mark.parametrize("target", [["slurm", "--nodes=2"], ["tpu", "--tpu_name=a", "--zone=b"]])
def test_dry_run_after_the_module_is_a_usage_error_not_a_launch(target, capsys):
    with pytest.raises(SystemExit) as error:
        multihost.parse_args([*target, *FLAGS, "--dry_run"])
    assert error.value.code == 2, "a --dry_run the module would get must not launch the job"
    assert "--dry_run must come before the module" in capsys.readouterr().err


def test_local_dry_run_starts_every_process_against_one_coordinator(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                       "--xla_force_host_platform_device_count=8")
    code = multihost.main(["local", "--num_processes=3", "--devices_per_process=2",
                           "--port=1234", "--dry_run", *FLAGS])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, "a dry run succeeds"
    assert len(lines) == 3, f"one command per process: {lines}"
    for i, line in enumerate(lines):
        assert line.startswith("XLA_FLAGS='--xla_backend_optimization_level=0 "
                               "--xla_force_host_platform_device_count=2' "), (
            f"the device count replaced, other XLA flags kept: {line}")
        assert line.endswith(
            "--rounds=5 --workdir=/shared/w --distributed --coordinator_address=localhost:1234"
            f" --num_processes=3 --process_id={i}"), f"process {i}'s flags: {line}"


def test_local_stops_every_process_when_one_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(multihost, "STOP_GRACE_SECONDS", 0.5)
    code = multihost.main(["local", "--num_processes=3", f"--log_dir={tmp_path}",
                           "tests.launch.fake_job", f"--pid_dir={tmp_path}"])
    assert code == 3, "the launcher exits with the failed process's code"
    for i in (0, 2):
        pid = int((tmp_path / f"{i}.pid").read_text())
        with pytest.raises(ProcessLookupError):  # killed and reaped, not left hanging
            os.kill(pid, 0)


def test_local_waits_for_every_process_not_the_first_to_succeed(tmp_path, monkeypatch):
    # Process 0 exits 0 at once, process 1 fails 0.5 s later: the job failed; the launcher
    # must not report success as soon as one process has.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(multihost, "STOP_GRACE_SECONDS", 0.5)
    code = multihost.main(["local", "--num_processes=2", f"--log_dir={tmp_path}",
                           "tests.launch.fake_job", f"--pid_dir={tmp_path}", "--mode=done_first"])
    assert code == 3, f"the launcher exits with the failed process's code, got {code}"


def test_local_sigterms_the_others_before_it_kills_them(tmp_path, monkeypatch):
    # Process 1 exits 3 once process 0 handles SIGTERM; process 0 must get a SIGTERM (a
    # run that can still save does, then exits), not only the kill after the grace.
    monkeypatch.setattr(multihost, "STOP_GRACE_SECONDS", 0.5)
    ready, termed = tmp_path / "ready", tmp_path / "termed"
    waits_for_sigterm = (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: pathlib.Path({str(termed)!r}).touch()"
        " or sys.exit(0))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(30)\n")
    fails = (f"import os, sys, time\nwhile not os.path.exists({str(ready)!r}): time.sleep(0.01)"
             "\nsys.exit(3)\n")
    code = multihost.run_local([[sys.executable, "-c", waits_for_sigterm],
                                [sys.executable, "-c", fails]], dict(os.environ), tmp_path)
    assert code == 3, f"the launcher exits with the failed process's code, got {code}"
    assert termed.exists(), "the other process was killed without a SIGTERM first"


def _sigterm_launcher(tmp_path, mode, num_processes=3):
    """Runs `local` on fake_job in `mode` and SIGTERMs this process (the launcher) once
    every process has written its pid; returns the launcher's exit code and the pids."""
    def sigterm_when_all_started():
        while len(list(tmp_path.glob("*.pid"))) < num_processes:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=sigterm_when_all_started, daemon=True).start()
    code = multihost.main([
        "local", f"--num_processes={num_processes}", f"--log_dir={tmp_path / 'logs'}",
        "tests.launch.fake_job", f"--pid_dir={tmp_path}", f"--mode={mode}", "--sleep_s=30"])
    pids = [int((tmp_path / f"{i}.pid").read_text()) for i in range(num_processes)]
    return code, pids


def _assert_reaped(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # killed and reaped, not left hanging
            os.kill(pid, 0)


def test_after_a_sigterm_processes_blocked_after_one_exited_are_killed(
        tmp_path, monkeypatch, capsys):
    # Process 0 saves and exits 143; 1 and 2 stay blocked: the launcher must not wait for
    # them forever (before, it waited for every process, here their 30 s sleep: exit 143).
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(multihost, "PREEMPTION_LAG_SECONDS", 1.0)
    monkeypatch.setattr(multihost, "STOP_GRACE_SECONDS", 0.5)
    code, pids = _sigterm_launcher(tmp_path, "preempted")
    assert code == 137, f"processes killed after the lag: exit 128 + SIGKILL, got {code}"
    assert "processes [1, 2] still running 1 s after" in capsys.readouterr().err, (
        "the launcher names the processes it kills")
    _assert_reaped(pids)


def test_a_process_failing_after_a_sigterm_stops_the_others(tmp_path, monkeypatch, capsys):
    # Process 1 exits 3 instead of saving: the others, blocked, are stopped at once, not
    # after the lag (before, the launcher waited for them and said nothing).
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(multihost, "STOP_GRACE_SECONDS", 0.5)
    code, pids = _sigterm_launcher(tmp_path, "fail_on_sigterm")
    assert code == 3, f"the launcher exits with the failed process's code, got {code}"
    assert "process 1 exited with 3" in capsys.readouterr().err, "it names the failure"
    _assert_reaped(pids)


def test_processes_exiting_0_after_a_sigterm_are_no_failure(tmp_path, monkeypatch, capsys):
    # A process that ends its run normally as the SIGTERM comes exits 0: the launcher took
    # that status for 128 (a failure) and stopped the others.
    monkeypatch.chdir(ROOT)
    code, pids = _sigterm_launcher(tmp_path, "done_on_sigterm")
    assert code == 0, f"every process exited 0: the launcher must too, got {code}"
    assert "exited with" not in capsys.readouterr().err, "no process failed"
    _assert_reaped(pids)


def test_a_job_whose_processes_all_saved_after_a_sigterm_exits_143(tmp_path, monkeypatch):
    # Every process saved its round and exited as the SIGTERM asked (here killed by it:
    # 128 + 15): the launcher must exit 143 too, so a scheduler requeues the job, not 0.
    monkeypatch.chdir(ROOT)
    code, pids = _sigterm_launcher(tmp_path, "preempted", num_processes=1)
    assert code == 143, f"a preempted job must exit 143, not as finished: got {code}"
    _assert_reaped(pids)


# A multi-host job in miniature: 2 processes x 2 CPU devices on one shared workdir.
LOCAL_JOB = ["experiments.fedavg_classifier", "--model=logreg", "--local_steps=2",
             "--local_batch_size=10", "--eval_every=2", "--checkpoint_every=2",
             "--noise_multiplier=1.0", "--l2_clip=0.5"]


def _run_local_job(logs, *args, timeout=600):
    """`launch.multihost local --log_dir=logs args` (check=False). A failure of run_binary
    (a hang) also shows process 1's log, where its stack went."""
    try:
        return run_binary("launch.multihost", "local", f"--log_dir={logs}", *args,
                          check=False, timeout=timeout)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_process_1_log(logs)}") from None


def _process_1_log(logs) -> str:
    """The end of process 1's log under `logs`, for a failure message."""
    log = logs / "process_1.log"
    text = without_module_lists(log.read_text())[-6000:] if log.exists() else "(no log)"
    return f"process 1 ({log}):\n{text}"


# A preempted job: 100 rounds, so that it still runs when the SIGTERM comes.
PREEMPTED_JOB = [*LOCAL_JOB, "--rounds=100", "--eval_every=10", "--checkpoint_every=10"]


@dataclasses.dataclass(frozen=True)
class TwoProcessJob:
    """A 2-process job SIGTERMed after its checkpoint of round 10 and rerun to its end,
    and the same rounds in one process on as many devices (`two_process_job`)."""

    workdir: pathlib.Path  # of the 2-process job
    stopped: subprocess.CompletedProcess  # the launcher's run that got the SIGTERM
    stopped_logs: pathlib.Path  # its processes' logs
    saved: int  # the newest checkpoint's round after the SIGTERM
    rerun: subprocess.CompletedProcess  # the launcher's rerun to the end
    one: pathlib.Path  # workdir of the one-process run


# The four tests of `two_process_job` are `slow` (~100 s of process starts on CI's 2 cores,
# the fast suite's costliest fixture); `make test` keeps the 2-process job refused on a
# workdir in use (below), a one-process `jax.distributed` job preempted during a save
# (tests/train/test_preemption.py), the launcher's SIGTERM handling with stand-in
# processes (above) and 8 devices against 1 in one process (tests/federated).
_TWO_PROCESS_JOB = pytest.mark.slow


@pytest.fixture(scope="module")
def two_process_job(tmp_path_factory) -> TwoProcessJob:
    """`PREEMPTED_JOB` in 2 processes x 2 devices, SIGTERMed (a preemption: the launcher
    passes it on) after the checkpoint of round 10, then rerun as a requeued job would be;
    and the same rounds in one process with 4 devices. One job serves the tests of the
    preemption, of resuming and of the records, as each costs about a minute of process
    starts; each test asserts what it names."""
    workdir, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    logs = tmp_path_factory.mktemp("logs")
    job = ["--num_processes=2", "--devices_per_process=2", *PREEMPTED_JOB]
    stopped = terminate_after_checkpoint(
        "launch.multihost", "local", f"--log_dir={logs / 'stopped'}", *job,
        workdir=workdir, step=10)
    saved = max(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
    rerun = _run_local_job(logs / "rerun", *job, f"--workdir={workdir}")
    run_binary(*PREEMPTED_JOB, f"--workdir={one}", env=cpu_devices_env(4))
    return TwoProcessJob(workdir, stopped, logs / "stopped", saved, rerun, one)


def test_a_job_on_a_workdir_in_use_exits_2_in_every_process(tmp_path):
    # Process 0 takes the workdir's lock for the job; a second job on it (a requeued job
    # while the first still runs) must stop in all its processes, not leave them waiting.
    workdir, logs = tmp_path / "w", tmp_path / "logs"
    with workdir_locked_by_another_process(workdir):
        result = _run_local_job(
            logs, "--num_processes=2", "--devices_per_process=1", *LOCAL_JOB,
            "--rounds=2", f"--workdir={workdir}", timeout=120)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert f"error: --workdir: {workdir} is in use by another run" in result.stderr, (
        f"process 0 must name the workdir in use: {result.stderr[-2000:]}")
    other = (logs / "process_1.log").read_text()
    assert "error: --workdir: process 0 of this job could not lock it" in other, (
        f"process 1 must stop with process 0's finding: {other[-2000:]}")
    assert not (workdir / "config.json").exists(), "the refused job wrote into the workdir"


def _one_process_job() -> list[str]:
    """The flags of a multi-host job of one process (its own coordinator)."""
    return ["--distributed", f"--coordinator_address=localhost:{multihost.free_port()}",
            "--num_processes=1", "--process_id=0"]


def test_a_refused_job_removes_the_workdir_its_process_zero_created(tmp_path):
    # As a refused single-process run does (`cli.run`): no empty locked folder is left.
    result = run_binary(
        *LOCAL_JOB, "--clients_per_round=200", "--num_clients=100",
        f"--workdir={tmp_path / 'new' / 'run'}", *_one_process_job(), check=False)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert not (tmp_path / "new").exists(), "the refused job left the folders it created"


def test_a_running_job_holds_its_workdir_lock(tmp_path):
    workdir = tmp_path / "w"
    job = subprocess.Popen(
        [sys.executable, "-m", *LOCAL_JOB, "--rounds=100000", f"--workdir={workdir}",
         *_one_process_job()],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (workdir / "config.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before the check"
        # The lock a second run would take first (`Workdir.lock`), taken here: a second
        # binary refused so exits 2 naming it (tests/train/test_cli.py).
        try:
            Workdir(workdir).lock()
            refusal = None
        except ConfigError as error:
            refusal = str(error)
    finally:
        job.kill()
        job.wait()
    assert refusal is not None and "in use by another run" in refusal, (
        f"a --distributed job's process 0 must hold the lock; taking it gave: {refusal}")


@_TWO_PROCESS_JOB
def test_a_sigterm_to_the_launcher_saves_one_round_in_every_process(two_process_job):
    # A preempted job: the launcher passes SIGTERM on; jax's preemption service has the
    # processes agree on a round, which both checkpoint (orbax's save is collective).
    job = two_process_job
    stopped, logs = job.stopped, job.stopped_logs
    assert stopped.returncode == 143, (
        f"exit {stopped.returncode}:\n{stopped.stderr[-3000:]}\n{_process_1_log(logs)}")
    line = f"the checkpoint of round {job.saved} is saved"
    assert line in stopped.stderr, (
        f"process 0 must name round {job.saved}: {stopped.stderr[-2000:]}")
    assert line in (logs / "process_1.log").read_text(), (
        f"process 1 must have saved the same round, {job.saved}:\n{_process_1_log(logs)}")


def _rounds(path):
    return [json.loads(line)["round"] for line in path.read_text().splitlines()]


def _finished(job: TwoProcessJob) -> pathlib.Path:
    """The 2-process job's workdir; fails the test unless its rerun ended well."""
    assert job.rerun.returncode == 0, (
        f"the rerun after the SIGTERM failed (exit {job.rerun.returncode}):\n"
        f"{job.rerun.stderr[-3000:]}")
    return job.workdir


@_TWO_PROCESS_JOB
def test_two_processes_write_each_record_once(two_process_job):
    workdir = _finished(two_process_job)  # across the preemption and the resume
    for name in ("metrics.jsonl", "diagnostics.jsonl"):
        assert _rounds(workdir / name) == list(range(10, 101, 10)), (
            f"{name}: one record per evaluation")


@_TWO_PROCESS_JOB
def test_two_processes_resume_with_the_ledger_of_every_round(two_process_job):
    rerun, saved = two_process_job.rerun, two_process_job.saved
    assert rerun.returncode == 0 and f"resumed from round {saved}" in rerun.stdout, (
        f"the rerun must resume from round {saved} (exit {rerun.returncode}):\n"
        f"{rerun.stdout[-2000:]}\n{rerun.stderr[-2000:]}")
    ledger = json.loads((two_process_job.workdir / "ledger.json").read_text())
    assert ledger["num_releases"] == 100, "each round counted once across the preemption"


@_TWO_PROCESS_JOB
def test_two_processes_match_one_process_on_as_many_devices(two_process_job):
    two = json.loads((_finished(two_process_job) / "summary.json").read_text())
    single = json.loads((two_process_job.one / "summary.json").read_text())
    assert two["epsilon_rdp"] == single["epsilon_rdp"], "the same rounds, the same eps"
    assert two["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4), (
        "the same model up to float rounding (cross-process sums add in another order)")


@_TWO_PROCESS_JOB
def test_every_process_of_a_job_uses_the_secret_seed_process_0_wrote(tmp_path):
    # Every process reaches `Workdir.pin_seed`; process 0 alone writes its draw, which all
    # read back. Each using its own draw, they would noise and sample with other keys.
    job, one = tmp_path / "job", tmp_path / "one"
    result = _run_local_job(tmp_path / "logs", "--num_processes=2", "--devices_per_process=1",
                            *LOCAL_JOB, "--rounds=2", "--secret_seed", f"--workdir={job}")
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    one.mkdir()
    (one / "secret_seed.json").write_bytes((job / "secret_seed.json").read_bytes())
    run_binary(*LOCAL_JOB, "--rounds=2", "--secret_seed", f"--workdir={one}",
               env=cpu_devices_env(2))
    two, single = (json.loads((w / "summary.json").read_text()) for w in (job, one))
    assert two["seed"] == single["seed"] == "secret", "the summaries must not show the seed"
    assert two["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4), (
        "the job must train as one process with the secret seed in secret_seed.json")


# The other binaries with --distributed, tiny (as in their own tests).
OTHER_BINARIES = {
    "datalens": [
        "--dataset=digits", "--num_teachers=12", "--topk=6", "--sigma=30", "--beta=0.3",
        "--z_dim=4", "--pretrain_steps=1", "--batch_size=4", "--real_batch=4",
        "--teacher_features=4", "--generator_hidden=16", "--generator_width=4",
        "--teacher_chunk=2", "--num_synthetic=20", "--steps=4", "--eval_every=2",
        "--checkpoint_every=2", "--noevaluate"],
    "fedgan_debug": [
        "--num_clients=24", "--classifier_epochs=1", "--rounds=2", "--clients_per_round=2",
        "--sampling=fixed", "--noise_multiplier=0.5", "--d_conv_features=4,8",
        "--d_dense_features=16", "--g_dense_features=16", "--g_base_features=8",
        "--g_convt_features=8,4", "--noise_dim=8", "--batch_size=4", "--num_samples=16",
        "--eval_every=1", "--checkpoint_every=1"],
    "fedlm_debug": [
        "--min_lines=200", "--seq_len=16", "--max_seqs=4", "--embed_dim=4", "--hidden=8",
        "--local_steps=1", "--local_batch_size=2", "--rounds=2", "--clients_per_round=2",
        "--sampling=fixed", "--noise_multiplier=0.5", "--num_sample_lines=4",
        "--sample_length=20", "--top_k=3", "--eval_every=1", "--checkpoint_every=1"],
    "dpd_fvae": [
        "--dataset=digits", "--num_clients=8", "--client_fraction=0.5", "--rounds=2",
        "--local_epochs=1", "--batch_size=90", "--latent_dim=2", "--encoder_features=4",
        "--decoder_features=4", "--eval_every=1", "--checkpoint_every=1", "--noevaluate",
        "--dp=local", "--sync=d", "--noise_multiplier=2"],
}


def _comparable(record):
    """A JSON record without what differs between runs of one job on other layouts: the
    environment, timings, and hashes of parameters (equal up to float rounding)."""
    if isinstance(record, dict):
        return {k: _comparable(v) for k, v in record.items()
                if k != "environment" and not k.endswith(("seconds", "sha256"))}
    return record


def _released(workdir):
    """Every file but checkpoints and the lock -> its JSON (`_comparable`), its line count
    (logs, reports) or whether it is non-empty (images)."""
    out = {}
    for path in sorted(workdir.rglob("*")):
        rel = path.relative_to(workdir)
        if not path.is_file() or "checkpoints" in rel.parts or rel.name == ".lock":
            continue
        if path.suffix == ".json":
            out[str(rel)] = _comparable(json.loads(path.read_text()))
        elif path.suffix in (".jsonl", ".md", ".txt"):
            out[str(rel)] = path.read_text().count("\n")
        else:
            out[str(rel)] = path.stat().st_size > 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("binary", sorted(OTHER_BINARIES))
def test_every_multi_host_binary_runs_as_a_two_process_job(binary, tmp_path):
    module, flags = f"experiments.{binary}", OTHER_BINARIES[binary]
    two, one = tmp_path / "two", tmp_path / "one"
    logs = tmp_path / "logs"
    result = _run_local_job(
        logs, "--num_processes=2", "--devices_per_process=2", module, *flags,
        f"--workdir={two}")
    assert result.returncode == 0, (
        f"{binary} in 2 processes:\n{result.stderr[-3000:]}\n{_process_1_log(logs)}")
    env = cpu_devices_env(4)
    run_binary(module, *flags, f"--workdir={one}", env=env)
    two_files, one_files = _released(two), _released(one)
    assert sorted(two_files) == sorted(one_files), "the same files as one process writes"
    for name, value in one_files.items():
        assert two_files[name] == value, f"{name}: 2 processes x 2 devices != 1 x 4"


@pytest.mark.parametrize("binary", ["fedavg_classifier", *sorted(OTHER_BINARIES)])
def test_every_multi_host_binary_takes_the_coordinator_flags(binary, tmp_path):
    # In a new interpreter, as a user starts it: its one line is all it prints, imports
    # included (the binaries' other tests fork theirs from one that has imported them).
    result = run_binary(f"experiments.{binary}", "--process_id=0", f"--workdir={tmp_path}",
                        check=False, fresh_process=True)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --process_id: needs --distributed"), f"{binary}: {result.stderr[-500:]}"
