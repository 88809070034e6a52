"""experiments/fedavg_classifier.py and dpfed.federated.classifier: ledger, resume, flags."""

import dataclasses
import json

import numpy as np
import pytest
from dp_accounting import dp_event, rdp

from dpfed import data, privacy
from dpfed.federated import classifier
from dpfed.train.config import ConfigError
from dpfed.train.resume import Spent
from tests.binary import assert_kill_resumes_like_uninterrupted, run_binary

FAST = {"model": "logreg", "local_steps": 2, "local_batch_size": 10, "eval_every": 100}


@pytest.fixture(scope="module")
def acceptance_run(tmp_path_factory):
    """The acceptance configuration (logreg instead of the CNN: eps does not depend on it)."""
    workdir = tmp_path_factory.mktemp("fedavg")
    config = classifier.FedAvgClassifierConfig(
        dataset="mnist5k", num_clients=100, clients_per_round=10, rounds=20,
        noise_multiplier=1.0, l2_clip=0.5, **FAST)
    summary = classifier.train(config, str(workdir), log=lambda _: None)
    return workdir, summary


def test_ledger_is_user_level_with_the_rdp_eps_of_twenty_sampled_gaussians(acceptance_run):
    workdir, _ = acceptance_run
    ledger = json.loads((workdir / "ledger.json").read_text())
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 20)
    expected = accountant.get_epsilon(ledger["delta"])
    assert ledger["unit"] == "user", "DP-FedAvg protects users"
    assert ledger["epsilon_rdp"] == pytest.approx(expected, rel=1e-6), "eps of 20 x PS(0.1, G(1))"


def test_summary_reports_eps_for_larger_populations_below_ours(acceptance_run):
    _, summary = acceptance_run
    others = summary["epsilon_same_noise_if_users"]
    assert set(others) == {"3400", "1000000"}, f"the two extra populations: {others}"
    for name in ("rdp", "pld"):
        assert others["1000000"][name] < others["3400"][name] < summary[f"epsilon_{name}"], (
            f"the same noise over more users (smaller q) gives a smaller {name} eps")
    assert summary["steps"] == summary["rounds"] == 20, "steps counts rounds"


def test_per_client_accuracies_are_diagnostics_not_releases(acceptance_run):
    workdir, summary = acceptance_run
    last = json.loads((workdir / "diagnostics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= last["train_client_accuracy_mean"] <= 1.0, (
        f"each client's accuracy on its own data belongs in diagnostics.jsonl: {last}")
    released = (workdir / "metrics.jsonl").read_text() + json.dumps(summary)
    for name in ("train_client", "cohort_size", "update_norm_mean", "client_loss"):
        assert name not in released, f"{name} (raw client data) leaked into the release files"
    report = (workdir / "report.md").read_text()
    assert "train_client" not in report and "diagnostics.jsonl" in report, (
        "the report should point to diagnostics.jsonl, not show raw-data figures")


@pytest.mark.slow  # ~1 min; the loop-level resume test in tests/federated is fast
def test_sigkill_and_resume_gives_same_params_ledger_and_metrics(tmp_path):
    args = [
        "--model=logreg", "--local_steps=2", "--local_batch_size=10", "--num_clients=40",
        "--clients_per_round=8", "--rounds=60", "--noise_multiplier=1.0",
        "--checkpoint_every=2", "--eval_every=10",
    ]
    run_binary("experiments.fedavg_classifier", *args, f"--workdir={tmp_path / 'whole'}")
    assert_kill_resumes_like_uninterrupted(
        "experiments.fedavg_classifier", *args, whole=tmp_path / "whole",
        killed=tmp_path / "killed", step=6, step_key="round")


def test_non_private_run_has_no_ledger_and_no_eps(tmp_path):
    # Through the binary: its default --noise_multiplier made every --nodp run exit 2
    # (found by an audit rerunning WORKSPACE.md's commands).
    result = run_binary(
        "experiments.fedavg_classifier", "--nodp", "--num_clients=20", "--clients_per_round=5",
        "--rounds=2", *(f"--{k}={v}" for k, v in FAST.items()), f"--workdir={tmp_path}",
        check=False)
    assert result.returncode == 0, f"a plain --nodp run must work:\n{result.stderr[-2000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epsilon_rdp"] is None and not (tmp_path / "ledger.json").exists(), (
        "a non-private run must not claim a guarantee")


