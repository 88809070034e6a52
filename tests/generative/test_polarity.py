"""Tests of the polarity check (dpfed.generative.polarity) on known inputs."""

import numpy as np
import pytest

from dpfed import data
from dpfed.data import bugs
from dpfed.generative import polarity


def _mnist5k_test():
    return np.asarray(data.load("mnist5k", "test").images)


def test_healthy_mnist5k_is_not_inverted():
    fraction = polarity.inverted_fraction(_mnist5k_test())
    assert fraction == 0.0, f"{fraction:.3f} of healthy mnist5k digits called inverted"


def test_inverted_mnist5k_is_inverted():
    fraction = polarity.inverted_fraction(bugs.invert_images(_mnist5k_test()))
    assert fraction == 1.0, f"only {fraction:.3f} of inverted mnist5k digits called inverted"


def test_mixture_fraction_in_gan_range():
    images = 2.0 * _mnist5k_test()[:100] - 1.0  # [-1, 1], like the GAN's samples
    images[:30] = -images[:30]
    fraction = polarity.inverted_fraction(images, value_range=(-1.0, 1.0))
    assert fraction == pytest.approx(0.3), f"30 of 100 inverted, got {fraction}"


def test_noisy_inverted_images_are_still_inverted():
    rng = np.random.default_rng(0)
    images = bugs.invert_images(_mnist5k_test()[:200])
    noisy = np.clip(images + rng.normal(0.0, 0.3, images.shape), 0.0, 1.0)
    assert polarity.inverted_fraction(noisy) == 1.0, "speckle must not flip the polarity call"


def test_border_brightness_of_constant_images():
    images = np.stack([np.zeros((28, 28)), np.ones((28, 28)), np.full((28, 28), 0.25)])
    np.testing.assert_allclose(
        polarity.border_brightness(images), [0.0, 1.0, 0.25], err_msg="frame mean of constants"
    )


def test_border_ignores_the_centre():
    images = np.zeros((1, 28, 28))
    images[0, 2:-2, 2:-2] = 1.0  # a white centre, black 2-pixel frame
    assert not polarity.is_inverted(images)[0], "only the frame decides the polarity"


def test_bad_border_is_an_error():
    with pytest.raises(ValueError, match="border"):
        polarity.border_brightness(np.zeros((1, 28, 28)), border=14)


def test_the_frame_is_exactly_the_outer_border_pixels():
    images = np.ones((2, 28, 28))
    for value, image in zip((0.0, 1.0), images, strict=True):
        image[:] = 1.0 - value
        image[:2], image[-2:], image[:, :2], image[:, -2:] = value, value, value, value
    np.testing.assert_array_equal(
        polarity.border_brightness(images), [0.0, 1.0],
        err_msg="a 2-pixel frame must hold the outer 2 rows and columns and nothing inside")


def test_border_brightness_maps_the_gan_range_to_the_unit_range():
    images = np.stack([np.full((28, 28), v) for v in (-1.0, 0.0, 1.0)])
    np.testing.assert_allclose(
        polarity.border_brightness(images, value_range=(-1.0, 1.0)), [0.0, 0.5, 1.0],
        err_msg="value_range (-1, 1): black -1 must map to 0, white 1 to 1")


def test_a_frame_lit_exactly_half_is_not_inverted():
    # "Inverted only if more than half of its frame's intensity range is lit."
    assert not polarity.is_inverted(np.full((1, 28, 28), 0.5))[0], (
        "frame brightness exactly 0.5 is not more than half: not inverted")
