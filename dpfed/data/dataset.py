"""The image dataset type every loader returns, and the loaders' errors."""

from __future__ import annotations

import dataclasses

import numpy as np


class UnknownDatasetError(ValueError):
    """The dataset name is not in the registry; the message lists the known names."""


class DatasetUnavailableError(RuntimeError):
    """A known dataset cannot be read here (e.g. tfds data not prepared, offline)."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """One split of an image classification dataset, held in host memory.

    Attributes:
      images: float32 `[N, H, W, C]`, pixel values in [0, 1] (0 = black). Models that
        want [-1, 1] (e.g. the GAN of Augenstein et al. 2020) rescale with `2 * x - 1`.
      labels: int32 `[N]`, class ids in [0, num_classes).
      num_classes: number of classes.
      name: the registry name it was loaded by (e.g. "mnist5k").
      user_ids: optional int `[N]` natural owner of each example (CelebA: the
        celebrity identity) for `partition_natural`; None when the source has none.

    Arrays returned by `dpfed.data.load` are read-only (they are cached and shared):
    copy before modifying, e.g. `images.copy()` or `dataclasses.replace(ds, ...)`.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    user_ids: np.ndarray | None = None

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {self.images.shape}")
        n = self.images.shape[0]
        for field, array in (("labels", self.labels), ("user_ids", self.user_ids)):
            if array is not None and array.shape != (n,):
                raise ValueError(f"{field} must have shape ({n},), got {array.shape}")

    @property
    def num_examples(self) -> int:
        """How many examples the split holds."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.images.shape[1:])


def read_only(array: np.ndarray) -> np.ndarray:
    """Returns `array` with writes disabled, so a cached dataset cannot be corrupted."""
    array.flags.writeable = False
    return array
