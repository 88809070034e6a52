"""WGAN-GP losses and the two halves of a DP-FedAvg-GAN round.

"Generative Models for Effective ML on Private, Decentralized Datasets" (Augenstein
et al., ICLR 2020): each sampled client trains only the discriminator D, for a few
steps on its own images against fakes of the FIXED generator G, and sends D's delta;
after the (DP) aggregation of those deltas the server trains G for a few steps from
noise against the updated D. The loss is WGAN-GP (Gulrajani et al. 2017, "Improved
Training of Wasserstein GANs"), gradient-penalty weight 10.

- `train_discriminator(...)` -> D's new params, nothing else: the DP-FedAvg engine
  (`dpfed.federated`) turns them into the delta it clips, zeroes if non-finite (as the
  paper) and noises.
- `server_generator_update(g_variables, d_params, noise)`: G's inputs are its own
  variables, D's params and noise; it has no argument through which client data could
  reach it.

Images are float32 in [-1, 1] (`to_gan_range` maps the [0, 1] datasets). Everything is
a pure function of its arguments and jit/vmap-able (the engine vmaps the client half
over clients on accelerators).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpfed.federated import client_data
from dpfed.federated.local import masked_mean
from dpfed.models import gan
from dpfed.models.output import output
from dpfed.train.config import require_finite_floats

PyTree = Any

GP_WEIGHT = 10.0
CLIENT_D_LEARNING_RATE = 5e-4
SERVER_G_LEARNING_RATE = 5e-3
BATCH_SIZE = 32
CLIENT_D_STEPS = 6
SERVER_G_STEPS = 6
_NORM_EPSILON = 1e-10  # inside the sqrt of the penalty's gradient norm (as TF-GAN)


@dataclasses.dataclass(frozen=True)
class WganGpConfig:
    """The GAN half of a DP-FedAvg-GAN run; defaults are the paper's settings.

    Attributes:
      discriminator: the critic D.
      generator: the generator G.
      noise_dim: size of G's input noise.
      batch_size: real (and fake) images per D step; fakes per G step.
      client_d_steps: SGD steps of D on each client per round.
      server_g_steps: SGD steps of G on the server per round.
      client_d_learning_rate: client SGD learning rate of D.
      server_g_learning_rate: server SGD learning rate of G.
      gp_weight: weight of the gradient penalty.
    """

    discriminator: gan.Discriminator = gan.Discriminator()
    generator: gan.Generator = gan.Generator()
    noise_dim: int = gan.NOISE_DIM
    batch_size: int = BATCH_SIZE
    client_d_steps: int = CLIENT_D_STEPS
    server_g_steps: int = SERVER_G_STEPS
    client_d_learning_rate: float = CLIENT_D_LEARNING_RATE
    server_g_learning_rate: float = SERVER_G_LEARNING_RATE
    gp_weight: float = GP_WEIGHT

    def __post_init__(self):
        require_finite_floats(self)
        for name in ("noise_dim", "batch_size", "client_d_steps", "server_g_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("client_d_learning_rate", "server_g_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.gp_weight < 0:
            raise ValueError(f"gp_weight must be >= 0, got {self.gp_weight}")


def to_gan_range(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """[0, 1] images (0 = black) -> [-1, 1] (-1 = black), the GAN's range (numpy in, numpy
    out)."""
    return 2.0 * images - 1.0


def from_gan_range(images: jax.Array) -> jax.Array:
    """[-1, 1] images -> [0, 1] (the generator contract's range), clipped."""
    return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)


def gradient_penalty(
    d_model: gan.Discriminator,
    d_params: PyTree,
    real: jax.Array,
    fake: jax.Array,
    mask: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """Mean over masked rows of (||grad_x D(x_hat)||_2 - 1)^2, x_hat between real and fake.

    D scores each image on its own (no batch statistics), so the gradient of the sum of
    scores w.r.t. the batch is the batch of per-image gradients.
    """
    alpha = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1))
    interpolates = alpha * real + (1.0 - alpha) * fake

    def score_sum(x: jax.Array) -> jax.Array:
        scores: jax.Array = output(d_model, d_params, x)
        return jnp.sum(scores)

    grads = jax.grad(score_sum)(interpolates)
    norms = jnp.sqrt(jnp.sum(grads**2, axis=tuple(range(1, grads.ndim))) + _NORM_EPSILON)
    return masked_mean((norms - 1.0) ** 2, mask)


def discriminator_loss(
    d_params: PyTree,
    d_model: gan.Discriminator,
    real: jax.Array,
    fake: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    gp_weight: float = GP_WEIGHT,
) -> jax.Array:
    """WGAN-GP critic loss: E[D(fake)] - E[D(real)] + gp_weight * penalty (masked rows)."""
    score_real: jax.Array = output(d_model, d_params, real)
    score_fake: jax.Array = output(d_model, d_params, fake)
    penalty = gradient_penalty(d_model, d_params, real, fake, mask, key)
    return masked_mean(score_fake, mask) - masked_mean(score_real, mask) + gp_weight * penalty


