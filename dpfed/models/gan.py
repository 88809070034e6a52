"""The DCGAN-style MNIST/EMNIST networks of DP-FedAvg-GAN.

"Generative Models for Effective ML on Private, Decentralized Datasets" (Augenstein
et al., ICLR 2020) uses the networks of TF-GAN's MNIST example (as ported to Keras in
google-research/federated `gans/`). Images are 28x28x1 in [-1, 1] (-1 = background).

- `Discriminator`: Conv64(4x4, s2)-LeakyReLU-Conv128(4x4, s2)-LeakyReLU-Flatten-
  Dense1024-[LayerNorm]-LeakyReLU-Dense1 (a WGAN critic: one unbounded score).
  The public code has BatchNorm after Dense1024 (PAPERS.md's shorter listing leaves out
  that BatchNorm, the LeakyReLU after Conv128 and G's BN after its ConvTs; the layers
  here follow the public code's Keras networks, read 2026-12-01). D is trained on the
  clients, one client's data at a time under user-level DP, so it must be a function
  of each example alone (a WGAN-GP gradient penalty is per example, and batch statistics would
  mix the examples of a batch): BatchNorm is replaced by LayerNorm, which normalises
  each example by itself (the usual choice for WGAN-GP critics, Gulrajani et al. 2017).
- `Generator`: Dense1024-BN-ReLU-Dense(7*7*256)-BN-ReLU-ConvT64(4x4, s2)-BN-ReLU-
  ConvT32(4x4, s2)-BN-ReLU-Conv1(4x4)-tanh, noise dim 128. G is trained on the server
  only, from noise, so its BatchNorm sees no client data. Its running averages live in
  the `batch_stats` collection: `train=True` normalises with the batch's statistics
  (and updates the averages when `batch_stats` is mutable), `train=False` uses the
  averages, so a sample does not depend on the other samples of its batch.

All widths are attributes, so tests and the CPU demo can shrink the networks; the
defaults are the paper's.

The strided 4x4 convolutions of D and the transposed ones of G are `StridedConv` and
`StridedConvTranspose`: the same functions and `[4, 4, in, out]` kernels as `nn.Conv` /
`nn.ConvTranspose` with SAME padding (tested equal), computed differently. XLA's CPU
backend runs the gradients of strided and transposed convolutions on a slow path, and
worse inside loop bodies (a client's local steps, the engine's loop over clients).
`StridedConv` is one matrix product of strided views of the input (im2col), so D's
gradient-penalty double backward is matrix products; `StridedConvTranspose` is four
stride-1 convolutions over the output's pixel phases. Measured here (2 CPU cores; one
DP-FedAvg-GAN round of 5 clients, 6 D and 6 G steps, D (32, 64)-256, G 128-64-(32, 16)):
1.8 s per round instead of 15.3 s with `nn.Conv`/`nn.ConvTranspose`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfed.models import layers
from dpfed.models.output import output

NOISE_DIM = 128
IMAGE_SHAPE = (28, 28, 1)
LEAKY_SLOPE = 0.01  # the reference networks pass `LeakyReLU(alpha=0.01)` explicitly
# The reference's BatchNorms average over ~1,000 steps (Keras momentum 0.999), short
# beside its 6,000 G steps (1,000 rounds x 6). The runs here are far shorter (`make demo`:
# 150 rounds x 6 = 900 G steps), where 0.999 would leave 0.999**900 = 41% of the initial
# averages (mean 0, variance 1) in the statistics that `train=False` samples use; 0.99
# forgets them within a few hundred steps. Pass `bn_momentum=0.999` for paper-length runs.
BN_MOMENTUM = 0.99

Variables = Any  # a Flax variable dict: {"params": ..., "batch_stats": ...}


def _leaky_relu(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


def conv_4x4_stride_2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`nn.Conv(kernel_size=(4, 4), strides=(2, 2), padding="SAME")`, as patches @ kernel.

    x: `[B, H, W, C]` with even H and W (SAME pads one pixel on each side); kernel:
    `[4, 4, C, F]` (HWIO). The 16 strided views of the padded input are concatenated
    along channels and multiplied by the flattened kernel (`layers.conv_same`): one matrix
    product, whose gradients (and the gradient penalty's double backward) are matrix
    products too.
    """
    _, height, width, _ = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even, got {(height, width)}")
    return layers.conv_same(x, kernel, stride=2)


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# A stride-2 SAME transposed 4x4 convolution is y[o] = sum_j x[j] w[2j + 2 - o] per axis:
# output phase a (o = 2i + a) is a 2-tap stride-1 convolution of x with taps
# _CONVT_TAPS[a][0] of w and padding _CONVT_TAPS[a][1].
_CONVT_TAPS = {0: ([0, 2], (1, 0)), 1: ([1, 3], (0, 1))}


