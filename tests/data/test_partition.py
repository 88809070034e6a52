"""Tests of the federated partitioners and of `to_federated` padding."""

import numpy as np
import pytest

from dpfed import data
from dpfed.data import partition

LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples, 100 per class.


def _assert_exact_cover(parts, num_examples):
    flat = np.concatenate(parts)
    assert flat.size == num_examples, f"{flat.size} indices for {num_examples} examples"
    assert np.array_equal(np.sort(flat), np.arange(num_examples)), "an example is lost or repeated"


def _partitions():
    return {
        "iid": data.partition_iid(1000, 7, seed=0),
        "dirichlet": data.partition_dirichlet(LABELS, 7, alpha=0.5, seed=0),
        "dirichlet_mix": data.partition_dirichlet_mix(LABELS, 7, alpha=0.5, seed=0),
        "natural": data.partition_natural(np.arange(1000) % 7),
    }


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "dirichlet_mix", "natural"])
def test_every_example_in_exactly_one_client(kind):
    _assert_exact_cover(_partitions()[kind], 1000)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in data.partition_iid(1003, 10, seed=1)]
    assert max(sizes) - min(sizes) <= 1, f"iid sizes {sizes}"


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: data.partition_iid(1000, 9, seed),
        lambda seed: data.partition_dirichlet(LABELS, 9, 0.3, seed),
        lambda seed: data.partition_dirichlet_mix(LABELS, 9, 0.3, seed),
    ],
    ids=["iid", "dirichlet", "dirichlet_mix"],
)
def test_same_seed_same_partition_other_seed_differs(make):
    first, again, other = make(3), make(3), make(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)), "not reproducible"
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True)), (
        "seed has no effect"
    )


def _class_fractions(parts) -> np.ndarray:
    """`[clients, 10]`: each client's fraction of its examples in each class."""
    return np.array([np.bincount(LABELS[p], minlength=10) / len(p) for p in parts])


SPLITS = {"dirichlet": data.partition_dirichlet, "dirichlet_mix": data.partition_dirichlet_mix}


@pytest.mark.parametrize("kind", SPLITS)
def test_dirichlet_small_alpha_skews_labels(kind):
    share = float(np.mean(_class_fractions(SPLITS[kind](LABELS, 10, 0.05, seed=0)).max(1)))
    assert share > 0.4, f"alpha=0.05: top class holds {share:.2f} of a client, want skew (IID 0.1)"


def test_dirichlet_large_alpha_is_near_uniform():
    parts = data.partition_dirichlet(LABELS, 10, 1000.0, seed=0)
    worst = np.abs(_class_fractions(parts) - 0.1).max()
    assert worst < 0.06, f"alpha=1000: a class share is {worst:.3f} off the uniform 0.1"


def test_dirichlet_mix_large_alpha_is_near_uniform():
    # Each client of 100 draws its classes ~ the prior: a class's share is off 0.1 by the
    # sampling noise of 100 draws (std 0.03), not by a skew.
    parts = data.partition_dirichlet_mix(LABELS, 10, 1000.0, seed=0)
    off = float(np.mean(np.abs(_class_fractions(parts) - 0.1)))
    assert off < 0.04, f"alpha=1000: class shares are {off:.3f} off the uniform 0.1 on average"


def test_dirichlet_mix_gives_equal_sizes_even_to_many_clients():
    # (partition_dirichlet finds no split without an empty client here:
    # tests/experiments/test_fedavg_classifier.py)
    sizes = [len(p) for p in data.partition_dirichlet_mix(LABELS, 400, 0.1, seed=0)]
    assert min(sizes) >= 2 and max(sizes) <= 3, f"1,000 examples over 400 clients: {sizes[:9]}"


def test_dirichlet_mix_follows_the_class_frequencies():
    # A rare class (1 in 10 examples) stays rare overall; the prior p of Dir(alpha p) is
    # the dataset's class mix, so no client leans to it more than to a common class.
    # The first 10 clients only: under a uniform prior the rare class would run out after 5
    # clients and the mean over many clients would look right again.
    labels = np.repeat([0, 1], [900, 100])
    parts = data.partition_dirichlet_mix(labels, 50, 1000.0, seed=0)
    shares = np.array([np.mean(labels[p] == 1) for p in parts[:10]])
    assert abs(shares.mean() - 0.1) < 0.05, (
        f"the rare class's mean share {shares.mean():.3f} (0.5 under a uniform prior)")


