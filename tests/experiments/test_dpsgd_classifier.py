"""End-to-end tests of experiments/dpsgd_classifier.py (subprocesses, small runs)."""

import json
import pathlib
import shutil

import pytest
from dp_accounting import dp_event, rdp

from dpfed.train.workdir import Workdir
from tests.binary import (
    assert_kill_resumes_like_uninterrupted,
    assert_preemption_resumes_like_uninterrupted,
    assert_resumed_like_uninterrupted,
    finished_run,
    kill_when_written,
    run_binary,
)


def _run(*args, check=True, **kw):
    return run_binary("experiments.dpsgd_classifier", *args, check=check, **kw)


def _json(workdir, name):
    return json.loads((pathlib.Path(workdir) / name).read_text())


def test_ledger_eps_equals_dp_accounting(tmp_path):
    _run(
        "--dataset=mnist5k",
        "--model=logreg",
        "--steps=50",
        "--batch_size=64",
        "--noise_multiplier=1.1",
        "--l2_clip=1.0",
        f"--workdir={tmp_path}",
    )
    ledger = _json(tmp_path, "ledger.json")
    acct = rdp.RdpAccountant()
    acct.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(64 / 4000, dp_event.GaussianDpEvent(1.1)), 50
        )
    )
    expected = acct.get_epsilon(ledger["delta"])
    assert ledger["epsilon_rdp"] == pytest.approx(expected, rel=1e-6)
    assert ledger["unit"] == "example" and ledger["delta"] == 1e-5
    for name in ("ledger.json", "metrics.jsonl", "summary.json", "report.md"):
        assert (tmp_path / name).exists(), f"workdir contract: {name} missing"
    summary = _json(tmp_path, "summary.json")
    for key in (
        "test_accuracy",
        "epsilon_rdp",
        "epsilon_pld",
        "delta",
        "steps",
        "params_sha256",
        "wall_seconds",
        "flags",
        "diverged",
    ):
        assert key in summary, f"summary.json must have {key}"


def test_target_epsilon_is_met_from_below(tmp_path):
    _run(
        "--model=logreg",
        "--steps=40",
        "--batch_size=128",
        "--target_epsilon=1.0",
        f"--workdir={tmp_path}",
    )
    eps = _json(tmp_path, "ledger.json")["epsilon_rdp"]
    assert 0.9 <= eps <= 1.0, f"final eps {eps} must be in [0.9, 1.0] for target 1.0"


@pytest.mark.parametrize(
    "flag,name",
    [
        ("--l2_clip=-1", "l2_clip"),
        ("--delta=2", "delta"),
        ("--dataset=nope", "dataset"),
        ("--noise_multiplier=-0.5", "noise_multiplier"),
        ("--noise_multiplier=0", "noise_multiplier"),  # ran a private run with eps inf
        ("--target_epsilon=1e-9", "target_epsilon"),
        ("--seed=99999999999999999999", "seed"),  # overflowed jax.random.key: a traceback
    ],
)
def test_bad_flag_exits_2_with_one_line(tmp_path, flag, name):
    # One case in a new interpreter, as a user starts it: the one line is all it prints,
    # imports included (the others fork from a process that has imported the libraries).
    proc = _run("--model=logreg", "--steps=2", flag, f"--workdir={tmp_path}", check=False,
                fresh_process=name == "delta")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"{flag}: exit code {proc.returncode}, stderr {proc.stderr[-500:]}"
    assert len(lines) == 1 and name in lines[0], f"{flag}: want one line naming {name}: {lines}"


@pytest.mark.parametrize("flag", ["--clipping=fast", "--l2_clip=2", "--delta=1e-6"])
def test_a_flag_the_mode_ignores_exits_2_naming_it(tmp_path, flag):
    # Each did nothing in a --nodp run (cli.refuse_unused, dpsgd.unused_flags).
    proc = _run("--nodp", flag, "--model=logreg", "--steps=2", f"--workdir={tmp_path}",
                check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    name = flag.split("=")[0]
    assert proc.returncode == 2, f"exit code {proc.returncode}, stderr {proc.stderr[-500:]}"
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}") and "--nodp" in lines[0], (
        f"want one line naming {name} and --nodp: {lines}")


