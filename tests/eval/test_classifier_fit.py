"""Tests for dpfed.eval.classifier_fit: epochs, early stopping and the params it keeps."""

import dataclasses

import jax
import numpy as np
import pytest

from dpfed import data
from dpfed.eval import classifier_fit
from dpfed.models import get_classifier


def _constant_validation():
    # One image ten times, once per class: every model scores exactly 0.1 on it, so
    # the validation accuracy never improves after epoch 1.
    image = data.load("digits", "test").images[:1]
    return np.repeat(image, 10, axis=0), np.arange(10, dtype=np.int32)


def test_early_stopping_keeps_the_best_epochs_params_and_stops_after_patience():
    train = data.load("digits", "train")
    model, key = get_classifier("logreg", 10), jax.random.key(0)
    config = classifier_fit.FitConfig(max_epochs=10, patience=3)
    fitted = classifier_fit.fit(
        model, train.images, train.labels, key, config, validation=_constant_validation()
    )
    assert (fitted.best_epoch, fitted.epochs_run) == (1, 4), (
        f"best epoch 1, then 3 epochs without improvement: {fitted[1:]}")
    first = classifier_fit.fit(
        model, train.images, train.labels, key, dataclasses.replace(config, max_epochs=1)
    )
    for got, want in zip(jax.tree_util.tree_leaves(fitted.params),
                         jax.tree_util.tree_leaves(first.params), strict=True):
        np.testing.assert_array_equal(got, want, err_msg="the params must be the best epoch's")


def test_a_set_no_larger_than_one_batch_is_still_trained_on():
    train = data.load("digits", "train")
    images, labels = train.images[:100], train.labels[:100]  # fewer than batch_size 128
    model = get_classifier("logreg", 10)
    fitted = classifier_fit.fit(
        model, images, labels, jax.random.key(0),
        classifier_fit.FitConfig(max_epochs=20, learning_rate=1e-2),
    )
    accuracy = classifier_fit.accuracy(model, fitted.params, images, labels)
    assert accuracy > 0.5, f"20 epochs on 100 examples should fit them, got {accuracy}"


def test_accuracy_refuses_labels_that_are_not_one_per_image():
    test = data.load("digits", "test")
    images, labels = test.images[:50], test.labels[:50]
    model = get_classifier("logreg", 10)
    params = model.init(jax.random.key(0), images[:1])
    # [N, 1] labels broadcast against [N] predictions into an [N, N] comparison: a
    # wrong accuracy, silently.
    with pytest.raises(ValueError, match="labels must be"):
        classifier_fit.accuracy(model, params, images, labels[:, None])
    with pytest.raises(ValueError, match="labels must be"):
        classifier_fit.accuracy(model, params, images[:0], labels[:0])


def test_fit_refuses_an_empty_or_mismatched_set():
    train = data.load("digits", "train")
    model, config = get_classifier("logreg", 10), classifier_fit.FitConfig(max_epochs=1)
    images, labels = train.images[:64], train.labels[:64]
    with pytest.raises(ValueError, match="training set"):
        classifier_fit.fit(model, images[:0], labels[:0], jax.random.key(0), config)
    with pytest.raises(ValueError, match="training set"):
        classifier_fit.fit(model, images, labels[:32], jax.random.key(0), config)
    with pytest.raises(ValueError, match="validation set"):
        classifier_fit.fit(model, images, labels, jax.random.key(0), config,
                           validation=(images[:0], labels[:0]))


def test_a_config_without_an_epoch_is_refused():
    # max_epochs=0 returned the untrained init params, and (with a validation set) a
    # val_accuracy of None that downstream.DownstreamResult holds as a float.
    with pytest.raises(ValueError, match="max_epochs"):
        classifier_fit.FitConfig(max_epochs=0)