def generator_loss(
    g_params: PyTree,
    g_batch_stats: PyTree,
    g_model: gan.Generator,
    d_model: gan.Discriminator,
    d_params: PyTree,
    noise: jax.Array,
) -> tuple[jax.Array, PyTree]:
    """WGAN generator loss -E[D(G(z))], and G's updated BatchNorm running averages."""
    fake, updates = g_model.apply(
        {"params": g_params, "batch_stats": g_batch_stats},
        noise,
        train=True,
        mutable=["batch_stats"],
    )
    scores: jax.Array = output(d_model, d_params, fake)
    return -jnp.mean(scores), updates["batch_stats"]


def train_discriminator(
    config: WganGpConfig,
    d_params: PyTree,
    g_variables: PyTree,
    images: jax.Array,
    count: jax.Array,
    key: jax.Array,
) -> PyTree:
    """D's params after `client_d_steps` SGD steps on one client's images; G stays fixed.

    Args:
      config: the GAN settings.
      d_params: the broadcast D.
      g_variables: the broadcast G (read only: it makes the fakes).
      images: `[max_n, 28, 28, 1]` in [-1, 1], the client's first `count` images real.
      count: the client's number of real images.
      key: the client's key for this round.

    Batches walk through the client's shuffled images (`local_batch_indices`: epochs;
    a short client's batch is masked), each against as many fakes of G made with batch
    statistics (`train=True`, as in the server's G step, so D sees the fakes G is
    trained to make).

    Departure from the paper's public code (google-research/federated `gans/`): there a
    client takes *at most* `client_d_steps` batches from ONE shuffled pass over its data
    (`create_tf_dataset_for_client(id).take(steps)`, `repeat=False`), so a client with
    n < steps * batch_size images takes ceil(n / batch_size) steps, the last one short.
    Here every client takes exactly `client_d_steps` steps and a small client cycles
    through its images (the CPU demo's 20-image clients: 6 steps on the same 20 images,
    where the public code would take one). Only D's delta leaves the client either way,
    clipped to C: the guarantee does not depend on it.
    """
    batch_key, steps_key = jax.random.split(key)
    indices, masks = client_data.local_batch_indices(
        batch_key, count, images.shape[0], config.batch_size, config.client_d_steps
    )
    loss_grad = jax.grad(discriminator_loss)
    learning_rate = config.client_d_learning_rate

    def step(params, inputs):
        batch_indices, mask, step_key = inputs
        noise_key, gp_key = jax.random.split(step_key)
        noise = jax.random.normal(noise_key, (config.batch_size, config.noise_dim))
        fake = gan.generate(config.generator, g_variables, noise, train=True)
        grads = loss_grad(
            params,
            config.discriminator,
            images[batch_indices],
            fake,
            mask,
            gp_key,
            config.gp_weight,
        )
        return jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads), None

    keys = jax.random.split(steps_key, config.client_d_steps)
    new_params, _ = jax.lax.scan(step, d_params, (indices, masks, keys))
    return new_params


def generator_noise(key: jax.Array, config: WganGpConfig) -> jax.Array:
    """The noise of one server G update: `[server_g_steps, batch_size, noise_dim]`."""
    return jax.random.normal(key, (config.server_g_steps, config.batch_size, config.noise_dim))


class GeneratorStepMetrics(NamedTuple):
    """Server-side diagnostics of one G update (functions of noise and D only)."""

    generator_loss: jax.Array  # mean over the G steps


def server_generator_update(
    config: WganGpConfig,
    g_variables: PyTree,
    d_params: PyTree,
    noise: jax.Array,
) -> tuple[PyTree, GeneratorStepMetrics]:
    """Trains G from noise against the (updated) D; returns G's variables and metrics.

    G's only inputs are its own variables, D's params and `noise`
    `[server_g_steps, batch, noise_dim]` (see `generator_noise`): G never touches client
    data. One SGD step per noise batch; BatchNorm averages are updated each step. The
    few steps are unrolled: inside a loop body XLA:CPU runs G's convolution gradients
    ~10x slower (measured: 1.1 s vs 0.1 s for 6 steps of the demo's G).
    """
    optimizer = optax.sgd(config.server_g_learning_rate)
    loss_grad = jax.value_and_grad(generator_loss, has_aux=True)

    def step(carry, batch_noise):
        params, batch_stats, opt_state = carry
        (loss, batch_stats), grads = loss_grad(
            params, batch_stats, config.generator, config.discriminator, d_params, batch_noise
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    params, batch_stats = g_variables["params"], g_variables["batch_stats"]
    carry = (params, batch_stats, optimizer.init(params))
    (params, batch_stats, _), losses = jax.lax.scan(step, carry, noise, unroll=True)
    return {"params": params, "batch_stats": batch_stats}, GeneratorStepMetrics(losses.mean())