def test_a_target_one_step_already_exceeds_exits_2_before_training(tmp_path):
    # Before, the budget guard stopped "after step 0": exit 0 and the untrained model
    # released with eps 0 (found by a CLI audit).
    proc = _run("--model=logreg", "--steps=2", "--batch_size=16", "--noise_multiplier=0.3",
                "--target_epsilon=0.1", f"--workdir={tmp_path}", check=False)
    assert proc.returncode == 2 and "--target_epsilon: cannot be met" in proc.stderr, (
        f"exit {proc.returncode}: {proc.stderr[-500:]}")
    assert not (tmp_path / "summary.json").exists(), "nothing may be released"


def test_offline_tfds_dataset_exits_2_naming_embedded_alternative(tmp_path):
    proc = _run(
        "--dataset=mnist",
        f"--data_dir={tmp_path / 'tfds'}",
        "--steps=1",
        f"--workdir={tmp_path / 'w'}",
        check=False,
    )
    assert proc.returncode == 2 and "mnist5k" in proc.stderr, proc.stderr[-500:]


# One uninterrupted run for the SIGKILL and the SIGTERM test.
_INTERRUPTED = ("--model=logreg", "--steps=400", "--batch_size=64", "--noise_multiplier=1.0",
                "--checkpoint_every=25", "--eval_every=50")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return finished_run(tmp_path_factory, "experiments.dpsgd_classifier", *_INTERRUPTED)


# slow, with the SIGTERM test below (~21 s for both with their shared 400-step run, stop 64):
# the fast suite keeps test_crash_writes' SIGKILLs of this binary's default DP mode (inside
# checkpoint 2's rename, the final ledger.json), DataLens's binary SIGTERM test and the
# library's preemption tests (tests/train/test_preemption.py).
@pytest.mark.slow
def test_sigkill_and_resume_gives_same_params_and_ledger(uninterrupted, tmp_path):
    assert_kill_resumes_like_uninterrupted(
        "experiments.dpsgd_classifier", *_INTERRUPTED, whole=uninterrupted,
        killed=tmp_path / "killed", step=50)


@pytest.mark.slow  # see the SIGKILL test above
def test_sigterm_checkpoints_its_step_exits_143_and_the_rerun_resumes_there(
        uninterrupted, tmp_path):
    # A preempted job gets SIGTERM, then SIGKILL a grace period later: the run saves the
    # step it is at rather than leave the rerun to redo the steps since its last checkpoint.
    assert_preemption_resumes_like_uninterrupted(
        "experiments.dpsgd_classifier", *_INTERRUPTED, whole=uninterrupted,
        stopped=tmp_path / "stopped", step=25)


_CALIBRATED = ("--model=logreg", "--steps=30", "--batch_size=64", "--target_epsilon=2",
               "--checkpoint_every=5", "--eval_every=10")


@pytest.fixture(scope="module")
def calibrated_whole(tmp_path_factory):
    return finished_run(tmp_path_factory, "experiments.dpsgd_classifier", *_CALIBRATED)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [
    "config.json",  # startup, before the first step
    "metrics.jsonl",  # a release logged past the last checkpoint
    "checkpoints/*orbax-checkpoint-tmp*",  # a checkpoint half written
    "ledger.json",  # the final releases half written: summary, report
    "summary.json",  # then a rerun of a finished (target eps) run
])
def test_killed_at_any_write_resumes_like_uninterrupted(tmp_path, calibrated_whole, pattern):
    # The SIGKILL test above kills after a complete checkpoint; a random-time fuzz
    # (136 kills of 3 binaries, 2026-12-01) found no fault; these are its kill points.
    kill_when_written("experiments.dpsgd_classifier", *_CALIBRATED, workdir=tmp_path,
                      pattern=pattern)
    _run(*_CALIBRATED, f"--workdir={tmp_path}")
    assert_resumed_like_uninterrupted(calibrated_whole, tmp_path)