def conv_transpose_4x4_stride_2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`nn.ConvTranspose(kernel_size=(4, 4), strides=(2, 2), padding="SAME")`.

    Output pixel phase `(a1, a2)` (pixels `[a1::2, a2::2]`) is a stride-1 2x2
    convolution of `x` with four taps of the kernel; the phases are interleaved.
    """
    phases = []
    for a1 in (0, 1):
        row = []
        for a2 in (0, 1):
            (rows, row_pad), (cols, col_pad) = _CONVT_TAPS[a1], _CONVT_TAPS[a2]
            sub_kernel = kernel[jnp.array(rows)[:, None], jnp.array(cols)[None, :]]
            row.append(
                jax.lax.conv_general_dilated(
                    x, sub_kernel, (1, 1), (row_pad, col_pad), dimension_numbers=_DIMENSIONS
                )
            )
        phases.append(jnp.stack(row, axis=3))  # [B, H, W, a2, F]
    y = jnp.stack(phases, axis=2)  # [B, H, a1, W, a2, F]
    batch, height, _, width, _, features = y.shape
    return y.reshape(batch, 2 * height, 2 * width, features)


def _strided_4x4(module: nn.Module, x: jax.Array, op: Callable, features: int,
                 use_bias: bool) -> jax.Array:
    """`op(x, kernel)` (+ bias) with `module`'s `[4, 4, in, features]` kernel, as flax's."""
    kernel = module.param("kernel", nn.initializers.lecun_normal(), (4, 4, x.shape[-1], features))
    y = op(x, kernel)
    if use_bias:
        y = y + module.param("bias", nn.initializers.zeros_init(), (features,))
    return y


class StridedConv(nn.Module):
    """A 4x4 stride-2 SAME convolution (as `nn.Conv`), computed as one matrix product."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _strided_4x4(self, x, conv_4x4_stride_2, self.features, self.use_bias)


class StridedConvTranspose(nn.Module):
    """A 4x4 stride-2 SAME transposed convolution (as `nn.ConvTranspose`), by phases."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _strided_4x4(self, x, conv_transpose_4x4_stride_2, self.features, self.use_bias)


class Discriminator(nn.Module):
    """WGAN critic: images `[B, 28, 28, 1]` in [-1, 1] -> scores `[B]` (higher = real).

    Attributes:
      conv_features: channels of the two 4x4 stride-2 convolutions.
      dense_features: width of the hidden dense layer.
      layer_norm: LayerNorm after the hidden dense layer (the per-example stand-in for
        the reference's BatchNorm).
    """

    conv_features: tuple[int, int] = (64, 128)
    dense_features: int = 1024
    layer_norm: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for features in self.conv_features:
            x = StridedConv(features)(x)
            x = _leaky_relu(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.dense_features, use_bias=not self.layer_norm)(x)
        if self.layer_norm:
            x = nn.LayerNorm()(x)
        x = _leaky_relu(x)
        return nn.Dense(1)(x)[:, 0]


class Generator(nn.Module):
    """Noise `[B, noise_dim]` -> images `[B, 28, 28, 1]` in [-1, 1] (tanh).

    Attributes:
      dense_features: width of the first dense layer.
      base_features: channels of the 7x7 map the second dense layer is reshaped into.
      convt_features: channels of the two 4x4 stride-2 transposed convolutions.
      bn_momentum: decay of BatchNorm's running averages.
    """

    dense_features: int = 1024
    base_features: int = 256
    convt_features: tuple[int, int] = (64, 32)
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, noise: jax.Array, train: bool = True) -> jax.Array:
        def bn_relu(x):
            # scale=False as in the reference: the next layer is linear and absorbs it.
            x = nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, use_scale=False
            )(x)
            return nn.relu(x)

        height, width = IMAGE_SHAPE[0] // 4, IMAGE_SHAPE[1] // 4
        x = bn_relu(nn.Dense(self.dense_features, use_bias=False)(noise))
        x = bn_relu(nn.Dense(height * width * self.base_features, use_bias=False)(x))
        x = x.reshape((x.shape[0], height, width, self.base_features))
        for features in self.convt_features:
            x = StridedConvTranspose(features, use_bias=False)(x)
            x = bn_relu(x)
        x = nn.Conv(IMAGE_SHAPE[2], kernel_size=(4, 4), padding="SAME")(x)
        return jnp.tanh(x)


def init_discriminator(model: Discriminator, key: jax.Array) -> Variables:
    """D's variables (`{"params": ...}`), initialised on one dummy image.

    Jitted, as every model init in dpfed: one compilation instead of one per operation
    (seconds less at start-up; the same values bit for bit).
    """
    return jax.jit(model.init)(key, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))


def init_generator(model: Generator, key: jax.Array, noise_dim: int = NOISE_DIM) -> Variables:
    """G's variables (`{"params": ..., "batch_stats": ...}`), initialised on dummy noise.

    Two dummy rows, so BatchNorm's batch variance at init is defined.
    """
    return jax.jit(model.init, static_argnames="train")(
        key, jnp.zeros((2, noise_dim), jnp.float32), train=False)


def generate(
    model: Generator, variables: Variables, noise: jax.Array, train: bool = False
) -> jax.Array:
    """G's images for `noise`, without updating the running averages.

    `train=False` (sampling, evaluation) normalises with the running averages;
    `train=True` with the statistics of this batch of noise.
    """
    if not train:
        return output(model, variables, noise, train=False)
    images, _ = model.apply(variables, noise, train=True, mutable=["batch_stats"])
    return images
