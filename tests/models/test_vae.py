"""Tests of the DPD-fVAE conditional VAE (dpfed.models.vae)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.models import vae
from tests import jitted

_ENCODER = vae.Encoder(num_classes=3, latent_dim=2, features=(4, 8))
_DECODER = vae.Decoder(num_classes=3, image_shape=(8, 8, 1), features=(8, 4))

# The decoder's images as one program, not op by op (~100 eager compilations a test).
_generate = jax.jit(vae.generate, static_argnums=0, static_argnames="latent_dim")


def test_decoder_makes_images_in_unit_range_for_each_label():
    _, params = vae.init_vae(_ENCODER, _DECODER, jax.random.key(0))
    labels = jnp.array([0, 1, 2, 2])
    images = _generate(_DECODER, params, jax.random.key(1), labels, latent_dim=2)
    assert images.shape == (4, 8, 8, 1), f"decoder output shape {images.shape}"
    assert float(images.min()) >= 0 and float(images.max()) <= 1, "sigmoid output leaves [0, 1]"
    same_z = jitted.apply(_DECODER, params, jnp.zeros((2, 2)), jnp.array([0, 1]))
    assert not np.allclose(same_z[0], same_z[1]), "the label does not condition the decoder"


def test_transposed_decoder_has_the_same_output_shape():
    decoder = vae.Decoder(3, (8, 8, 1), (8, 4), transposed=True)
    _, params = vae.init_vae(_ENCODER, decoder, jax.random.key(0))
    images = _generate(decoder, params, jax.random.key(1), jnp.array([0, 1]), latent_dim=2)
    assert images.shape == (2, 8, 8, 1), f"ConvT decoder output shape {images.shape}"


def test_depth_to_space_puts_channel_group_ij_at_pixel_2h_plus_i_2w_plus_j():
    x = jnp.arange(1 * 2 * 2 * 8, dtype=jnp.float32).reshape((1, 2, 2, 8))
    y = vae.depth_to_space(x)
    assert y.shape == (1, 4, 4, 2)
    for h, w, i, j in [(0, 0, 0, 1), (1, 0, 1, 0), (1, 1, 1, 1)]:
        group = x[0, h, w, (2 * i + j) * 2 : (2 * i + j + 1) * 2]
        assert np.array_equal(y[0, 2 * h + i, 2 * w + j], group), f"pixel {(h, w, i, j)}"


def test_decoder_rejects_a_shape_its_upsampling_cannot_make():
    with pytest.raises(ValueError, match="divisible by 4"):
        vae.Decoder(3, (10, 10, 1), (8, 4))


def test_loss_is_summed_squared_error_plus_beta_kl():
    enc_params, dec_params = vae.init_vae(_ENCODER, _DECODER, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(2), (3, 8, 8, 1))
    labels = jnp.array([0, 1, 2])
    noise = jax.random.normal(jax.random.key(3), (3, 2))

    @jax.jit  # one program, not op by op
    def losses_and_want(enc_params, dec_params, images, labels, noise):
        losses = vae.example_losses(
            _ENCODER, _DECODER, enc_params, dec_params, images, labels, noise, beta=0.5)
        mu, logvar = _ENCODER.apply(enc_params, images, labels)
        recon = _DECODER.apply(dec_params, mu + jnp.exp(0.5 * logvar) * noise, labels)
        return losses, jnp.sum(jnp.square(recon - images), axis=(1, 2, 3))

    (loss, squared_error, kl), want = losses_and_want(
        enc_params, dec_params, images, labels, noise)
    np.testing.assert_allclose(squared_error, want, rtol=1e-5, err_msg="not a summed SE")
    np.testing.assert_allclose(loss, squared_error + 0.5 * kl, rtol=1e-6)
    assert float(vae.kl_to_standard_normal(jnp.zeros((1, 2)), jnp.zeros((1, 2)))[0]) == 0.0
    assert bool(jnp.all(kl >= 0)), "KL must be >= 0"


def test_kl_to_standard_normal_of_known_gaussians():
    # KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - log s^2) / 2 per dimension, summed.
    mu = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    logvar = jnp.array([[0.0, 0.0], [np.log(4.0), 0.0]])
    want = [(1.0 + 4.0) / 2, (4.0 - 1.0 - np.log(4.0)) / 2]
    np.testing.assert_allclose(
        vae.kl_to_standard_normal(mu, logvar), want, rtol=1e-6,
        err_msg="KL per row must be the sum over latent dimensions of the Gaussian KL",
    )
