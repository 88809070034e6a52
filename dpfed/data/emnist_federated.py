"""Federated EMNIST by writer, read from TensorFlow Federated's HDF5 files.

The dataset of "Generative Models for Effective ML on Private, Decentralized Datasets"
(Augenstein et al., ICLR 2020): EMNIST split by the writer of each character (3,400
writers in the full train split). TFF ships it as `fed_emnist_train.h5` /
`fed_emnist_test.h5` (and `fed_emnist_digitsonly_*.h5`), fetched by
`tff.simulation.datasets.emnist.load_data()` into `~/.keras/datasets/` from
`fed_emnist.tar.bz2`. The layout:

    examples/<client_id>/pixels   float32 [n, 28, 28] in [0, 1], 1.0 = white background
    examples/<client_id>/label    int32   [n], 0-9 digits, 10-35 upper, 36-61 lower case

`load_federated_emnist` returns padded `FederatedData` in dpfed's image convention
(`[clients, max_n, 28, 28, 1]` float32 in [0, 1], 0 = black background, as MNIST), so
the same code and the same bug injection serve mnist5k and federated EMNIST. Like the
paper, upper and lower case letters can be merged (62 -> 36 classes).

TFF's train and test files hold the SAME writers (each writer's examples are split
between them), so the test file is no held-out population: to keep writers out of a
client population, choose them by id (`writer_ids`, then `client_ids=`).

No internet here: without the file the loader fails with a message naming the
embedded alternative (mnist5k partitioned into clients).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from dpfed.data.dataset import DatasetUnavailableError
from dpfed.data.partition import FederatedData

EXAMPLES_GROUP = "examples"
NUM_CLASSES = 62
NUM_CLASSES_MERGED = 36  # digits + case-insensitive letters
DIGITS = 10
DEFAULT_DIR = pathlib.Path("~/.keras/datasets")
FILE_NAMES = {
    ("train", False): "fed_emnist_train.h5",
    ("test", False): "fed_emnist_test.h5",
    ("train", True): "fed_emnist_digitsonly_train.h5",
    ("test", True): "fed_emnist_digitsonly_test.h5",
}


@dataclasses.dataclass(frozen=True)
class FederatedEmnist:
    """Federated EMNIST clients (writers) as padded arrays.

    Attributes:
      data: images `[clients, max_n, 28, 28, 1]` float32 in [0, 1] (0 = background),
        labels `[clients, max_n]`, counts `[clients]`.
      client_ids: the writer id of each client: in id order, or in the order asked for.
      num_classes: 10 (digits only), 36 (case merged) or 62.
    """

    data: FederatedData
    client_ids: list[str]
    num_classes: int


def default_path(split: str = "train", only_digits: bool = False) -> pathlib.Path:
    """Where TFF's `emnist.load_data()` leaves the file of `split`."""
    if (split, only_digits) not in FILE_NAMES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return (DEFAULT_DIR / FILE_NAMES[(split, only_digits)]).expanduser()


def merge_case(labels: np.ndarray) -> np.ndarray:
    """62 EMNIST classes -> 36: lower-case letters (36-61) join upper case (10-35)."""
    labels = np.asarray(labels)
    return np.where(labels >= 36, labels - 26, labels).astype(np.int32)


def writer_ids(
    path: str | os.PathLike | None = None, *, split: str = "train", only_digits: bool = False
) -> list[str]:
    """The writer ids of a TFF federated EMNIST file, in id order.

    Args:
      path: the `.h5` file; default `default_path(split, only_digits)`.
      split: names the default file only.
      only_digits: the digits-only files (names the default file).

    Raises:
      DatasetUnavailableError: as `load_federated_emnist`.
    """
    import h5py  # Only needed for this dataset.

    path = _checked_path(path, split, only_digits)
    with h5py.File(path, "r") as f:
        return sorted(_examples(f, path))