# --secret_seed: a 64-bit seed in secret_seed.json, "secret" everywhere else.
_SECRET = ("--model=logreg", "--steps=20", "--batch_size=64", "--noise_multiplier=1.0",
           "--checkpoint_every=5", "--eval_every=10", "--secret_seed")
# What a rerun of a finished run rewrites with its own wall time.
_WALL_KEYS = ("wall_seconds", "wall_seconds_earlier")


@pytest.fixture(scope="module")
def secret_whole(tmp_path_factory):
    return finished_run(tmp_path_factory, "experiments.dpsgd_classifier", *_SECRET)


def _secret(workdir):
    return _json(workdir, "secret_seed.json")["seed"]


def _released(workdir):
    """The released files' contents, but for the wall time a rerun measures anew."""
    summary = {k: v for k, v in _json(workdir, "summary.json").items() if k not in _WALL_KEYS}
    report = [line for line in (workdir / "report.md").read_text().splitlines()
              if not line.startswith("- wall time")]
    return {"summary.json": summary, "report.md": report,
            **{name: (workdir / name).read_text() for name in ("metrics.jsonl", "ledger.json")}}


def test_a_secret_seed_is_in_no_file_but_secret_seed_json(secret_whole):
    seed = _secret(secret_whole)
    assert 2**32 <= seed < 2**64, f"a secret seed has 64 bits, none guessable: {seed}"
    leaking = [str(path.relative_to(secret_whole)) for path in secret_whole.rglob("*")
               if path.is_file() and path.name != "secret_seed.json"
               and str(seed).encode() in path.read_bytes()]
    assert not leaking, f"the secret seed's digits are in {leaking}: anyone can undo the noise"
    assert _json(secret_whole, "summary.json")["seed"] == "secret"
    assert _json(secret_whole, "config.json")["seed"] == "secret"
    assert "seed secret" in (secret_whole / "report.md").read_text()


def test_a_rerun_of_a_finished_secret_run_reproduces_its_releases(secret_whole, tmp_path):
    rerun = tmp_path / "rerun"
    shutil.copytree(secret_whole, rerun)
    _run(*_SECRET, f"--workdir={rerun}")
    assert _secret(rerun) == _secret(secret_whole), "a rerun must never draw another seed"
    assert _released(rerun) == _released(secret_whole), (
        "a rerun of a finished secret run must leave its releases as they were")
    refused = _run(*_SECRET[:-1], f"--workdir={rerun}", check=False)
    assert refused.returncode == 2 and "--secret_seed" in refused.stderr, (
        f"a rerun without --secret_seed would draw other noise: {refused.stderr[-500:]}")


def test_a_rerun_with_another_runs_secret_seed_json_is_refused(secret_whole, tmp_path):
    # A secret_seed.json copied from another workdir: its seed would continue this run
    # with that run's noise. config.json pins the nonce of the run's own file.
    rerun, other = tmp_path / "rerun", tmp_path / "other"
    shutil.copytree(secret_whole, rerun)
    Workdir(other).pin_seed(0, secret=True)  # another run's file: its own seed and nonce
    (rerun / "secret_seed.json").write_bytes((other / "secret_seed.json").read_bytes())
    refused = _run(*_SECRET, f"--workdir={rerun}", check=False)
    assert refused.returncode == 2 and "--secret_seed" in refused.stderr, refused.stderr[-500:]
    assert "another run's" in refused.stderr, refused.stderr[-500:]
    assert _released(rerun) == _released(secret_whole), "a refused rerun must change nothing"


def test_a_killed_secret_run_resumes_with_its_seed(secret_whole, tmp_path):
    # The kill comes after a release; the rerun must read the seed back (a new one would
    # replay that release with other noise) and end as the uninterrupted run of that seed.
    tmp_path.joinpath("secret_seed.json").write_bytes(
        (secret_whole / "secret_seed.json").read_bytes())
    kill_when_written("experiments.dpsgd_classifier", *_SECRET, workdir=tmp_path,
                      pattern="metrics.jsonl")
    _run(*_SECRET, f"--workdir={tmp_path}")
    assert_resumed_like_uninterrupted(secret_whole, tmp_path)
