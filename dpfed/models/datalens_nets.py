"""Networks of DataLens (Wang et al., "DataLens: Scalable Privacy Preserving Training via
Gradient Compression and Aggregation", CCS 2021): small class-conditional DCGAN-style
teacher discriminators and the student generator.

The public code (TensorFlow) conditions DCGAN by concatenating one-hot label maps to the
input of every convolution and the one-hot label to every dense input. Concatenating
constant label maps to a convolution's input adds, per class, a learned bias to each
output channel (up to the border effect of SAME padding), so here each convolution takes
the image features alone plus a per-class bias (`nn.Embed`): the same family of functions
at a tenth of the first layer's cost, which matters with thousands of teachers.

The teachers use no normalisation: a teacher's gradient w.r.t. one generated sample
must depend on that sample only (per-sample votes). The generator normalises its hidden
layers with the statistics of the generated batch, as DCGAN's BatchNorm does in training
mode (and as the public DataLens code also does when sampling); it keeps no running
averages, so `apply` stays a pure function of `(params, z, labels)`, and its samples
should be drawn in batches (the generator contract samples 1,000 at a time). It never
sees private data. Images are float32 `[B, H, W, C]` in [0, 1] like `dpfed.data`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpfed.models.layers import extract_patches


class ConditionalBias(nn.Module):
    """A learned per-class bias over the last axis: what one-hot label maps concatenated
    to a layer's input contribute to its output."""

    num_classes: int
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array) -> jax.Array:
        bias = nn.Embed(self.num_classes, self.features, embedding_init=nn.initializers.zeros)
        b = bias(labels)
        return x + b.reshape(b.shape[:1] + (1,) * (x.ndim - 2) + b.shape[-1:])


class PatchConv(nn.Module):
    """A SAME-padded strided convolution written as patch extraction + a dense layer.

    The same function as `nn.Conv` (kernel laid out as [kh * kw * C, features], unlike
    `dpfed.models.layers.Conv`, which keeps `nn.Conv`'s layout), but under
    `jax.vmap` over teachers it lowers to one batched matrix product instead of a grouped
    convolution, which XLA's CPU backend runs about 10x slower than a loop over teachers.
    """

    features: int
    kernel_size: tuple[int, int] = (4, 4)
    strides: tuple[int, int] = (2, 2)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features)(extract_patches(x, self.kernel_size, self.strides))


class BatchStatNorm(nn.Module):
    """BatchNorm with the current batch's statistics (over all axes but the last) and a
    learned scale and bias; no running averages."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.var(x, axis=axes, keepdims=True)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class TeacherDiscriminator(nn.Module):
    """Conditional DCGAN discriminator: [conv(4x4, stride 2) + class bias, leaky ReLU]
    per entry of `features`, flatten to h, then dense(concat(h, one-hot)) plus the
    projection term <embed(y), h> (Miyato & Koyama, "cGANs with Projection
    Discriminator", ICLR 2018), which lets a teacher with a handful of examples tie what
    it has seen to the label. Returns logits [B]."""

    num_classes: int
    features: tuple[int, ...] = (16, 32)

    @nn.compact
    def __call__(self, images: jax.Array, labels: jax.Array) -> jax.Array:
        x = images
        for width in self.features:
            x = PatchConv(width)(x)
            x = nn.leaky_relu(ConditionalBias(self.num_classes, width)(x, labels), 0.2)
        h = x.reshape((x.shape[0], -1))
        projection = nn.Embed(self.num_classes, h.shape[-1], embedding_init=nn.initializers.zeros)
        onehot = jax.nn.one_hot(labels, self.num_classes)
        logits = nn.Dense(1)(jnp.concatenate([h, onehot], axis=-1))[:, 0]
        return logits + jnp.sum(projection(labels) * h, axis=-1)


# Output activations of the student generator, logits -> [0, 1].
OUTPUTS = {"sigmoid": jax.nn.sigmoid, "hard_sigmoid": jax.nn.hard_sigmoid}


class StudentGenerator(nn.Module):
    """Conditional DCGAN generator: concat(z, one-hot) -> dense(hidden) -> dense to a
    (H/4, W/4, 2*width) map -> transposed conv(width, stride 2) -> transposed conv
    (channels, stride 2); batch-statistics normalisation and class biases before each
    ReLU, output in [0, 1] by `output` ("sigmoid", or "hard_sigmoid" = relu6(x + 3) / 6,
    which reaches exactly 0 and 1: a sigmoid never draws a truly black background, and
    discriminators trained on MNIST's exact zeros keep voting to darken it). `output_bias`
    initialises the last layer's bias: a data-independent prior on the mean pixel
    (sigmoid(-3) = 0.05: dark backgrounds)."""

    num_classes: int
    image_shape: tuple[int, int, int] = (28, 28, 1)
    hidden: int = 256
    width: int = 32
    output_bias: float = 0.0
    output: str = "sigmoid"

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        height, width, channels = self.image_shape
        if height % 4 or width % 4:
            raise ValueError(f"image height and width must be multiples of 4: {self.image_shape}")
        onehot = jax.nn.one_hot(labels, self.num_classes)
        x = nn.Dense(self.hidden)(jnp.concatenate([z, onehot], axis=-1))
        x = nn.relu(BatchStatNorm()(x))
        x = nn.Dense(height // 4 * width // 4 * 2 * self.width)(
            jnp.concatenate([x, onehot], axis=-1)
        )
        x = nn.relu(BatchStatNorm()(x))
        x = x.reshape((z.shape[0], height // 4, width // 4, 2 * self.width))
        x = nn.ConvTranspose(self.width, kernel_size=(4, 4), strides=(2, 2))(x)
        x = BatchStatNorm()(x)
        x = nn.relu(ConditionalBias(self.num_classes, self.width)(x, labels))
        x = nn.ConvTranspose(
            channels,
            kernel_size=(4, 4),
            strides=(2, 2),
            bias_init=nn.initializers.constant(self.output_bias),
        )(x)
        logits = ConditionalBias(self.num_classes, channels)(x, labels)
        return OUTPUTS[self.output](logits)
