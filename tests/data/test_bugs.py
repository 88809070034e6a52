"""Tests of the simulated pipeline bugs (dpfed.data.bugs), after Augenstein et al. 2020."""

import numpy as np
import pytest

from dpfed import data
from dpfed.data import bugs


def _fed(num_clients=10, max_n=3):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(num_clients * 2, 2, 2, 1)).astype(np.float32)
    labels = np.zeros(num_clients * 2, np.int32)
    # Client c holds 1 or 2 examples, so every client has padding when max_n=3.
    parts = [np.arange(2 * c, 2 * c + 1 + c % 2) for c in range(num_clients)]
    return data.to_federated(images, labels, parts, max_n=max_n)


@pytest.mark.parametrize(
    "value_range, x, expected",
    [
        ((0.0, 1.0), [0.0, 0.2, 1.0], [1.0, 0.8, 0.0]),
        ((-1.0, 1.0), [-1.0, 0.3, 1.0], [1.0, -0.3, -1.0]),
    ],
)
def test_invert_images_swaps_black_and_white(value_range, x, expected):
    np.testing.assert_allclose(
        bugs.invert_images(np.array(x), value_range),
        expected,
        atol=1e-7,
        err_msg=f"inversion in {value_range} must be lo + hi - x",
    )


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.5, 5), (0.26, 3), (1.0, 10)])
def test_choose_buggy_clients_picks_exactly_the_fraction(fraction, expected):
    mask = bugs.choose_buggy_clients(10, fraction, seed=1)
    assert mask.sum() == expected, f"fraction {fraction} of 10 gave {mask.sum()} buggy clients"


def test_choose_buggy_clients_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        bugs.choose_buggy_clients(10, 1.5, seed=0)


def test_inject_inversion_inverts_exactly_the_buggy_clients_real_images():
    fed = _fed()
    buggy_fed, buggy = bugs.inject_inversion(fed, 0.5, seed=3)
    mask = fed.mask
    for c in range(fed.num_clients):
        real_before, real_after = fed.images[c][mask[c]], buggy_fed.images[c][mask[c]]
        expected = 1.0 - real_before if buggy[c] else real_before
        np.testing.assert_allclose(
            real_after, expected, atol=1e-6, err_msg=f"client {c} (buggy={buggy[c]})"
        )
    assert np.all(buggy_fed.images[~mask] == 0), "padding slots must stay 0"
    assert buggy.sum() == 5, f"{buggy.sum()} buggy clients, expected 5"


def test_inject_inversion_keeps_labels_counts_and_input():
    fed = _fed()
    original = fed.images.copy()
    buggy_fed, _ = bugs.inject_inversion(fed, 1.0, seed=0)
    np.testing.assert_array_equal(buggy_fed.labels, fed.labels, err_msg="labels changed")
    np.testing.assert_array_equal(buggy_fed.counts, fed.counts, err_msg="counts changed")
    np.testing.assert_array_equal(fed.images, original, err_msg="the input was modified")
    assert buggy_fed.images.dtype == fed.images.dtype, "dtype changed"


def test_drop_space_after_punctuation_on_known_string():
    got = bugs.drop_space_after_punctuation("My lord, what say you?  I am here. Go; now!")
    assert got == "My lord,what say you?I am here.Go;now!", f"got {got!r}"


def test_drop_space_after_punctuation_keeps_other_spaces_and_lines():
    text = "to be or not\nto be"
    assert bugs.drop_space_after_punctuation(text) == text, "only spaces after punctuation go"


def test_inject_text_bug_changes_only_buggy_clients():
    texts = [f"client {i}, hello" for i in range(4)]
    out, buggy = bugs.inject_text_bug(texts, 0.5, seed=2)
    assert buggy.sum() == 2, f"{buggy.sum()} buggy clients, expected 2"
    for i, (before, after) in enumerate(zip(texts, out, strict=True)):
        expected = f"client {i},hello" if buggy[i] else before
        assert after == expected, f"client {i} (buggy={buggy[i]}): {after!r}"


@pytest.mark.parametrize(
    "images, value_range",
    [
        (np.array([0, 200, 255, 30], np.uint8), (0.0, 1.0)),  # 0..255 pixels, [0, 1] range
        (np.array([-1.0, -0.5, 0.5, 1.0], np.float32), (0.0, 1.0)),  # [-1, 1] images
    ],
)
def test_inject_inversion_refuses_images_outside_the_value_range(images, value_range):
    fed = data.to_federated(images.reshape(4, 1, 1, 1), np.zeros(4, np.int32),
                            [np.array([0, 1]), np.array([2, 3])])
    with pytest.raises(ValueError, match="value_range"):
        bugs.inject_inversion(fed, 1.0, seed=0, value_range=value_range)


def test_inject_inversion_keeps_uint8_images_in_their_range():
    images = np.array([0, 200, 255, 30], np.uint8).reshape(4, 1, 1, 1)
    fed = data.to_federated(images, np.zeros(4, np.int32), [np.array([0, 1]), np.array([2, 3])])
    out, _ = bugs.inject_inversion(fed, 1.0, seed=0, value_range=(0, 255))
    assert out.images.ravel().tolist() == [255, 55, 0, 225], out.images.ravel().tolist()
