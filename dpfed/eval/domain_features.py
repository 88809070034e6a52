"""The default FID feature extractor: a domain classifier's penultimate layer (`fid_domain`).

Inception-v3 features are meaningless for 28x28 grey digits trained from a few thousand
examples, and its weights cannot be downloaded here; P0 (Augenstein et al., 2020)
likewise measured Fréchet distance on an EMNIST *classifier's* features. This module
trains a small CNN on the dataset's **train split, non-privately** and uses its 128-d
penultimate activations as features.

Which data it sees: the real train split (labels included) of the named dataset, i.e.
the same records the private methods train on. It is an evaluation instrument, like the
real test split it is compared against: it never feeds a private pipeline and is never
released, so it spends no privacy budget, and the numbers it yields are not private.
Its weights are cached (keyed by dataset, seed, steps, architecture and a hash of the
training data), so the metric is trained once per dataset and machine.
"""

import hashlib
import json
import logging
import math
import os
import pathlib
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from dpfed import data
from dpfed.eval import classifier_fit
from dpfed.eval.fid import FeatureExtractor
from dpfed.train import workdir as workdir_lib

METRIC_NAME = "fid_domain"
FEATURE_DIM = 128
DEFAULT_STEPS = 160
_BATCH_SIZE = 128
_ARCHITECTURE = "featurecnn-v1"
CACHE_ENV = "DPFED_CACHE_DIR"


class FeatureCNN(nn.Module):
    """conv32-relu-pool-conv64-relu-pool-dense(feature_dim)-relu-dense(num_classes).

    ``__call__(x)`` returns logits; ``__call__(x, features=True)`` the penultimate
    ``[B, feature_dim]`` activations used for the Fréchet distance.
    """

    num_classes: int
    feature_dim: int = FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array, features: bool = False) -> jax.Array:
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, kernel_size=(3, 3))(x))
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(self.feature_dim)(x.reshape((x.shape[0], -1))))
        if features:
            return x
        return nn.Dense(self.num_classes)(x)


def default_cache_dir() -> pathlib.Path:
    """``$DPFED_CACHE_DIR`` if set, else ``~/.cache/dpfed``."""
    return pathlib.Path(os.environ.get(CACHE_ENV, pathlib.Path.home() / ".cache" / "dpfed"))


def _data_hash(dataset: data.ImageDataset) -> str:
    digest = hashlib.sha256()
    for array in (dataset.images, dataset.labels):
        digest.update(f"{array.dtype.name}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


def _cache_stem(train: data.ImageDataset, seed: int, steps: int) -> str:
    return f"{train.name}-{_ARCHITECTURE}-seed{seed}-steps{steps}-{_data_hash(train)}"


def train_feature_classifier(
    train: data.ImageDataset, seed: int, steps: int
) -> tuple[FeatureCNN, Any]:
    """Trains `FeatureCNN` non-privately on ``train`` for about ``steps`` Adam steps
    (whole epochs of batch 128, lr 1e-3).

    Raises:
      ValueError: ``steps`` < 1 (an untrained CNN's features would be cached as the metric).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = FeatureCNN(num_classes=train.num_classes)
    steps_per_epoch = max(1, train.num_examples // _BATCH_SIZE)
    config = classifier_fit.FitConfig(
        max_epochs=math.ceil(steps / steps_per_epoch), batch_size=_BATCH_SIZE
    )
    fitted = classifier_fit.fit(model, train.images, train.labels, jax.random.key(seed), config)
    return model, fitted.params


def domain_extractor(
    dataset: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> FeatureExtractor:
    """The `fid_domain` extractor of ``dataset``, trained on its train split or read
    from the cache in ``cache_dir`` (default `default_cache_dir()`).

    Raises:
      ValueError: ``steps`` < 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    train = data.load(dataset, "train")
    directory = pathlib.Path(cache_dir or default_cache_dir()) / "domain_features"
    directory.mkdir(parents=True, exist_ok=True)
    stem = _cache_stem(train, seed, steps)
    weights, info_file = directory / f"{stem}.msgpack", directory / f"{stem}.json"
    model = FeatureCNN(num_classes=train.num_classes)
    if weights.exists() and info_file.exists():
        template = jax.jit(model.init)(jax.random.key(0), jnp.asarray(train.images[:1]))
        params = flax.serialization.from_bytes(template, weights.read_bytes())
        info = json.loads(info_file.read_text())
    else:
        logging.info("training the %s feature classifier on %s/train", METRIC_NAME, dataset)
        model, params = train_feature_classifier(train, seed, steps)
        test = data.load(dataset, "test")
        info = {
            "dataset": dataset,
            "split_seen": "train",
            "train_examples": train.num_examples,
            "seed": seed,
            "steps": steps,
            "architecture": _ARCHITECTURE,
            "test_accuracy": classifier_fit.accuracy(model, params, test.images, test.labels),
        }
        # Every process of a multi-host job writes its own host's cache (no barriers).
        workdir_lib.atomic_write_local_bytes(weights, flax.serialization.to_bytes(params))
        workdir_lib.atomic_write_local_bytes(
            info_file, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    features = jax.jit(lambda images: model.apply(params, images, features=True))
    description = (
        f"penultimate layer ({FEATURE_DIM}-d) of a CNN trained non-privately on the "
        f"{dataset} train split ({info['train_examples']} images, seed {seed}, ~{steps} "
        f"steps; its test accuracy {info['test_accuracy']:.3f})"
    )  # No cache path: it holds a hash of the train split (and maybe a user name).
    logging.info("%s extractor weights: %s", METRIC_NAME, weights)
    return FeatureExtractor(METRIC_NAME, description, features)
