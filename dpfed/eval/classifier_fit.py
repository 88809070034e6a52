"""Non-private classifier training for evaluation: jitted epochs, early stopping on a
validation set, batched accuracy.

Used by the downstream (train-on-synthetic) evaluation and to train the domain feature
extractor. Never used on private data inside a private pipeline: these are metrics.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpfed.models.output import output
from dpfed.train.config import require


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Adam training for at most ``max_epochs``; stop after ``patience`` epochs without a
    better validation accuracy (ignored when there is no validation set)."""

    max_epochs: int = 15
    patience: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3

    def __post_init__(self):
        # No epoch would leave the init params and no validation accuracy.
        require(self.max_epochs >= 1, "max_epochs", "must be >= 1")


class FitResult(NamedTuple):
    """The selected params, the epoch they come from (1-based), how many epochs ran and
    their validation accuracy (None without a validation set: the last epoch's params)."""

    params: Any
    best_epoch: int
    epochs_run: int
    val_accuracy: float | None


def _loss(model: nn.Module, params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model.apply(params, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames=("model", "learning_rate"))
def _train_step(
    model: nn.Module,
    learning_rate: float,
    params: Any,
    opt_state: Any,
    images: jax.Array,
    labels: jax.Array,
) -> tuple[Any, Any, jax.Array]:
    """One Adam step on one batch."""
    loss, grads = jax.value_and_grad(functools.partial(_loss, model))(params, images, labels)
    updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _train_epoch(
    model: nn.Module,
    config: FitConfig,
    params: Any,
    opt_state: Any,
    images: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
) -> tuple[Any, Any]:
    """One pass over a fresh permutation in ``N // batch_size`` jitted Adam steps.

    A Python loop over a jitted step, not a ``lax.scan``: XLA's CPU backend runs
    convolutions inside a scan's while loop ~30x slower than at top level (measured
    here with the benchmark CNN).
    """
    batch_size = min(config.batch_size, len(images))
    order = np.asarray(jax.random.permutation(key, len(images)))
    for start in range(0, len(images) - batch_size + 1, batch_size):
        batch = order[start : start + batch_size]
        params, opt_state, _ = _train_step(
            model, config.learning_rate, params, opt_state, images[batch], labels[batch]
        )
    return params, opt_state


@functools.partial(jax.jit, static_argnames=("model",))
def _predict(model: nn.Module, params: Any, images: jax.Array) -> jax.Array:
    logits: jax.Array = output(model, params, images)
    return jnp.argmax(logits, axis=-1)


def predict(model: nn.Module, params: Any, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted classes of ``images``; every batch is padded to ``batch_size``, so any
    number of images costs one compilation."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        padded = np.pad(batch, [(0, batch_size - len(batch))] + [(0, 0)] * (batch.ndim - 1))
        out.append(np.asarray(_predict(model, params, jnp.asarray(padded)))[: len(batch)])
    return np.concatenate(out)


def _check_examples(images: Any, labels: Any, what: str) -> None:
    """Raises ValueError unless ``labels`` is ``[N]`` for ``N >= 1`` ``images``."""
    shape = np.shape(labels)
    if len(images) == 0 or shape != (len(images),):
        raise ValueError(
            f"{what}: labels must be [N] for N >= 1 images, got {len(images)} images and "
            f"labels of shape {shape}")


def accuracy(model: nn.Module, params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of ``images`` that ``model`` classifies as ``labels``."""
    _check_examples(images, labels, "accuracy")
    return float(np.mean(predict(model, params, images) == np.asarray(labels)))


def fit(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    config: FitConfig,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> FitResult:
    """Trains ``model`` on ``(images, labels)``; with ``validation``, keeps the params of
    the epoch with the best validation accuracy and stops early (``config.patience``)."""
    _check_examples(images, labels, "training set")
    if validation is not None:
        _check_examples(*validation, "validation set")
    init_key, epoch_key = jax.random.split(key)
    params = jax.jit(model.init)(init_key, jnp.asarray(images[:1]))
    opt_state = optax.adam(config.learning_rate).init(params)
    labels = np.asarray(labels, np.int32)
    best = FitResult(params, 0, 0, None)
    for epoch in range(1, config.max_epochs + 1):
        params, opt_state = _train_epoch(
            model, config, params, opt_state, images, labels, jax.random.fold_in(epoch_key, epoch)
        )
        if validation is None:
            best = FitResult(params, epoch, epoch, None)
            continue
        val_accuracy = accuracy(model, params, *validation)
        if best.val_accuracy is None or val_accuracy > best.val_accuracy:
            best = FitResult(params, epoch, epoch, val_accuracy)
        else:
            best = best._replace(epochs_run=epoch)
        if epoch - best.best_epoch >= config.patience:
            break
    return best
