"""Tests for dpfed.models.gan (the DP-FedAvg-GAN networks of Augenstein et al. 2020)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.models import gan
from tests import jitted

_SMALL_D = gan.Discriminator(conv_features=(4, 8), dense_features=16)
_SMALL_G = gan.Generator(dense_features=16, base_features=8, convt_features=(8, 4))
_NOISE_DIM = 8


def _param_shapes(model, *args, **kwargs):
    init = functools.partial(model.init, **kwargs)
    variables = jax.eval_shape(init, jax.random.key(0), *args)
    return jax.tree_util.tree_map(lambda x: x.shape, variables)


def test_discriminator_default_widths_are_the_papers():
    shapes = _param_shapes(gan.Discriminator(), jnp.zeros((1, 28, 28, 1)))["params"]
    got = (
        shapes["StridedConv_0"]["kernel"],
        shapes["StridedConv_1"]["kernel"],
        shapes["Dense_0"]["kernel"],
        shapes["Dense_1"]["kernel"],
    )
    want = ((4, 4, 1, 64), (4, 4, 64, 128), (7 * 7 * 128, 1024), (1024, 1))
    assert got == want, f"D kernels {got}, expected the paper's {want}"


def test_generator_default_widths_are_the_papers():
    shapes = _param_shapes(gan.Generator(), jnp.zeros((2, gan.NOISE_DIM)), train=False)
    params = shapes["params"]
    got = (
        params["Dense_0"]["kernel"],
        params["Dense_1"]["kernel"],
        params["StridedConvTranspose_0"]["kernel"],
        params["StridedConvTranspose_1"]["kernel"],
        params["Conv_0"]["kernel"],
    )
    want = ((128, 1024), (1024, 7 * 7 * 256), (4, 4, 256, 64), (4, 4, 64, 32), (4, 4, 32, 1))
    assert got == want, f"G kernels {got}, expected the paper's {want}"


@pytest.mark.parametrize("size", [28, 14, 8])
def test_strided_conv_equals_flax_conv(size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    kernel = jax.random.normal(jax.random.key(1), (4, 4, 3, 5))
    reference = nn.Conv(5, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)
    want = reference.apply({"params": {"kernel": kernel}}, x)
    got = gan.conv_4x4_stride_2(x, kernel)
    assert got.shape == want.shape, f"shape {got.shape}, nn.Conv gives {want.shape}"
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg="im2col conv != nn.Conv")


@pytest.mark.parametrize("size", [7, 14, 5])
def test_phase_conv_transpose_equals_flax_conv_transpose(size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    kernel = jax.random.normal(jax.random.key(1), (4, 4, 3, 5))
    reference = nn.ConvTranspose(5, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)
    want = reference.apply({"params": {"kernel": kernel}}, x)
    got = gan.conv_transpose_4x4_stride_2(x, kernel)
    assert got.shape == want.shape, f"shape {got.shape}, nn.ConvTranspose gives {want.shape}"
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg="phase convT != nn.ConvTranspose")


def test_discriminator_has_no_batch_statistics():
    variables = gan.init_discriminator(_SMALL_D, jax.random.key(0))
    assert set(variables) == {"params"}, f"D must hold only params, got {set(variables)}"


def test_discriminator_scores_each_image_independently_of_its_batch():
    variables = gan.init_discriminator(_SMALL_D, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1), minval=-1, maxval=1)
    batch_scores = jitted.apply(_SMALL_D, variables, images)
    alone = jitted.apply(_SMALL_D, variables, images[2:3])
    assert batch_scores.shape == (5,), f"D scores have shape {batch_scores.shape}, expected (5,)"
    np.testing.assert_allclose(
        alone[0], batch_scores[2], rtol=1e-5, err_msg="D's score depends on the rest of the batch"
    )


def test_generator_images_are_28x28x1_in_gan_range():
    variables = gan.init_generator(_SMALL_G, jax.random.key(0), _NOISE_DIM)
    noise = jax.random.normal(jax.random.key(1), (6, _NOISE_DIM))
    for train in (False, True):
        images = jitted.generate(_SMALL_G, variables, noise, train=train)
        assert images.shape == (6, 28, 28, 1), f"train={train}: shape {images.shape}"
        assert float(jnp.abs(images).max()) <= 1.0, f"train={train}: images leave [-1, 1]"


def test_generator_eval_sample_does_not_depend_on_its_batch():
    variables = gan.init_generator(_SMALL_G, jax.random.key(0), _NOISE_DIM)
    noise = jax.random.normal(jax.random.key(1), (6, _NOISE_DIM))
    batch = jitted.generate(_SMALL_G, variables, noise, train=False)
    alone = jitted.generate(_SMALL_G, variables, noise[:1], train=False)
    np.testing.assert_allclose(
        alone[0], batch[0], atol=1e-5, err_msg="eval-mode G must use running averages"
    )


def test_generate_does_not_change_running_averages():
    variables = gan.init_generator(_SMALL_G, jax.random.key(0), _NOISE_DIM)
    before = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
    gan.generate(_SMALL_G, variables, jax.random.normal(jax.random.key(1), (4, _NOISE_DIM)), True)
    after = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, before, after)), (
        "generate() must leave batch_stats untouched"
    )


def test_generator_output_reaches_the_black_background_of_the_gan_range():
    # G ends in tanh: images in [-1, 1] with -1 the black background. A sigmoid output
    # (in [0, 1]) can draw nothing darker than mid-grey in the GAN range.
    variables = gan.init_generator(_SMALL_G, jax.random.key(0), _NOISE_DIM)
    noise = jax.random.normal(jax.random.key(1), (6, _NOISE_DIM))
    images = jitted.generate(_SMALL_G, variables, noise)
    assert float(images.min()) < 0.0, (
        f"G's images span [{float(images.min()):.3f}, {float(images.max()):.3f}]: none is "
        "below 0, so G cannot draw the [-1, 1] range's black background (tanh output expected)"
    )


def test_generate_samples_with_the_running_averages_by_default():
    variables = gan.init_generator(_SMALL_G, jax.random.key(0), _NOISE_DIM)
    noise = jax.random.normal(jax.random.key(1), (6, _NOISE_DIM))
    np.testing.assert_array_equal(
        jitted.generate(_SMALL_G, variables, noise),
        jitted.generate(_SMALL_G, variables, noise, train=False),
        err_msg="generate() without train= must sample as train=False (the running "
        "averages), as a user drawing samples from a trained G expects",
    )
