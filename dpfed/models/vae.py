"""The conditional VAE of DPD-fVAE (Pfitzner & Arnrich 2022, arXiv 2211.11591): the small model.

Encoder: Conv(32, 3x3, stride 2) - Conv(64, 3x3, stride 2) - Flatten ++ one-hot label -
Dense(mu), Dense(logvar). Decoder: z ++ one-hot label - Dense((H/4)(W/4) 64) -
ConvT(64, stride 2) - ConvT(32, stride 2) - ConvT(channels), sigmoid. Latent 8 (16 for
CelebA). Widths and latent size are fields, so tests use tiny ones. The loss of one
example is its summed squared error plus beta times the KL divergence of q(z|x, y) from
N(0, I) (beta = 0.01 in the paper).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfed.models.layers import Conv
from dpfed.models.output import output

PyTree = Any


class Encoder(nn.Module):
    """q(z | x, y): images `[N, H, W, C]` in [0, 1] and int labels `[N]` -> (mu, logvar)."""

    num_classes: int
    latent_dim: int = 8
    features: tuple[int, ...] = (32, 64)

    @nn.compact
    def __call__(self, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images
        for width in self.features:
            x = nn.relu(Conv(width, (3, 3), strides=2)(x))
        x = jnp.concatenate(
            [x.reshape((x.shape[0], -1)), jax.nn.one_hot(labels, self.num_classes)], axis=-1)
        return nn.Dense(self.latent_dim, name="mu")(x), nn.Dense(self.latent_dim, name="logvar")(x)


class Decoder(nn.Module):
    """p(x | z, y): latents `[N, latent]` and int labels `[N]` -> images in [0, 1].

    `image_shape` (H, W, C) needs H and W divisible by 2 ** len(features). Each stride-2
    upsampling is, by default, a sub-pixel convolution (Shi et al. 2016): a 2x2 convolution
    to 4x the channels, then `depth_to_space`. It can represent any 3x3 stride-2 transposed
    convolution up to a one-pixel shift of the output (each output phase of one depends on at
    most 2x2 inputs; with SAME padding the transposed convolution's even outputs read inputs
    i-1 and i, the 2x2 convolution's i and i+1: the same function family) and its gradient is
    several times faster on XLA:CPU, whose transposed-convolution gradients (dilated
    convolutions) are slow: ~66 ms vs ~19 ms per decoder gradient at batch 20 here.
    `transposed=True` uses `nn.ConvTranspose` as the paper's code does.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    features: tuple[int, ...] = (64, 32)
    transposed: bool = False

    def __post_init__(self):
        scale = 2 ** len(self.features)
        if self.image_shape[0] % scale or self.image_shape[1] % scale:
            raise ValueError(
                f"image height and width must be divisible by {scale}, got {self.image_shape}")
        super().__post_init__()

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        height, width, channels = self.image_shape
        scale = 2 ** len(self.features)
        x = jnp.concatenate([z, jax.nn.one_hot(labels, self.num_classes)], axis=-1)
        x = nn.relu(nn.Dense((height // scale) * (width // scale) * self.features[0])(x))
        x = x.reshape((x.shape[0], height // scale, width // scale, self.features[0]))
        for features in self.features:
            if self.transposed:
                x = nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding="SAME")(x)
            else:
                x = depth_to_space(Conv(4 * features, (2, 2))(x))
            x = nn.relu(x)
        # A stride-1 transposed convolution is a convolution (with a flipped kernel).
        return nn.sigmoid(Conv(channels, (3, 3))(x))


def depth_to_space(x: jax.Array) -> jax.Array:
    """`[N, H, W, 4C]` -> `[N, 2H, 2W, C]`: channel group (i, j) fills output pixel (2h+i, 2w+j)."""
    n, h, w, c = x.shape
    x = x.reshape((n, h, w, 2, 2, c // 4)).transpose((0, 1, 3, 2, 4, 5))
    return x.reshape((n, 2 * h, 2 * w, c // 4))


def init_vae(
    encoder: Encoder, decoder: Decoder, key: jax.Array
) -> tuple[PyTree, PyTree]:
    """Initial `(encoder_params, decoder_params)` for images of `decoder.image_shape`."""
    enc_key, dec_key = jax.random.split(key)
    images = jnp.zeros((1, *decoder.image_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32)
    encoder_params = jax.jit(encoder.init)(enc_key, images, labels)
    decoder_params = jax.jit(decoder.init)(dec_key, jnp.zeros((1, encoder.latent_dim)), labels)
    return encoder_params, decoder_params


def kl_to_standard_normal(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row: `[N, latent]` -> `[N]`."""
    return -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)


def example_losses(
    encoder: Encoder,
    decoder: Decoder,
    encoder_params: PyTree,
    decoder_params: PyTree,
    images: jax.Array,
    labels: jax.Array,
    noise: jax.Array,
    beta: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example (loss, summed squared error, KL) of a batch, each `[N]`.

    `noise` `[N, latent]` ~ N(0, I) is the reparameterisation noise: z = mu + sigma * noise.
    """
    stats: tuple[jax.Array, jax.Array] = output(encoder, encoder_params, images, labels)
    mu, logvar = stats
    z = mu + jnp.exp(0.5 * logvar) * noise
    recon: jax.Array = output(decoder, decoder_params, z, labels)
    squared_error = jnp.sum(jnp.square(recon - images).reshape((images.shape[0], -1)), axis=-1)
    kl = kl_to_standard_normal(mu, logvar)
    return squared_error + beta * kl, squared_error, kl


def generate(
    decoder: Decoder, decoder_params: PyTree, key: jax.Array, labels: jax.Array, latent_dim: int
) -> jax.Array:
    """Images for `labels` `[N]` from z ~ N(0, I): float32 `[N, H, W, C]` in [0, 1]."""
    z = jax.random.normal(key, (labels.shape[0], latent_dim))
    return output(decoder, decoder_params, z, labels)
