"""End-to-end tests of experiments/dpd_fvae.py (subprocesses, tiny runs on 8x8 digits).

Where a test's subject is a workdir rather than the command line (a resume), the binary's
`dpd_fvae.train` runs in this process instead, on the tests' 8 CPU devices as the binary
would: a subprocess costs seconds of imports (the workdir's config.json refuses a config
that differs from the binary's flags).
"""

import json

import pytest

from dpfed.generative import dpd_fvae
from tests.binary import (
    assert_kill_resumes_like_uninterrupted,
    cpu_devices_env,
    run_binary,
)

TINY = [
    "--dataset=digits",
    "--num_clients=8",
    "--client_fraction=0.5",
    "--rounds=2",
    "--local_epochs=1",
    "--batch_size=90",
    "--latent_dim=2",
    "--encoder_features=4",
    "--decoder_features=4",
    "--eval_every=1",
    "--checkpoint_every=1",
    "--noevaluate",
]


# The binary's config for TINY (the same values as its flags).
_TINY_CONFIG = dict(
    dataset="digits", num_clients=8, client_fraction=0.5, rounds=2, local_epochs=1,
    batch_size=90, latent_dim=2, encoder_features=(4,), decoder_features=(4,), eval_every=1,
    checkpoint_every=1)


def _run(*args, check=True):
    return run_binary("experiments.dpd_fvae", *args, check=check)


def _train(workdir, **changes) -> dict:
    """`dpd_fvae.train` in this process (all 8 devices), as the binary runs it with TINY."""
    config = dpd_fvae.DpdFvaeConfig(**{**_TINY_CONFIG, **changes})
    return dpd_fvae.train(config, str(workdir), log=lambda _: None)


def test_local_dp_run_writes_the_workdir_contract_and_resumes(tmp_path):
    flags = [*TINY, "--dp=local", "--sync=d", "--noise_multiplier=2", "--target_epsilon=30",
             f"--workdir={tmp_path}"]
    proc = _run(*flags)
    assert "eps" in proc.stdout and "report.md" in proc.stdout, proc.stdout
    for name in ("ledger.json", "metrics.jsonl", "summary.json", "report.md", "samples.png",
                 "decoder.msgpack", "checkpoints"):
        assert (tmp_path / name).exists(), f"workdir contract: {name} missing"
    summary = json.loads((tmp_path / "summary.json").read_text())
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert summary["method"] == "dpd_fvae" and summary["rounds"] == 2, summary
    assert summary["unit"] == ledger["unit"] == "example", "local DP is per example"
    assert summary["epsilon_rdp"] == ledger["epsilon_rdp"] <= 30
    diagnostics = json.loads((tmp_path / "diagnostics.jsonl").read_text().splitlines()[-1])
    assert "client_loss" in diagnostics, f"client losses are diagnostics: {diagnostics}"
    released = (tmp_path / "metrics.jsonl").read_text() + json.dumps(summary)
    assert "client_loss" not in released and "cohort_size" not in released, (
        "client losses and cohort sizes (raw client data) leaked into the release files")
    meta = ledger["metadata"]
    assert ledger["epsilon_rdp"] == meta["epsilon_rdp_client_max"], (
        "the ledger must state the worst client's eps")
    assert meta["worst_client_participations"] == summary["participations_max"] > 0
    again = json.loads(json.dumps(summary))
    # A finished run resumes from its last checkpoint and changes nothing.
    _train(tmp_path, dp="local", sync="d", noise_multiplier=2.0, target_epsilon=30.0)
    resumed = json.loads((tmp_path / "summary.json").read_text())
    for key in ("decoder_sha256", "epsilon_rdp", "participations_max"):
        assert resumed[key] == again[key], f"resuming changed {key}"


@pytest.mark.slow  # ~1 min
def test_sigkill_and_resume_gives_same_decoder_ledger_and_metrics(tmp_path):
    # Local DP: per-client participation budgets and per-client state persist across rounds.
    args = [*TINY, "--dp=local", "--sync=d", "--noise_multiplier=2", "--rounds=40",
            "--checkpoint_every=2", "--eval_every=10"]
    _run(*args, f"--workdir={tmp_path / 'whole'}")
    assert_kill_resumes_like_uninterrupted(
        "experiments.dpd_fvae", *args, whole=tmp_path / "whole", killed=tmp_path / "killed",
        step=6, step_key="round", params_key="decoder_sha256")


def test_a_run_resumes_on_another_device_count(tmp_path):
    flags = [*TINY, "--dp=central", "--sync=d", "--noise_multiplier=2", f"--workdir={tmp_path}"]
    _train(tmp_path, dp="central", sync="d", noise_multiplier=2.0, rounds=1)  # 8 devices
    three = cpu_devices_env(3)
    run_binary("experiments.dpd_fvae", *flags, env=three)  # round 2 on 3 devices
    summary = json.loads((tmp_path / "summary.json").read_text())
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert summary["environment"]["device_count"] == 3 and summary["rounds"] == 2, summary
    assert ledger["num_releases"] == 2, "one round before the move and one after, each once"


