"""Teacher partitions of DataLens: disjoint, covering, no reuse, one partition per change, eps."""

import numpy as np
import pytest

from dpfed.generative.datalens import (
    PARTITION_RELATIONS,
    DataLensConfig,
    partition_teachers,
    public_partition_sizes,
)
from dpfed.generative.datalens.training import new_ledger


def _unbalanced(n=503, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.zeros(400), np.ones(90), np.full(13, 2)]).astype(np.int32)
    images = rng.random((n, 4, 4, 1), dtype=np.float32)
    return images, labels


@pytest.mark.parametrize("scheme", list(PARTITION_RELATIONS))
@pytest.mark.parametrize("num_teachers", [1, 7, 50, 503])
def test_every_example_in_exactly_one_partition_with_unbalanced_classes(scheme, num_teachers):
    images, labels = _unbalanced()
    parts = partition_teachers(images, labels, num_teachers, seed=3, scheme=scheme)
    assert len(parts) == num_teachers
    counts = np.bincount(np.concatenate(parts), minlength=len(labels))
    np.testing.assert_array_equal(counts, 1)  # disjoint, covering, nothing reused


def test_balanced_sizes_differ_by_at_most_one():
    images, labels = _unbalanced()
    sizes = [len(p) for p in partition_teachers(images, labels, 50, seed=1, scheme="balanced")]
    assert max(sizes) - min(sizes) <= 1


def test_hash_partition_add_or_remove_changes_one_partition():
    images, labels = _unbalanced()
    parts = partition_teachers(images, labels, 20, seed=5, scheme="hash")
    removed = 123
    keep = np.delete(np.arange(len(labels)), removed)
    smaller = partition_teachers(images[keep], labels[keep], 20, seed=5, scheme="hash")
    as_sets = [set(p.tolist()) for p in parts]
    smaller_sets = [set(keep[p].tolist()) for p in smaller]
    changed = [t for t in range(20) if as_sets[t] != smaller_sets[t]]
    assert len(changed) == 1 and removed in as_sets[changed[0]]
    assert as_sets[changed[0]] - {removed} == smaller_sets[changed[0]]


def test_balanced_partition_replace_changes_one_partition():
    images, labels = _unbalanced()
    parts = partition_teachers(images, labels, 20, seed=5, scheme="balanced")
    replaced_images, replaced_labels = images.copy(), labels.copy()
    replaced_images[7] = 1.0 - replaced_images[7]
    replaced_labels[7] = 2
    other = partition_teachers(replaced_images, replaced_labels, 20, seed=5, scheme="balanced")
    for a, b in zip(parts, other, strict=True):
        np.testing.assert_array_equal(a, b)  # positions only: the content does not matter


def test_more_teachers_than_examples_is_refused():
    images, labels = _unbalanced()
    with pytest.raises(ValueError, match="num_teachers=504"):
        partition_teachers(images, labels, 504, seed=0)


@pytest.mark.parametrize("scheme", list(PARTITION_RELATIONS))
def test_images_and_labels_of_different_lengths_are_refused(scheme):
    # Unchecked, both schemes split range(len(labels)): the extra image would be in no
    # partition, silently left out of training.
    images, labels = _unbalanced()
    extra = np.concatenate([images, images[:1]])
    with pytest.raises(ValueError, match=r"images \(504\) and labels \(503\) differ") as error:
        partition_teachers(extra, labels, 5, seed=0, scheme=scheme)
    assert "differ in length" in str(error.value), f"the refusal must say why: {error.value}"


def test_unknown_scheme_is_refused():
    images, labels = _unbalanced()
    with pytest.raises(ValueError, match="scheme"):
        partition_teachers(images, labels, 5, seed=0, scheme="class_balanced")


def test_published_sizes_depend_on_n_and_t_alone():
    images, labels = _unbalanced()
    sizes = [len(p) for p in partition_teachers(images, labels, 7, 0, "balanced")]
    assert public_partition_sizes("balanced", 503, 7) == {"min": min(sizes), "max": max(sizes)}
    assert public_partition_sizes("hash", 10, 4) == {"expected": 2.5}, (
        "hash sizes count private records: only N/T may be published")
    with pytest.raises(ValueError, match="scheme"):
        public_partition_sizes("classes", 10, 4)


def test_balanced_and_hash_ledgers_report_the_same_eps():
    """One vote vector moves by at most sqrt(4k) under either relation: the same eps."""
    reports = {}
    for scheme in ("hash", "balanced"):
        config = DataLensConfig(partition=scheme)
        ledger = new_ledger(config, 4000)
        ledger.record(config.topagg().dp_event(), count=1900)
        reports[scheme] = ledger.to_json()
    assert reports["balanced"]["neighboring_relation"] == "replace_one"
    for key in ("epsilon_rdp", "epsilon_pld"):
        assert reports["balanced"][key] == pytest.approx(reports["hash"][key], rel=1e-9), (
            f"{key}: balanced (replace-one) must not double the votes' sensitivity")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hash_sizes_are_near_n_over_t_and_each_teacher_holds_the_big_classes(seed):
    # A hash of the label alone (or of too little of the record) would still be disjoint,
    # but would give whole classes to single teachers and leave others empty.
    images, labels = _unbalanced()
    n, t = len(labels), 7
    parts = partition_teachers(images, labels, t, seed=seed, scheme="hash")
    sizes = np.array([len(p) for p in parts])
    spread = 5 * np.sqrt(n / t * (1 - 1 / t))  # 5 std of Binomial(N, 1/T)
    assert np.all(np.abs(sizes - n / t) <= spread), (
        f"hash partition sizes {sizes} are not about Binomial({n}, 1/{t})")
    for teacher, part in enumerate(parts):
        held = set(labels[part].tolist())
        assert {0, 1} <= held, f"teacher {teacher} lacks a class of 400 or 90 records: {held}"


@pytest.mark.parametrize("scheme", list(PARTITION_RELATIONS))
def test_the_partition_changes_with_the_seed(scheme):
    images, labels = _unbalanced()
    first, second = (partition_teachers(images, labels, 7, seed=s, scheme=scheme) for s in (0, 1))
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True)), (
        f"{scheme}: another seed gave the same partition; the seed is the public key")