def test_target_epsilon_calibrates_a_noise_multiplier_that_meets_it():
    config = classifier.FedAvgClassifierConfig(
        num_clients=100, clients_per_round=10, rounds=20, target_epsilon=5.0)
    z = classifier.resolve_noise_multiplier(config)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z)), 20)
    assert 4.9 < accountant.get_epsilon(config.delta) <= 5.0, "eps at the calibrated z ~ target"


def test_resumed_calibration_ends_at_the_new_target():
    config = classifier.FedAvgClassifierConfig(
        num_clients=100, clients_per_round=10, rounds=20, target_epsilon=5.0)
    z_first = classifier.resolve_noise_multiplier(config)
    step = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z_first))
    spent = privacy.PrivacyLedger("user", "add_or_remove_one", config.delta)
    spent.record(step, 10)  # a checkpoint of round 10
    longer = dataclasses.replace(config, rounds=30, target_epsilon=6.0)
    z = classifier.resolve_noise_multiplier(longer, Spent(10, spent))
    spent.record(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z)), 20)
    assert 0.99 * 6.0 <= spent.epsilon() <= 6.0, (
        f"10 rounds at z {z_first:.4f} then 20 at z {z:.4f} spend eps {spent.epsilon():.4f}: "
        "the remaining rounds must be calibrated against the checkpoint's spend")


def test_more_clients_per_round_than_clients_names_the_flag():
    with pytest.raises(ConfigError) as error:
        classifier.FedAvgClassifierConfig(num_clients=10, clients_per_round=11, noise_multiplier=1)
    assert error.value.field == "clients_per_round", "the error names the flag"


def test_infeasible_adaptive_noise_split_names_the_flag():
    config = classifier.FedAvgClassifierConfig(
        clients_per_round=10, noise_multiplier=1.0, adaptive_clipping=True)  # 2 sb = 1 = z
    with pytest.raises(ConfigError) as error:
        classifier.engine_config(config, 1.0)
    assert error.value.field == "clipped_count_stddev", "the error names the flag to raise"


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),  # a ledger with no noise: no privacy
        ({"nodp": True, "adaptive_clipping": True}, "adaptive_clipping"),  # no clip to adapt
        ({"nodp": True, "noise_multiplier": 1.0}, "noise_multiplier"),  # no noise is added
        ({"nodp": True, "target_epsilon": 1.0}, "target_epsilon"),  # no budget is kept
    ],
)
def test_private_settings_that_cannot_work_name_the_flag(settings, name):
    with pytest.raises(ConfigError) as error:
        classifier.FedAvgClassifierConfig(**settings)
    assert error.value.field == name, f"{settings} must be a flag error naming --{name}"


def test_a_count_noise_without_adaptive_clipping_is_refused():
    # It was silently ignored: no clipped count is released without adaptive clipping.
    with pytest.raises(ConfigError) as error:
        classifier.FedAvgClassifierConfig(noise_multiplier=1.0, clipped_count_stddev=2.0)
    assert error.value.field == "clipped_count_stddev", f"must name the flag: {error.value}"
    classifier.FedAvgClassifierConfig(  # Must not raise: adaptive clipping noises the count.
        noise_multiplier=1.0, clipped_count_stddev=2.0, adaptive_clipping=True)


@pytest.mark.parametrize(
    "settings, ignored, applied",
    [
        ({"partition": "iid"}, "dirichlet_alpha", {"partition": "dirichlet"}),
        ({"partition": "natural"}, "dirichlet_alpha", {"partition": "dirichlet_mix"}),
        ({}, "target_quantile", {"adaptive_clipping": True}),
        ({}, "clip_learning_rate", {"adaptive_clipping": True}),
        ({"model": "mlp"}, "conv", {"model": "cnn"}),
        ({"model": "logreg"}, "conv", {"model": "cnn"}),
    ],
)
def test_unused_flags_are_those_the_mode_ignores(settings, ignored, applied):
    # The table the binary refuses given flags by (cli.refuse_unused): each was ignored.
    def table(**fields):
        return classifier.unused_flags(
            classifier.FedAvgClassifierConfig(noise_multiplier=1.0, **fields))

    assert table(**settings)[ignored][0], f"--{ignored} has no effect with {settings}"
    assert not table(**applied)[ignored][0], f"--{ignored} takes effect with {applied}"


