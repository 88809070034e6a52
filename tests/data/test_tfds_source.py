"""Tests of the tfds path: conversion through `tfds.testing.mock_data`, and offline failure."""

import time
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dpfed import data
from dpfed.data import tfds_source


@pytest.fixture
def prepared_mock():
    """Fake tfds data; the mock leaves `is_prepared` False, so pretend it is prepared."""
    with (
        tfds.testing.mock_data(num_examples=6),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        yield


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test instead of touching the network."""
    monkeypatch.delenv(tfds_source.DOWNLOAD_ENV, raising=False)
    fail = mock.Mock(side_effect=AssertionError("download_and_prepare was called"))
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", fail):
        yield fail


def test_mock_mnist_loads_as_float_images_in_unit_range(prepared_mock, tmp_path):
    ds = data.load("mnist", "train", data_dir=str(tmp_path))
    assert ds.images.shape == (6, 28, 28, 1), f"shape {ds.images.shape}"
    assert ds.images.dtype == np.float32, f"dtype {ds.images.dtype}"
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0, "pixels outside [0, 1]"
    assert ds.images.max() > 0.5, "pixels were not scaled from 0..255 (all tiny)"
    assert ds.labels.dtype == np.int32 and 0 <= ds.labels.min() <= ds.labels.max() < 10, (
        f"labels {ds.labels} not int32 in [0, 10)"
    )


def test_mock_celeb_a_gives_32px_binary_labels_and_identities(prepared_mock, tmp_path):
    ds = data.load("celeb_a", "test", data_dir=str(tmp_path))
    assert ds.images.shape == (6, 32, 32, 3), f"shape {ds.images.shape}"
    assert set(ds.labels.tolist()) <= {0, 1} and ds.num_classes == 2, f"labels {ds.labels}"
    assert ds.user_ids is not None and ds.user_ids.shape == (6,), "identities missing"


def test_offline_failure_is_fast_and_names_alternative(no_download, tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load("mnist", "train", data_dir=str(tmp_path))
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 10.0, f"offline failure took {elapsed:.1f} s"
    assert "mnist5k" in message and str(tmp_path) in message, f"unhelpful message: {message}"
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert not no_download.called, "tried to download although downloading is off"


def test_opted_in_download_failure_is_reported_as_unavailable(monkeypatch, tmp_path):
    failing = mock.Mock(side_effect=ConnectionError("no route to host"))
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", failing):
        with pytest.raises(data.DatasetUnavailableError, match="digits"):
            data.load("cifar10", "train", data_dir=str(tmp_path), download=True)
    assert failing.called, "download=True did not try to download"


def test_download_env_var_opts_in(monkeypatch):
    monkeypatch.setenv(tfds_source.DOWNLOAD_ENV, "1")
    assert tfds_source.download_requested(None), "DPFED_DOWNLOAD=1 was ignored"


def test_emnist_conversion_undoes_tfds_transpose():
    image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    images, _, _ = tfds_source.TFDS_DATASETS["emnist"].convert([{"image": image, "label": 1}])
    np.testing.assert_allclose(
        images[0], image.transpose(1, 0, 2) / 255.0, rtol=1e-6, err_msg="EMNIST not transposed"
    )


def test_celeba_downsample_averages_center_blocks():
    photos = np.random.default_rng(0).integers(0, 256, (1, 218, 178, 3), dtype=np.uint8)
    small = tfds_source.celeba_downsample(photos)
    top, left = (218 - 160) // 2, (178 - 160) // 2
    block = photos[0, top : top + 5, left : left + 5].astype(np.float64).mean(axis=(0, 1)) / 255
    np.testing.assert_allclose(small[0, 0, 0], block, rtol=1e-6, err_msg="top-left block mean")


def test_records_are_converted_chunk_by_chunk_into_place(monkeypatch):
    monkeypatch.setattr(tfds_source, "_CHUNK", 4)  # 10 records: chunks of 4, 4 and 2
    source = [{"image": np.full((2, 2, 1), i, np.uint8), "label": i} for i in range(10)]
    images, labels, users = tfds_source.read_converted(source, tfds_source._image_label)
    np.testing.assert_array_equal(labels, np.arange(10), err_msg="labels out of place")
    np.testing.assert_allclose(images[:, 0, 0, 0], np.arange(10) / 255.0, rtol=1e-6,
                               err_msg="each chunk's images must land at its records' rows")
    assert users is None, "records without users give no user ids"


def test_download_false_overrides_the_env_var(monkeypatch):
    monkeypatch.setenv(tfds_source.DOWNLOAD_ENV, "1")
    assert tfds_source.download_requested(False) is False, (
        "an explicit download=False must win over DPFED_DOWNLOAD=1")


def test_mock_emnist_is_the_47_class_balanced_split(prepared_mock, tmp_path):
    ds = data.load("emnist", "train", data_dir=str(tmp_path))
    assert ds.num_classes == 47, f"EMNIST balanced has 47 classes, got {ds.num_classes}"