@pytest.mark.parametrize(
    "flag,name",
    [
        ("--l2_clip=-1", "l2_clip"),
        ("--delta=2", "delta"),
        ("--decoder_features=4,4,4,4", "decoder_features"),
        ("--target_epsilon=1e-6", "target_epsilon"),
        ("--noise_multiplier=0", "noise_multiplier"),  # central z 0: no noise (was a traceback)
        ("--num_synthetic=100", "num_synthetic"),  # TINY's --noevaluate ignored it
        ("--audit_canaries=19", "audit_canaries"),  # fewer than audit.MIN_CANARIES
    ],
)
def test_bad_flag_exits_2_with_one_line(tmp_path, flag, name):
    proc = _run(*TINY, "--dp=central", flag, f"--workdir={tmp_path}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"{flag}: exit code {proc.returncode}, stderr {proc.stderr[-500:]}"
    assert len(lines) == 1 and name in lines[0], f"{flag}: want one line naming {name}: {lines}"


@pytest.mark.parametrize("flag", ["--l2_clip=2", "--delta=1e-6"])
def test_a_privacy_flag_with_dp_none_exits_2_naming_it(tmp_path, flag):
    # --dp=none clips, noises and accounts nothing (dpd_fvae.unused_flags).
    proc = _run(*TINY, "--dp=none", flag, f"--workdir={tmp_path}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    name = flag.split("=")[0]
    assert proc.returncode == 2, f"{flag}: exit code {proc.returncode}, stderr {proc.stderr[-500:]}"
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}") and "--dp=none" in lines[0], (
        f"want one line naming {name} and --dp=none: {lines}")


@pytest.mark.parametrize("flags", [
    ["--noise_multiplier=0.5", "--target_epsilon=0.01"],  # one participation costs eps ~14
    ["--target_epsilon=1e-6"],  # no noise multiplier reaches it
])
def test_an_unaffordable_local_target_exits_2_before_anything_is_written(tmp_path, flags):
    workdir = tmp_path / "w"
    proc = _run(*TINY, "--dp=local", *flags, f"--workdir={workdir}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--target_epsilon" in lines[0], (
        f"{flags}: want exit 2 and one line naming --target_epsilon: {proc.returncode}, {lines}")
    assert not workdir.exists(), (
        f"{flags}: refused before any training, nothing may be written: "
        f"{sorted(p.name for p in workdir.iterdir())}")


@pytest.mark.parametrize("dp", ["local", "none"])
def test_an_audit_outside_central_dp_exits_2_naming_it(tmp_path, dp):
    # Local DP noises each client's steps (unit one example) and --dp=none noises nothing:
    # no canary user can enter a noised sum of clipped user updates at the server.
    noise = ["--noise_multiplier=2"] if dp == "local" else []
    proc = _run(*TINY, f"--dp={dp}", *noise, "--audit_canaries=20", f"--workdir={tmp_path}",
                check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (
        f"--dp={dp}: exit code {proc.returncode}, stderr {proc.stderr[-500:]}")
    assert lines[0].startswith("error: --audit_canaries") and "--dp=central" in lines[0], (
        f"want one line naming --audit_canaries and --dp=central: {lines}")


# slow: ~18 s; the fast suite keeps test_dpd_fvae's (library) audit of one all-sampled round
# and DataLens's binary audit test, whose rerun and resume keep the figures as here
@pytest.mark.slow
def test_an_audit_run_writes_its_canary_figures_and_a_resume_or_rerun_keeps_them(tmp_path):
    audited = dict(dp="central", sync="d", noise_multiplier=2.0, audit_canaries=20)
    summary = _train(tmp_path / "whole", **audited)
    written = json.loads((tmp_path / "whole" / "audit.json").read_text())
    assert written == summary["audit"], "audit.json is not the summary's audit"
    assert written["inserted"] + written["held_out"] == 40, f"2 x 20 candidates: {written}"
    assert written["ledger_epsilon_rdp"] == summary["epsilon_rdp"], "audit.json's ledger eps"
    assert 0 <= written["epsilon_lower_bound"] <= summary["epsilon_rdp"], (
        f"the audit proves more eps than the ledger records: {written}")
    assert "canary audit" in (tmp_path / "whole" / "report.md").read_text(), (
        "report.md omits the audit")
    again = _train(tmp_path / "whole", **audited)  # a finished run
    assert again["audit"] == written, "rerunning a finished audit run changed its figures"
    _train(tmp_path / "resumed", **audited, rounds=1)  # stopped after round 1, then resumed
    resumed = _train(tmp_path / "resumed", **audited)
    assert resumed["audit"] == written, (
        "a resumed audit run must score the uninterrupted run's canaries (drawn from the seed)")