@pytest.mark.parametrize("flag", ["l2_clip", "delta"])
def test_privacy_flags_are_unused_with_nodp(flag):
    # A --nodp run clips, noises and accounts nothing (the engine gets no clip, no ledger is
    # kept): a given --l2_clip or --delta was silently ignored.
    nodp = classifier.unused_flags(classifier.FedAvgClassifierConfig(nodp=True))
    private = classifier.unused_flags(classifier.FedAvgClassifierConfig(noise_multiplier=1.0))
    assert nodp[flag][0], f"--{flag} has no effect with --nodp: {nodp}"
    assert not private[flag][0], f"--{flag} takes effect in a private run: {private}"


def test_a_privacy_flag_with_nodp_exits_2_naming_it(tmp_path):
    # Small enough that a run which trained instead of refusing ends in seconds.
    result = run_binary(
        "experiments.fedavg_classifier", "--nodp", "--delta=1e-6", "--num_clients=20",
        "--clients_per_round=5", "--rounds=1", *(f"--{k}={v}" for k, v in FAST.items()),
        f"--workdir={tmp_path / 'w'}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: --delta") and "--nodp" in lines[0], (
        f"one line naming --delta and --nodp: {lines}")


def test_a_flag_the_mode_ignores_exits_2_naming_it(tmp_path):
    result = run_binary("experiments.fedavg_classifier", "--partition=iid",
                        "--dirichlet_alpha=0.1", f"--workdir={tmp_path / 'w'}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: --dirichlet_alpha") and (
        "--partition=iid" in lines[0]), f"one line naming the flag and the mode: {lines}"
    assert not (tmp_path / "w").exists(), "the refused run must leave no workdir behind"


