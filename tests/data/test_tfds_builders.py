"""Tests that the embedded datasets are also served through `tfds.data_source`."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dpfed import data
from dpfed.data import tfds_builders  # noqa: F401  (registers the builders)


@pytest.mark.parametrize("builder, dataset", [("dpfed_digits", "digits"),
                                              ("dpfed_mnist5k", "mnist5k")])
def test_data_source_matches_load(tmp_path, builder, dataset):
    source = tfds.data_source(
        builder,
        split="test",
        data_dir=str(tmp_path),
        builder_kwargs={"file_format": "array_record"},
    )
    expected = data.load(dataset, "test")
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.array([source[i]["label"] for i in range(len(source))])
    np.testing.assert_array_equal(images, expected.images, err_msg="tfds images differ from load")
    np.testing.assert_array_equal(labels, expected.labels, err_msg="tfds labels differ from load")