def load_federated_emnist(
    path: str | os.PathLike | None = None,
    *,
    split: str = "train",
    only_digits: bool = False,
    merge_letter_case: bool = True,
    client_ids: Sequence[str] | None = None,
    max_clients: int | None = None,
    max_examples_per_client: int | None = None,
) -> FederatedEmnist:
    """Reads TFF's federated EMNIST HDF5 file into padded federated arrays.

    Args:
      path: the `.h5` file; default `default_path(split, only_digits)`.
      split: names the default file only.
      only_digits: the digits-only files (10 classes; names the default file).
      merge_letter_case: map the 62 classes to 36, as the paper does.
      client_ids: read only these writers, in this order (e.g. some of `writer_ids(path)`);
        None reads all, in id order. At least one, no duplicates.
      max_clients: keep only the first `max_clients` writers (in id order, or of
        `client_ids`).
      max_examples_per_client: keep only each writer's first examples (bounds memory:
        the padded array is `clients x max_n x 784` floats). None keeps all.

    Raises:
      DatasetUnavailableError: the file is missing (the message names mnist5k) or does
        not have the TFF layout.
      ValueError: a bad limit, or `client_ids` is empty, repeats a writer or names one
        the file does not hold.
    """
    import h5py  # Only needed for this dataset.

    path = _checked_path(path, split, only_digits)
    if max_clients is not None and max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    if max_examples_per_client is not None and max_examples_per_client < 1:
        raise ValueError(f"max_examples_per_client must be >= 1, got {max_examples_per_client}")
    if client_ids is not None:
        client_ids = list(client_ids)
        if not client_ids:
            raise ValueError("client_ids must name at least one writer")
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("client_ids must not repeat a writer")
    with h5py.File(path, "r") as f:
        group = _examples(f, path)
        if client_ids is None:
            client_ids = sorted(group)
        else:
            known = set(group)  # Writer names only ("w/label" is in `group` too).
            unknown = [c for c in client_ids if c not in known]
            if unknown:
                raise ValueError(
                    f"{path} holds no writer {', '.join(map(repr, unknown[:5]))}"
                    + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
                    + f" of client_ids (it holds {len(group)} writers)"
                )
        client_ids = client_ids[:max_clients]
        counts = np.array(
            [_clip(group[c]["label"].shape[0], max_examples_per_client) for c in client_ids],
            dtype=np.int32,
        )
        max_n = int(counts.max())
        images = np.zeros((len(client_ids), max_n, 28, 28, 1), np.float32)
        labels = np.zeros((len(client_ids), max_n), np.int32)
        for i, (client, n) in enumerate(zip(client_ids, counts, strict=True)):
            pixels = np.asarray(group[client]["pixels"][:n], np.float32)
            if pixels.shape[1:] != (28, 28):
                raise DatasetUnavailableError(
                    f"{path}: client {client} has pixels of shape {pixels.shape}, "
                    "expected [n, 28, 28]"
                )
            images[i, :n, ..., 0] = 1.0 - pixels  # TFF: 1 = background; dpfed: 0 = background
            labels[i, :n] = np.asarray(group[client]["label"][:n])
    if only_digits:
        num_classes = DIGITS
    elif merge_letter_case:
        labels, num_classes = merge_case(labels), NUM_CLASSES_MERGED
    else:
        num_classes = NUM_CLASSES
    return FederatedEmnist(
        data=FederatedData(images=images, labels=labels, counts=counts),
        client_ids=list(client_ids),
        num_classes=num_classes,
    )


def _checked_path(
    path: str | os.PathLike | None, split: str, only_digits: bool
) -> pathlib.Path:
    """`path` (or the default file), or DatasetUnavailableError naming mnist5k."""
    path = pathlib.Path(path).expanduser() if path is not None else default_path(split, only_digits)
    if not path.is_file():
        raise DatasetUnavailableError(
            f"Federated EMNIST file {path} not found (TFF's fed_emnist_{{train,test}}.h5, "
            "fetched by tff.simulation.datasets.emnist.load_data(), needs internet): use "
            "the embedded 'mnist5k' split into clients instead (e.g. --dataset=mnist5k)."
        )
    return path


def _examples(f, path: pathlib.Path):
    """The file's non-empty `examples` group (one subgroup per writer)."""
    if EXAMPLES_GROUP not in f or len(f[EXAMPLES_GROUP]) == 0:
        raise DatasetUnavailableError(
            f"{path} has no non-empty '{EXAMPLES_GROUP}' group: not a TFF federated "
            "EMNIST file (expected examples/<client_id>/pixels and .../label)"
        )
    return f[EXAMPLES_GROUP]


def _clip(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)
