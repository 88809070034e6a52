"""Train on synthetic, test on real: the downstream accuracy of a labelled synthetic set.

The evaluation of P1 (DPD-fVAE), P2 (DataLens) and the DPDM reference table (Dockhorn
et al., TMLR 2023): classifiers are trained on generated images with their generated
labels and tested on the real test split. Here the three classifiers of `dpfed.models`
(CNN, MLP, logistic regression) are trained non-privately; early stopping selects the
epoch on a held-out part of the *synthetic* set only. The real test split is looked at
once, with the selected params, so it never influences a choice.
"""

import dataclasses
import logging
import time
from typing import NamedTuple

import jax
import numpy as np

from dpfed.eval import classifier_fit
from dpfed.generative.contract import SyntheticSet
from dpfed.models import get_classifier

DOWNSTREAM_MODELS = ("cnn", "mlp", "logreg")


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """How each downstream classifier is trained; ``val_fraction`` of the synthetic set
    is held out for early stopping. ``learning_rates`` overrides ``fit.learning_rate``
    per model: logistic regression needs a larger step to converge in a few epochs."""

    fit: classifier_fit.FitConfig = classifier_fit.FitConfig()
    val_fraction: float = 0.1
    learning_rates: tuple[tuple[str, float], ...] = (("logreg", 1e-2),)

    def fit_config(self, model_name: str) -> classifier_fit.FitConfig:
        """The training config of ``model_name``."""
        rate = dict(self.learning_rates).get(model_name, self.fit.learning_rate)
        return dataclasses.replace(self.fit, learning_rate=rate)


class DownstreamResult(NamedTuple):
    """One classifier's accuracy on the real test split, and how it was selected."""

    test_accuracy: float
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    train_size: int
    val_size: int


def validation_size(n: int, fraction: float) -> int:
    """How many of ``n`` synthetic examples `split_validation` holds out.

    Raises:
      ValueError: if that leaves the validation or the training part empty.
    """
    val_size = int(round(fraction * n))
    if not 0 < val_size < n:
        raise ValueError(f"cannot hold out {fraction:.0%} of {n} examples for validation")
    return val_size


def split_validation(
    synthetic: SyntheticSet, fraction: float, key: jax.Array
) -> tuple[SyntheticSet, SyntheticSet]:
    """A random ``(train, validation)`` split of a labelled synthetic set.

    Raises:
      ValueError: if the set is unlabelled or too small to leave both parts non-empty.
    """
    if synthetic.labels is None:
        raise ValueError("downstream accuracy needs a labelled synthetic set")
    n = len(synthetic.images)
    val_size = validation_size(n, fraction)
    order = np.asarray(jax.random.permutation(key, n))
    val, train = order[:val_size], order[val_size:]
    return (
        SyntheticSet(synthetic.images[train], synthetic.labels[train]),
        SyntheticSet(synthetic.images[val], synthetic.labels[val]),
    )


def train_on_synthetic(
    model_name: str,
    train: SyntheticSet,
    val: SyntheticSet,
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    key: jax.Array,
    config: classifier_fit.FitConfig,
) -> DownstreamResult:
    """Trains ``model_name`` on ``train``, early-stopping on ``val`` (both synthetic),
    and returns its accuracy on the real ``test`` split."""
    if train.labels is None or val.labels is None:
        raise ValueError("downstream accuracy needs a labelled synthetic set")
    model = get_classifier(model_name, num_classes)
    fitted = classifier_fit.fit(
        model, train.images, train.labels, key, config, validation=(val.images, val.labels))
    assert fitted.val_accuracy is not None  # given a validation set, `fit` runs >= 1 epoch
    return DownstreamResult(
        test_accuracy=classifier_fit.accuracy(model, fitted.params, *test),
        val_accuracy=fitted.val_accuracy,
        best_epoch=fitted.best_epoch,
        epochs_run=fitted.epochs_run,
        train_size=len(train.images),
        val_size=len(val.images),
    )


def evaluate_downstream(
    synthetic: SyntheticSet,
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    key: jax.Array,
    config: DownstreamConfig = DownstreamConfig(),
    models: tuple[str, ...] = DOWNSTREAM_MODELS,
) -> dict[str, DownstreamResult]:
    """Holds out one synthetic validation split, then `train_on_synthetic` per model.

    Each model's key comes from its name's place in `DOWNSTREAM_MODELS`, not in `models`,
    so a model's accuracy does not depend on which other models are asked for.
    """
    split_key, fit_key = jax.random.split(key)
    train, val = split_validation(synthetic, config.val_fraction, split_key)
    results = {}
    for name in models:  # one line each: the three fits take a minute or more on a CPU
        start = time.time()
        results[name] = result = train_on_synthetic(
            name, train, val, test, num_classes,
            jax.random.fold_in(fit_key, DOWNSTREAM_MODELS.index(name)),
            config.fit_config(name),
        )
        logging.info("downstream %s: test accuracy %.1f%% (best epoch %d of %d, %.0f s)", name,
                     100 * result.test_accuracy, result.best_epoch, result.epochs_run,
                     time.time() - start)
    return results