@pytest.mark.parametrize("flag, name", [("--l2_clip=-1", "l2_clip"), ("--delta=1.5", "delta")])
def test_bad_flag_exits_2_with_one_line(tmp_path, flag, name):
    result = run_binary(
        "experiments.fedavg_classifier", flag, f"--workdir={tmp_path}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"bad flags exit with 2, got {result.returncode}"
    assert len(lines) == 1 and f"--{name}" in lines[0], f"one line naming --{name}: {lines}"


@pytest.mark.parametrize("flags, name, says", [
    (["--process_id=0"], "process_id", "needs --distributed"),
    (["--distributed", "--coordinator_address=localhost:1"], "num_processes",
     "needed with --coordinator_address"),
    (["--distributed", "--coordinator_address=localhost:1", "--num_processes=2",
      "--process_id=2"], "process_id", "must be < --num_processes=2"),
])
def test_coordinator_flags_come_all_three_with_distributed(tmp_path, flags, name, says):
    result = run_binary(
        "experiments.fedavg_classifier", *flags, f"--workdir={tmp_path}", check=False)
    assert result.returncode == 2, f"{flags}: a flag error, got {result.returncode}"
    assert result.stderr.strip() == f"error: --{name}: {says}", result.stderr[-1000:]


@pytest.mark.parametrize("partition", ["dirichlet", "dirichlet_mix"])
def test_dirichlet_partition_gives_every_example_to_one_client(partition):
    config = classifier.FedAvgClassifierConfig(
        num_clients=50, partition=partition, dirichlet_alpha=0.3, noise_multiplier=1.0)
    train = data.load("mnist5k", "train")
    clients = classifier.federate(config, train)
    assert clients.num_clients == 50 and int(clients.counts.sum()) == train.num_examples, (
        "50 clients holding all training examples between them")


def test_a_dirichlet_split_with_empty_clients_points_to_dirichlet_mix():
    train = data.load("digits", "train")
    config = classifier.FedAvgClassifierConfig(
        dataset="digits", num_clients=400, partition="dirichlet", dirichlet_alpha=0.1,
        clients_per_round=10, noise_multiplier=1.0)
    with pytest.raises(ConfigError) as error:
        classifier.federate(config, train)
    assert error.value.field == "num_clients" and "--partition=dirichlet_mix" in str(error.value), (
        f"no per-class draw leaves 400 clients non-empty; name the way out: {error.value}")
    mix = classifier.federate(dataclasses.replace(config, partition="dirichlet_mix"), train)
    assert int(mix.counts.min()) >= train.num_examples // 400, "dirichlet_mix: equal shares"


def _with_users(users):
    digits = data.load("digits", "train")
    n = len(users)
    return data.ImageDataset(digits.images[:n], digits.labels[:n], 10, "digits",
                             user_ids=np.asarray(users, np.int32))


def test_a_natural_partition_gives_each_user_one_client_of_their_own_images():
    # User-level DP means one client per person: CelebA's identities, not an IID slice.
    users = [7, 3, 7, 9, 3, 7, 9, 9, 9]
    train = _with_users(users)
    config = classifier.FedAvgClassifierConfig(
        dataset="digits", num_clients=3, partition="natural", clients_per_round=2,
        noise_multiplier=1.0)
    clients = classifier.federate(config, train)
    assert clients.counts.tolist() == [2, 3, 4], f"users 3, 7, 9 hold 2, 3, 4: {clients.counts}"
    images = clients.arrays[0]
    for client, user in enumerate([3, 7, 9]):
        own = train.images[np.asarray(users) == user]
        np.testing.assert_array_equal(images[client, :len(own)], own,
                                      err_msg=f"client {client} must hold user {user}'s images")


@pytest.mark.parametrize("users,num_clients,field", [
    (None, 3, "partition"),  # the dataset has no users
    ([1, 1, 2, 2], 3, "num_clients"),  # 2 users, 3 clients asked for
])
def test_a_natural_partition_needs_users_and_their_number(users, num_clients, field):
    train = data.load("digits", "train") if users is None else _with_users(users)
    config = classifier.FedAvgClassifierConfig(
        dataset="digits", num_clients=num_clients, partition="natural", clients_per_round=2,
        noise_multiplier=1.0)
    with pytest.raises(ConfigError) as error:
        classifier.federate(config, train)
    assert error.value.field == field, f"the error must name --{field}: {error.value}"


def test_unknown_conv_names_the_flag():
    with pytest.raises(ConfigError) as error:
        classifier.FedAvgClassifierConfig(conv="winograd", nodp=True)
    assert error.value.field == "conv", "the error names --conv"


def test_conv_choice_reaches_the_cnn_only():
    cnn = classifier.make_model(classifier.FedAvgClassifierConfig(conv="xla", nodp=True), 10)
    mlp = classifier.make_model(
        classifier.FedAvgClassifierConfig(model="mlp", conv="xla", nodp=True), 10)
    assert cnn.conv == "xla", "--conv is not passed to the CNN"
    assert not hasattr(mlp, "conv"), "the MLP has no convolutions to choose"


def test_a_changed_sampling_over_a_calibrated_checkpoint_is_refused_naming_it(tmp_path):
    # As in DP-SGD: calibrating the rest against the checkpoint's ledger under the new
    # sampling's relation raised the accountant's ValueError before the config check.
    config = classifier.FedAvgClassifierConfig(
        dataset="digits", num_clients=20, clients_per_round=5, rounds=1, target_epsilon=5.0,
        sampling="fixed", checkpoint_every=1, **FAST)
    classifier.train(config, str(tmp_path), log=lambda _: None)
    with pytest.raises(ConfigError) as error:
        classifier.train(dataclasses.replace(config, rounds=2, sampling="poisson"),
                         str(tmp_path), log=lambda _: None)
    assert error.value.field == "sampling", f"must name --sampling: {error.value}"


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_a_bad_seed_exits_2_naming_the_seed(tmp_path, seed):
    # -1 was blamed on --num_clients (numpy's partition refuses it); 1e20 overflowed
    # jax.random.key with a traceback.
    result = run_binary("experiments.fedavg_classifier", "--dataset=digits", "--model=logreg",
                        "--num_clients=20", "--clients_per_round=5", "--rounds=1",
                        f"--seed={seed}", f"--workdir={tmp_path}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--seed" in lines[0], (
        f"exit {result.returncode}: {result.stderr[-800:]}")
