"""Tests for dpfed.eval.downstream: train on synthetic, test on real."""

import logging

import jax
import numpy as np
import pytest

from dpfed import data
from dpfed.eval import classifier_fit, downstream
from dpfed.generative.contract import SyntheticSet


def _real(name, n=None):
    train, test = data.load(name, "train"), data.load(name, "test")
    synthetic = SyntheticSet(np.asarray(train.images[:n]), np.asarray(train.labels[:n]))
    return synthetic, (test.images, test.labels), train.num_classes


def _config(max_epochs):
    return downstream.DownstreamConfig(fit=classifier_fit.FitConfig(max_epochs=max_epochs))


def test_real_digits_as_synthetic_reach_the_ceiling():
    synthetic, test, classes = _real("digits")
    key = jax.random.key(0)
    results = downstream.evaluate_downstream(synthetic, test, classes, key, _config(8))
    accuracies = {name: r.test_accuracy for name, r in results.items()}
    assert set(accuracies) == {"cnn", "mlp", "logreg"}, f"all three models expected: {accuracies}"
    assert min(accuracies.values()) >= 0.85, f"real digits should train well: {accuracies}"


def test_real_mnist5k_subset_trains_a_good_cnn():
    synthetic, test, classes = _real("mnist5k", n=1000)
    results = downstream.evaluate_downstream(
        synthetic, test, classes, jax.random.key(0), _config(4), models=("cnn",)
    )
    assert results["cnn"].test_accuracy >= 0.8, f"1,000 real MNIST images: {results['cnn']}"


@pytest.mark.slow
def test_real_mnist5k_gives_the_ceiling():
    synthetic, test, classes = _real("mnist5k")
    results = downstream.evaluate_downstream(
        synthetic, test, classes, jax.random.key(0), downstream.DownstreamConfig()
    )
    assert results["cnn"].test_accuracy >= 0.95, f"real-data ceiling CNN: {results['cnn']}"


def test_each_models_accuracy_is_logged_once_it_is_trained(caplog):
    synthetic, test, classes = _real("digits", n=300)
    with caplog.at_level(logging.INFO):
        results = downstream.evaluate_downstream(
            synthetic, test, classes, jax.random.key(0), _config(2), models=("mlp", "logreg"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downstream ")]
    assert [line.split(":")[0] for line in lines] == ["downstream mlp", "downstream logreg"], lines
    assert f"{100 * results['mlp'].test_accuracy:.1f}%" in lines[0], lines


def test_noise_images_give_chance_accuracy():
    _, test, classes = _real("digits")
    rng = np.random.default_rng(0)
    noise = SyntheticSet(
        rng.uniform(size=(1000, 8, 8, 1)).astype(np.float32),
        rng.integers(0, classes, 1000).astype(np.int32),
    )
    results = downstream.evaluate_downstream(noise, test, classes, jax.random.key(0), _config(3))
    accuracies = {name: r.test_accuracy for name, r in results.items()}
    assert all(0.02 <= a <= 0.2 for a in accuracies.values()), f"noise ~10% expected: {accuracies}"


def test_a_models_accuracy_does_not_depend_on_the_other_models_asked_for():
    synthetic, test, classes = _real("digits")
    alone, after_mlp = (
        downstream.evaluate_downstream(synthetic, test, classes, jax.random.key(0), _config(3),
                                       models=models)["logreg"]
        for models in (("logreg",), ("mlp", "logreg"))
    )
    assert alone.test_accuracy == after_mlp.test_accuracy, (
        f"logreg alone {alone.test_accuracy} vs after mlp {after_mlp.test_accuracy}: each "
        "model's key must come from its name, not its position in --models")


def test_test_labels_never_influence_selection():
    synthetic, (images, labels), classes = _real("digits")
    train, val = downstream.split_validation(synthetic, 0.1, jax.random.key(1))
    shuffled = np.random.default_rng(0).permutation(labels)
    runs = [
        downstream.train_on_synthetic(
            "logreg", train, val, (images, test_labels), classes, jax.random.key(2),
            classifier_fit.FitConfig(max_epochs=6, patience=2),
        )
        for test_labels in (labels, shuffled)
    ]
    selection = [(r.best_epoch, r.epochs_run, r.val_accuracy) for r in runs]
    assert selection[0] == selection[1], f"the test split changed early stopping: {selection}"


def test_split_validation_holds_out_the_fraction():
    synthetic, _, _ = _real("digits")
    train, val = downstream.split_validation(synthetic, 0.1, jax.random.key(0))
    n = len(synthetic.images)
    assert (len(train.images), len(val.images)) == (n - round(0.1 * n), round(0.1 * n)), (
        "validation split has the wrong size"
    )


def test_unlabelled_synthetic_set_is_rejected():
    images = np.zeros((10, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="labelled"):
        downstream.split_validation(SyntheticSet(images, None), 0.1, jax.random.key(0))


def test_test_accuracy_is_measured_on_the_real_test_split():
    synthetic, (images, labels), classes = _real("digits")
    train, val = downstream.split_validation(synthetic, 0.1, jax.random.key(1))
    wrong_labels = (labels + 1) % classes  # a classifier that is right on val is wrong here
    result = downstream.train_on_synthetic(
        "logreg", train, val, (images, wrong_labels), classes, jax.random.key(2),
        classifier_fit.FitConfig(max_epochs=3, learning_rate=1e-2),
    )
    assert result.val_accuracy > 0.8 and result.test_accuracy < 0.2, (
        f"test accuracy must come from the test split given, not the validation split: {result}")


def test_validation_split_is_drawn_at_random():
    labels = np.repeat(np.arange(10), 50).astype(np.int32)  # a class-sorted synthetic set
    images = np.zeros((500, 8, 8, 1), np.float32)
    _, val = downstream.split_validation(SyntheticSet(images, labels), 0.1, jax.random.key(0))
    assert len(np.unique(val.labels)) >= 8, (
        f"the validation split of a class-sorted set holds classes {np.unique(val.labels)}")
