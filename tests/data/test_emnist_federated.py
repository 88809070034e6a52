"""Tests of the TFF federated EMNIST HDF5 loader (dpfed.data.emnist_federated)."""

import h5py
import numpy as np
import pytest

from dpfed.data import DatasetUnavailableError, bugs
from dpfed.data import emnist_federated as femnist


def _write_tiny_h5(path, sizes=None):
    """Writes TFF's layout: examples/<writer>/pixels [n, 28, 28] (1 = white) and label [n]."""
    sizes = sizes or {"f0001_07": 3, "f0000_14": 1}
    rng = np.random.default_rng(0)
    written = {}
    with h5py.File(path, "w") as f:
        for writer, n in sizes.items():
            pixels = rng.uniform(size=(n, 28, 28)).astype(np.float32)
            labels = rng.integers(0, 62, size=n).astype(np.int32)
            labels[0] = 40  # a lower-case letter: merged to 14
            f.create_dataset(f"examples/{writer}/pixels", data=pixels)
            f.create_dataset(f"examples/{writer}/label", data=labels)
            written[writer] = (pixels, labels)
    return written


def test_loads_writers_as_padded_clients(tmp_path):
    path = tmp_path / "fed_emnist_train.h5"
    written = _write_tiny_h5(path)
    loaded = femnist.load_federated_emnist(path, merge_letter_case=False)
    assert loaded.client_ids == ["f0000_14", "f0001_07"], f"clients {loaded.client_ids}"
    fed = loaded.data
    assert fed.images.shape == (2, 3, 28, 28, 1), f"images shape {fed.images.shape}"
    np.testing.assert_array_equal(fed.counts, [1, 3], err_msg="counts per writer")
    pixels, labels = written["f0001_07"]
    np.testing.assert_allclose(
        fed.images[1, :, :, :, 0], 1.0 - pixels, err_msg="pixels must become 0 = background"
    )
    np.testing.assert_array_equal(fed.labels[1], labels, err_msg="labels of writer f0001_07")
    assert np.all(fed.images[0, 1:] == 0), "padding slots must be zero"
    assert loaded.num_classes == 62, f"num_classes {loaded.num_classes}"


def test_merges_letter_case_to_36_classes(tmp_path):
    path = tmp_path / "f.h5"
    _write_tiny_h5(path)
    loaded = femnist.load_federated_emnist(path)
    assert loaded.num_classes == 36, f"num_classes {loaded.num_classes}"
    assert loaded.data.labels[0, 0] == 14, "label 40 ('o') must merge into 14 ('O')"
    assert loaded.data.labels.max() < 36, "a merged label is out of range"


def test_caps_clients_and_examples(tmp_path):
    path = tmp_path / "f.h5"
    _write_tiny_h5(path, {"a": 5, "b": 2, "c": 4})
    loaded = femnist.load_federated_emnist(path, max_clients=2, max_examples_per_client=3)
    assert loaded.client_ids == ["a", "b"], f"clients {loaded.client_ids}"
    np.testing.assert_array_equal(loaded.data.counts, [3, 2], err_msg="capped counts")


def test_output_feeds_the_inversion_bug(tmp_path):
    path = tmp_path / "f.h5"
    _write_tiny_h5(path)
    fed = femnist.load_federated_emnist(path).data
    buggy_fed, buggy = bugs.inject_inversion(fed, 1.0, seed=0)
    assert buggy.all(), "fraction 1 makes every writer buggy"
    np.testing.assert_allclose(buggy_fed.images[fed.mask], 1.0 - fed.images[fed.mask])


def test_missing_file_names_the_embedded_alternative(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="mnist5k"):
        femnist.load_federated_emnist(tmp_path / "absent.h5")


def test_wrong_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 28, 28)))
    with pytest.raises(DatasetUnavailableError, match="examples"):
        femnist.load_federated_emnist(path)


def test_merge_case():
    np.testing.assert_array_equal(
        femnist.merge_case(np.array([3, 10, 35, 36, 61])), [3, 10, 35, 10, 35]
    )


def test_writer_ids_lists_the_writers_in_id_order(tmp_path):
    path = tmp_path / "f.h5"
    _write_tiny_h5(path, {"c": 1, "a": 2, "b": 1})
    assert femnist.writer_ids(path) == ["a", "b", "c"], (
        f"writer_ids must list the file's writers sorted by id: {femnist.writer_ids(path)}"
    )


def test_reads_only_the_chosen_writers_in_the_order_asked(tmp_path):
    path = tmp_path / "f.h5"
    written = _write_tiny_h5(path, {"a": 5, "b": 2, "c": 4})
    loaded = femnist.load_federated_emnist(path, client_ids=["c", "a"], merge_letter_case=False)
    assert loaded.client_ids == ["c", "a"], f"client_ids= must choose the writers: {loaded}"
    np.testing.assert_array_equal(loaded.data.counts, [4, 5], err_msg="counts of c and a")
    np.testing.assert_array_equal(
        loaded.data.labels[0, :4], written["c"][1], err_msg="row 0 must hold writer c's labels"
    )
    capped = femnist.load_federated_emnist(path, client_ids=["c", "a"], max_clients=1)
    assert capped.client_ids == ["c"], f"max_clients keeps the first chosen: {capped.client_ids}"


@pytest.mark.parametrize(
    "client_ids, message",
    [(["a", "zz"], "no writer 'zz'"), (["a", "a"], "repeat"), ([], "at least one")],
)
def test_bad_client_ids_are_a_clear_error(tmp_path, client_ids, message):
    path = tmp_path / "f.h5"
    _write_tiny_h5(path, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match=message):
        femnist.load_federated_emnist(path, client_ids=client_ids)


def test_a_field_of_a_writer_is_not_a_writer(tmp_path):
    # h5py's `"a/label" in group` is True: the check must compare writer names only.
    path = tmp_path / "f.h5"
    _write_tiny_h5(path, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="no writer 'a/label'"):
        femnist.load_federated_emnist(path, client_ids=["a/label"])


def test_digits_only_file_has_10_classes_and_keeps_its_labels(tmp_path):
    path = tmp_path / "fed_emnist_digitsonly_train.h5"
    labels = np.array([0, 3, 9], np.int32)
    with h5py.File(path, "w") as f:
        f.create_dataset("examples/a/pixels", data=np.zeros((3, 28, 28), np.float32))
        f.create_dataset("examples/a/label", data=labels)
    loaded = femnist.load_federated_emnist(path, only_digits=True)  # merge_letter_case default
    assert loaded.num_classes == 10, f"a digits-only file has 10 classes, got {loaded.num_classes}"
    np.testing.assert_array_equal(loaded.data.labels[0], labels, err_msg="digit labels changed")
