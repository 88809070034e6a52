"""Official image datasets through `tfds.data_source`, without TensorFlow.

`tfds.data_source` reads prepared array_record files with NumPy/PIL only (`tfds.load`
and `tfds.as_numpy` need TensorFlow, which this project does not install). Records are
read one at a time (slices and `__getitems__` are not supported everywhere, e.g. by
`tfds.testing.mock_data`), converted in chunks with NumPy.

Offline use: before any download attempt the dataset must be prepared in `data_dir`
(default: `$TFDS_DATA_DIR` or `~/tensorflow_datasets`); otherwise loading fails at once
with `DatasetUnavailableError` naming the embedded alternative. Downloading is opt-in
(`download=True` or `DPFED_DOWNLOAD=1`) and needs internet; preparing image datasets
also needs TensorFlow (tfds encodes images with it). A machine with TensorFlow can
prepare them once with `tfds build mnist --file_format=array_record --data_dir=DIR`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dpfed.data.dataset import DatasetUnavailableError

DOWNLOAD_ENV = "DPFED_DOWNLOAD"
CELEBA_LABEL = "Male"
CELEBA_CROP = 160  # Center square crop of the 218x178 photo; 160 = 5 * 32.
CELEBA_SIZE = 32
_CHUNK = 4096  # Records converted at once: bounds host memory for CelebA photos.

Records = Sequence[dict[str, Any]]
Converted = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _image_label(records: Records) -> Converted:
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    return images, labels, None


def _emnist(records: Records) -> Converted:
    """EMNIST images are stored transposed in tfds (tensorflow/datasets#812): undo it."""
    images, labels, _ = _image_label(records)
    return images.transpose(0, 2, 1, 3), labels, None


def celeba_downsample(photos: np.ndarray) -> np.ndarray:
    """Center-crops uint8 `[N, 218, 178, 3]` photos to 160x160 and averages 5x5 blocks.

    Gives float32 `[N, 32, 32, 3]` in [0, 1]; exact area downsampling, no resampler.
    """
    n, height, width, channels = photos.shape
    top, left = (height - CELEBA_CROP) // 2, (width - CELEBA_CROP) // 2
    crop = photos[:, top : top + CELEBA_CROP, left : left + CELEBA_CROP].astype(np.float32)
    block = CELEBA_CROP // CELEBA_SIZE
    blocks = crop.reshape(n, CELEBA_SIZE, block, CELEBA_SIZE, block, channels)
    return blocks.mean(axis=(2, 4)) / 255.0


def _celeb_a(records: Records) -> Converted:
    images = celeba_downsample(np.stack([r["image"] for r in records]))
    labels = np.array([r["attributes"][CELEBA_LABEL] for r in records], dtype=np.int32)
    users = np.array([r["identity"]["Identity_No"] for r in records], dtype=np.int32)
    return images, labels, users


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How one registry name maps to a tfds dataset.

    Attributes:
      tfds_name: the tfds name, with config (e.g. "emnist/balanced").
      num_classes: number of label classes after conversion.
      embedded_alternative: the offline dataset to suggest when this one is missing.
      convert: records -> (float32 images in [0, 1], int32 labels, user ids or None).
    """

    tfds_name: str
    num_classes: int
    embedded_alternative: str
    convert: Callable[[Records], Converted] = _image_label


TFDS_DATASETS = {
    "mnist": TfdsSpec("mnist", 10, "mnist5k"),
    "fashion_mnist": TfdsSpec("fashion_mnist", 10, "mnist5k"),
    # Balanced: 47 classes (digits, upper case, lower case letters that differ from
    # their upper case), 2,400 train / 400 test per class.
    "emnist": TfdsSpec("emnist/balanced", 47, "mnist5k", _emnist),
    "cifar10": TfdsSpec("cifar10", 10, "digits"),
    # Binary label: the "Male" attribute; 32x32 by center crop + area downsampling.
    "celeb_a": TfdsSpec("celeb_a", 2, "digits", _celeb_a),
}


def download_requested(download: bool | None) -> bool:
    """Resolves the download opt-in: the argument, else `DPFED_DOWNLOAD` in {1, true, yes}."""
    if download is not None:
        return download
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def open_source(spec: TfdsSpec, split: str, data_dir: str | None, download: bool) -> Sequence:
    """Returns the tfds data source of one split, failing fast when it is not prepared."""
    import tensorflow_datasets as tfds  # Only imported for tfds datasets.

    builder_kwargs = {"file_format": "array_record"}
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, **builder_kwargs)
    if not builder.is_prepared() and not download:
        raise DatasetUnavailableError(
            f"Dataset '{spec.tfds_name}' is not prepared in {builder.data_dir} and "
            f"downloading is off: use the embedded dataset '{spec.embedded_alternative}' "
            f"instead, or set {DOWNLOAD_ENV}=1 (needs internet and TensorFlow) to fetch it."
        )
    try:
        return tfds.data_source(
            spec.tfds_name,
            split=split,
            data_dir=data_dir,
            download=download,
            builder_kwargs=builder_kwargs,
        )
    except Exception as error:  # Network, missing TensorFlow, bad files: one clear line.
        raise DatasetUnavailableError(
            f"Dataset '{spec.tfds_name}' could not be read or prepared in {builder.data_dir} "
            f"({type(error).__name__}: {error}); the embedded '{spec.embedded_alternative}' "
            "works offline."
        ) from error


def read_converted(source: Sequence, convert: Callable[[Records], Converted]) -> Converted:
    """Reads every record of `source` one at a time and converts them chunk by chunk."""
    num = len(source)
    if num == 0:
        raise DatasetUnavailableError("the tfds data source is empty")
    images: np.ndarray | None = None
    labels = np.empty(num, np.int32)
    users: np.ndarray | None = None
    for start in range(0, num, _CHUNK):
        stop = min(start + _CHUNK, num)
        chunk_images, chunk_labels, chunk_users = convert([source[i] for i in range(start, stop)])
        if images is None:
            images = np.empty((num, *chunk_images.shape[1:]), np.float32)
            users = None if chunk_users is None else np.empty(num, np.int32)
        images[start:stop] = chunk_images
        labels[start:stop] = chunk_labels
        if users is not None:
            assert chunk_users is not None, "a converter gives users for every chunk or none"
            users[start:stop] = chunk_users
    assert images is not None  # num > 0: the loop ran
    return images, labels, users


def load_tfds(
    spec: TfdsSpec, split: str, data_dir: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Loads one split as (float32 images in [0, 1], int32 labels, user ids or None)."""
    return read_converted(open_source(spec, split, data_dir, download), spec.convert)
