"""`load(name, split)`: every image dataset of dpfed behind one name.

Embedded datasets (`mnist5k`, `digits`) work everywhere; the tfds ones (`mnist`,
`fashion_mnist`, `emnist`, `cifar10`, `celeb_a`) need prepared data or an opted-in
download (see `dpfed.data.tfds_source`). Loaded splits are cached in-process and
returned with read-only arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from dpfed.data import embedded, tfds_source
from dpfed.data.dataset import ImageDataset, UnknownDatasetError, read_only

SPLITS = ("train", "test")
EMBEDDED_DATASETS: dict[str, Callable[[str], tuple[np.ndarray, np.ndarray, int]]] = {
    "mnist5k": embedded.mnist5k,
    "digits": embedded.digits,
}


def list_datasets() -> list[str]:
    """Returns every name `load` accepts: embedded ones first, then tfds ones."""
    return [*EMBEDDED_DATASETS, *tfds_source.TFDS_DATASETS]


def source_flag(name: str) -> str:
    """The flag that chooses dataset `name`'s data: "dataset" for an embedded one (its
    arrays ship with its package), "data_dir" for a tfds one (prepared in that folder)."""
    return "dataset" if name in EMBEDDED_DATASETS else "data_dir"


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, data_dir: str | None, download: bool) -> ImageDataset:
    if name in EMBEDDED_DATASETS:
        images, labels, num_classes = EMBEDDED_DATASETS[name](split)
        users = None
    else:
        spec = tfds_source.TFDS_DATASETS[name]
        images, labels, users = tfds_source.load_tfds(spec, split, data_dir, download)
        num_classes = spec.num_classes
    return ImageDataset(
        images=read_only(np.ascontiguousarray(images, dtype=np.float32)),
        labels=read_only(np.ascontiguousarray(labels, dtype=np.int32)),
        num_classes=num_classes,
        name=name,
        user_ids=None if users is None else read_only(users),
    )


def load(
    name: str, split: str = "train", *, data_dir: str | None = None, download: bool | None = None
) -> ImageDataset:
    """Loads one split of a named image dataset.

    Args:
      name: one of `list_datasets()`.
      split: "train" or "test".
      data_dir: tfds data folder (default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`);
        ignored by the embedded datasets.
      download: allow tfds to download and prepare missing data; None reads the
        `DPFED_DOWNLOAD` environment variable (off unless "1"/"true"/"yes").

    Returns:
      An `ImageDataset`: float32 images `[N, H, W, C]` in [0, 1], int32 labels `[N]`.
      Repeated calls return the same cached object; its arrays are read-only.

    Raises:
      UnknownDatasetError: `name` is not a known dataset (the message lists them).
      DatasetUnavailableError: a tfds dataset is not prepared and downloading is off,
        or preparing it failed; the message names the embedded alternative.
      ValueError: `split` is not "train" or "test".
    """
    if name not in list_datasets():
        raise UnknownDatasetError(
            f"Unknown dataset '{name}'; known datasets: {', '.join(list_datasets())}"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    return _load_cached(name, split, data_dir, tfds_source.download_requested(download))
