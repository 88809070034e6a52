"""dpfed.federated.classifier: the client objective, the per-client accuracy and the
training data pinned on resume."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed import data, models
from dpfed.federated import classifier
from dpfed.train.config import ConfigError
from tests import other_data


@pytest.fixture(scope="module")
def padded():
    """A logreg, its params, and 3 real digits followed by 2 zero padding rows."""
    model = models.get_classifier("logreg", 10)
    train = data.load("digits", "train")
    images = np.concatenate([train.images[:3], np.zeros((2, 8, 8, 1), np.float32)])
    labels = np.concatenate([train.labels[:3], np.zeros(2, np.int32)])
    return model, model.init(jax.random.key(0), images[:1]), images, labels


def test_client_loss_and_local_accuracy_leave_padding_out(padded):
    model, params, images, labels = padded
    loss_fn = classifier.classifier_loss(model)
    loss, metrics = loss_fn(params, (), (images, labels), jnp.arange(5) < 3, (), None)
    real_loss, real_metrics = loss_fn(
        params, (), (images[:3], labels[:3]), jnp.ones(3, bool), (), None)
    assert float(loss) == pytest.approx(float(real_loss), rel=1e-6), "padding entered the loss"
    assert float(metrics["accuracy"]) == pytest.approx(float(real_metrics["accuracy"])), (
        "padding entered the local accuracy")


def test_example_accuracy_marks_each_example_right_or_wrong(padded):
    model, params, images, labels = padded
    predicted = np.argmax(np.asarray(model.apply(params, images)), axis=-1)
    got = classifier.example_accuracy(model)(params, (images, labels))["accuracy"]
    np.testing.assert_array_equal(np.asarray(got), (predicted == labels).astype(np.float32),
                                  err_msg="1.0 where the prediction is the label, else 0.0")


def test_an_unreachable_target_epsilon_is_a_config_error_naming_it():
    # The binary turns a ConfigError into exit 2 naming the flag; a bare CalibrationError
    # would end it with a traceback instead.
    config = classifier.FedAvgClassifierConfig(
        num_clients=100, rounds=100, clients_per_round=100, sampling="fixed",
        noise_multiplier=None, target_epsilon=1e-4)
    with pytest.raises(ConfigError, match="out of reach") as error:
        classifier.resolve_noise_multiplier(config)
    assert error.value.field == "target_epsilon", f"names {error.value.field}, not the target"


def test_a_resume_on_other_training_data_is_refused_naming_the_flag(tmp_path, monkeypatch):
    # The digest is of the federated clients: a checkpoint of round 1, resumed on digits
    # one example short, must not continue its model and ledger there.
    config = classifier.FedAvgClassifierConfig(
        dataset="digits", model="logreg", num_clients=20, clients_per_round=5, rounds=1,
        noise_multiplier=1.0, local_steps=2, local_batch_size=10, eval_every=1,
        checkpoint_every=1)
    classifier.train(config, str(tmp_path), log=lambda _: None)
    other_data.assert_resume_on_other_data_is_refused(  # digits is embedded: --dataset
        monkeypatch, lambda: classifier.train(dataclasses.replace(config, rounds=2),
                                              str(tmp_path), log=lambda _: None),
        tmp_path, "dataset")


_AUDIT_RUN = classifier.FedAvgClassifierConfig(
    dataset="digits", model="logreg", num_clients=20, clients_per_round=5, rounds=3,
    noise_multiplier=1.0, local_steps=2, local_batch_size=10, audit_canaries=30,
    eval_every=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    """`_AUDIT_RUN` trained to its end, uninterrupted: (its workdir, its summary). Shared:
    copy the workdir before writing to it."""
    workdir = tmp_path_factory.mktemp("audit_run")
    return workdir, classifier.train(_AUDIT_RUN, str(workdir), log=lambda _: None)


def test_an_audit_run_writes_its_canary_figures_and_a_rerun_keeps_them(tmp_path, audit_run):
    config = _AUDIT_RUN
    shutil.copytree(audit_run[0], tmp_path, dirs_exist_ok=True)
    summary = audit_run[1]
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written == summary["audit"], "audit.json is not the summary's audit"
    assert written["inserted"] + written["held_out"] == 60, f"2 x 30 candidates: {written}"
    assert written["ledger_epsilon_pld"] == summary["epsilon_pld"], "audit.json's ledger eps"
    assert 0 <= written["epsilon_lower_bound"] <= summary["epsilon_rdp"], (
        f"the audit proves more eps than the ledger records: {written}")
    assert "canary audit" in (tmp_path / "report.md").read_text(), "report.md omits the audit"
    every_round = written["all_rounds"]
    assert (every_round["rounds"], every_round["rate"], every_round["noise_multiplier"]) == (
        3, 0.25, 1.0), f"the all-rounds audit's design constants: {every_round}"
    assert 0 <= every_round["epsilon_lower_bound"] <= summary["epsilon_rdp"], every_round
    assert "all rounds' releases" in (tmp_path / "report.md").read_text(), (
        "report.md omits the all-rounds figures")
    again = classifier.train(config, str(tmp_path), log=lambda _: None)  # a finished run
    assert again["audit"] == written, "rerunning a finished audit run changed its figures"


def test_an_audit_run_resumed_after_a_round_writes_the_uninterrupted_runs_audit(
        tmp_path, audit_run):
    config, whole = _AUDIT_RUN, audit_run[1]
    # Stopped after round 1 (its checkpoint), then resumed to round 3.
    classifier.train(dataclasses.replace(config, rounds=1), str(tmp_path / "resumed"),
                     log=lambda _: None)
    resumed = classifier.train(config, str(tmp_path / "resumed"), log=lambda _: None)
    assert resumed["audit"]["all_rounds"]["rounds"] == 3, resumed["audit"]
    assert resumed["audit"] == whole["audit"], (
        "a resumed audit run lost or repeated rounds of its all-rounds scores")