def test_dirichlet_mix_parameters_sum_to_alpha():
    # Dir(alpha p), not Dir(alpha x num_clients x p) as partition_dirichlet's per-class
    # split: at alpha 1 over 10 classes a client is mostly one class (about 0.6; the
    # scale of 10 clients would give Dir(1, ..., 1) and about 0.3).
    share = np.mean([_class_fractions(data.partition_dirichlet_mix(LABELS, 10, 1.0, seed)).max(1)
                     for seed in range(5)])
    assert share > 0.45, f"alpha=1: the top class holds {share:.2f} of a client on average"


def test_dirichlet_mix_draws_each_class_in_random_order():
    # One class, 2 clients: the first is a random half, not the first 500 examples.
    parts = [data.partition_dirichlet_mix(np.zeros(1000, int), 2, 1.0, seed)[0] for seed in (0, 1)]
    assert not np.array_equal(parts[0], np.arange(500)), "the class's examples were not shuffled"
    assert not np.array_equal(parts[0], parts[1]), "the seed does not change the draw"


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "dirichlet_mix", "natural"])
def test_each_client_holds_its_indices_in_increasing_order(kind):
    for i, part in enumerate(_partitions()[kind]):
        assert np.all(np.diff(part) > 0), f"{kind}: client {i}'s indices are not increasing"


def test_a_client_whose_classes_ran_out_draws_from_the_classes_left():
    counts = partition._client_class_counts(
        5, np.array([1.0, 0.0, 0.0]), np.array([2, 0, 7]), np.random.default_rng(0))
    np.testing.assert_array_equal(counts, [2, 0, 3], err_msg=(
        "the mix wants class 0 only: its 2 left, then the rest from class 2 (class 1 is empty)"))


def test_dirichlet_respects_min_size():
    parts = data.partition_dirichlet(LABELS, 20, 0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10, f"sizes {[len(p) for p in parts]}"


def test_natural_groups_by_id_in_stable_order():
    parts = data.partition_natural(np.array(["b", "a", "b", "c", "a"]))
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]], f"groups {parts}"


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: data.partition_iid(10, 0, 0), "num_clients"),
        (lambda: data.partition_iid(10, 11, 0), "num_clients"),
        (lambda: data.partition_dirichlet(LABELS, 0, 1.0, 0), "num_clients"),
        (lambda: data.partition_dirichlet(LABELS, 5, 0.0, 0), "alpha"),
        (lambda: data.partition_dirichlet(LABELS, 5, 1.0, 0, min_size=300), "min_size"),
        (lambda: data.partition_dirichlet_mix(LABELS, 1001, 1.0, 0), "num_clients"),
        (lambda: data.partition_dirichlet_mix(LABELS, 5, 0.0, 0), "alpha"),
        (lambda: data.partition_dirichlet_mix(LABELS[:, None], 5, 1.0, 0), "1-D"),
    ],
)
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def _small_federated(max_n=None):
    images = np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1, 1)
    labels = np.array([1, 2, 3, 4, 5, 6])
    return data.to_federated(images, labels, [np.array([0, 3, 5]), np.array([2])], max_n=max_n)


def test_to_federated_shapes_and_counts():
    fed = _small_federated(max_n=4)
    assert fed.images.shape == (2, 4, 1, 1, 1) and fed.labels.shape == (2, 4), "bad shapes"
    assert fed.counts.tolist() == [3, 1] and fed.counts.dtype == np.int32, f"counts {fed.counts}"
    assert fed.num_clients == 2, f"num_clients {fed.num_clients}"


def test_to_federated_places_client_examples_in_order():
    fed = _small_federated()
    assert fed.labels.tolist() == [[1, 4, 6], [3, 0, 0]], f"labels {fed.labels.tolist()}"
    assert fed.images[0, :, 0, 0, 0].tolist() == [1.0, 4.0, 6.0], "client 0 images misplaced"


def test_padding_is_zero_and_masked_out():
    fed = _small_federated(max_n=4)
    assert fed.mask.tolist() == [[True, True, True, False], [True, False, False, False]], (
        f"mask {fed.mask}"
    )
    assert not fed.images[~fed.mask].any() and not fed.labels[~fed.mask].any(), "padding not 0"


def test_to_federated_refuses_to_drop_examples():
    with pytest.raises(ValueError, match="max_n"):
        _small_federated(max_n=2)


@pytest.mark.parametrize("parts,where", [
    ([np.array([0, 3]), np.array([3, 5])], "clients \\[0, 1\\]"),  # in two clients
    ([np.array([0, 3, 3]), np.array([5])], "clients \\[0\\]"),  # twice in one client
])
def test_to_federated_refuses_an_example_given_twice(parts, where):
    # Its data would count in two clients (or twice in one): one user's records must be
    # in one client for user-level DP to hold.
    with pytest.raises(ValueError, match=f"example 3 is given 2 times \\({where}"):
        data.to_federated(np.zeros((6, 1, 1, 1)), np.zeros(6, np.int32), parts)
