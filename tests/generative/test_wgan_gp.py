"""Tests for dpfed.generative.wgan_gp (WGAN-GP halves of DP-FedAvg-GAN, Augenstein et al.)."""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.generative import wgan_gp
from dpfed.models import gan
from tests import jitted
from tests.noise_keys import recording_keys

_CONFIG = wgan_gp.WganGpConfig(
    discriminator=gan.Discriminator(conv_features=(4, 8), dense_features=16),
    generator=gan.Generator(dense_features=16, base_features=8, convt_features=(8, 4)),
    noise_dim=8,
    batch_size=4,
    client_d_steps=2,
    server_g_steps=2,
    server_g_learning_rate=1e-2,  # not the default: a G step at the module's rate would show
)


class _Linear(nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, use_bias=False)(x.reshape((x.shape[0], -1)))[:, 0]


@functools.cache
def _variables():
    d_params = gan.init_discriminator(_CONFIG.discriminator, jax.random.key(0))
    g_variables = gan.init_generator(_CONFIG.generator, jax.random.key(1), _CONFIG.noise_dim)
    return d_params, g_variables


@functools.cache
def _client_update():
    return jax.jit(functools.partial(wgan_gp.train_discriminator, _CONFIG))


@functools.cache
def _generator_update():
    return jax.jit(functools.partial(wgan_gp.server_generator_update, _CONFIG))


def _client_images(max_n=6, seed=2):
    return jax.random.uniform(jax.random.key(seed), (max_n, 28, 28, 1), minval=-1, maxval=1)


def _linear_params(w):
    """`_Linear`'s params on 2x2 images: D(x) = <w, x>, every weight `w` (||w|| = 2w)."""
    return {"params": {"Dense_0": {"kernel": jnp.full((4, 1), w)}}}


@pytest.mark.parametrize("norm, expected", [(1.0, 0.0), (3.0, 4.0)])
def test_gradient_penalty_of_linear_critic(norm, expected):
    model = _Linear()
    params = _linear_params(norm / 2.0)  # ||w|| = norm
    real = jnp.zeros((3, 2, 2, 1))
    fake = jnp.ones((3, 2, 2, 1))
    penalty = wgan_gp.gradient_penalty(
        model, params, real, fake, jnp.ones(3, bool), jax.random.key(0)
    )
    np.testing.assert_allclose(
        penalty, expected, atol=1e-4, err_msg=f"(||w||={norm} - 1)^2 should be {expected}"
    )


def test_discriminator_loss_ignores_masked_rows():
    d_params, _ = _variables()
    real, fake = _client_images(4, 3), _client_images(4, 4)
    mask = jnp.array([True, True, True, False])
    garbage_real = real.at[3].set(7.0)
    garbage_fake = fake.at[3].set(-7.0)
    loss = jax.jit(wgan_gp.discriminator_loss, static_argnums=1)
    clean = loss(d_params, _CONFIG.discriminator, real, fake, mask, jax.random.key(0))
    dirty = loss(
        d_params, _CONFIG.discriminator, garbage_real, garbage_fake, mask, jax.random.key(0)
    )
    np.testing.assert_allclose(clean, dirty, rtol=1e-5, err_msg="a masked row changed the loss")


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def test_train_discriminator_moves_only_d():
    d_params, g_variables = _variables()
    new_d = _client_update()(d_params, g_variables, _client_images(), 5, jax.random.key(5))
    assert jax.tree_util.tree_structure(new_d) == jax.tree_util.tree_structure(d_params), (
        "the client must return exactly D's params, nothing else"
    )
    assert float(jnp.abs(_flat(new_d) - _flat(d_params)).max()) > 0, "D did not move"


def test_train_discriminator_ignores_padding():
    d_params, g_variables = _variables()
    images = _client_images()
    padded = images.at[5:].set(1.0)
    update = _client_update()
    clean = update(d_params, g_variables, images, 5, jax.random.key(6))
    dirty = update(d_params, g_variables, padded, 5, jax.random.key(6))
    np.testing.assert_allclose(
        _flat(clean), _flat(dirty), atol=1e-6, err_msg="padding slots changed D"
    )


def test_server_generator_update_takes_only_g_d_and_noise():
    parameters = list(inspect.signature(wgan_gp.server_generator_update).parameters)
    assert parameters == ["config", "g_variables", "d_params", "noise"], (
        f"the server's G step must see only G, D and noise, got arguments {parameters}"
    )


def test_server_generator_update_trains_g_deterministically():
    d_params, g_variables = _variables()
    update = _generator_update()
    noise = wgan_gp.generator_noise(jax.random.key(10), _CONFIG)
    assert noise.shape == (2, 4, 8), f"noise shape {noise.shape}"
    first, metrics = update(g_variables, d_params, noise)
    second, _ = update(g_variables, d_params, noise)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), g_variables, first)
    assert all(jax.tree_util.tree_leaves(changed["batch_stats"])), "BN averages not updated"
    assert any(jax.tree_util.tree_leaves(changed["params"])), "G's params did not move"
    assert np.isfinite(float(metrics.generator_loss)), "G loss is not finite"
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), first, second)
    assert all(jax.tree_util.tree_leaves(same)), "same G, D and noise must give the same G"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        wgan_gp.WganGpConfig(batch_size=0)
    with pytest.raises(ValueError, match="server_g_learning_rate"):
        wgan_gp.WganGpConfig(server_g_learning_rate=0.0)
    with pytest.raises(ValueError, match="gp_weight"):
        wgan_gp.WganGpConfig(gp_weight=-0.5)


def test_gan_range_round_trip():
    x = jnp.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(wgan_gp.to_gan_range(x), [-1.0, -0.5, 1.0])
    np.testing.assert_allclose(wgan_gp.from_gan_range(wgan_gp.to_gan_range(x)), x)
    np.testing.assert_allclose(
        wgan_gp.from_gan_range(jnp.array([-1.5, 1.5])), [0.0, 1.0],
        err_msg="G's images outside [-1, 1] must be clipped into the contract's [0, 1]")


class _HalfSquaredNorm(nn.Module):
    """D(x) = ||x||^2 / 2: its input gradient is x, so the penalty sees where x_hat lies."""

    @nn.compact
    def __call__(self, x):
        return 0.5 * jnp.sum(x.reshape((x.shape[0], -1)) ** 2, axis=-1)


def test_gradient_penalty_draws_an_interpolation_point_per_row():
    # Two identical rows (real 0, fake 1): each row's penalty (||x_hat|| - 1)^2 depends on
    # its own alpha; one alpha shared by the batch would give both rows the same penalty.
    real, fake = jnp.zeros((2, 2, 2, 1)), jnp.ones((2, 2, 2, 1))

    def row_penalty(row):
        mask = jnp.arange(2) == row
        return float(wgan_gp.gradient_penalty(
            _HalfSquaredNorm(), {}, real, fake, mask, jax.random.key(0)))

    assert row_penalty(0) != row_penalty(1), (
        "both rows got the same interpolate: alpha must be drawn per example")


def _linear_critic_loss(w, gp_weight):
    """The critic loss of D(x) = <w, x> on real zeros against fake ones, 3 of each."""
    return wgan_gp.discriminator_loss(
        _linear_params(w), _Linear(), jnp.zeros((3, 2, 2, 1)), jnp.ones((3, 2, 2, 1)),
        jnp.ones(3, bool), jax.random.key(0), gp_weight=gp_weight)


def test_discriminator_loss_is_fake_score_minus_real_score():
    # D(x) = <w, x> with w = 1/2: real zeros score 0, fake ones (4 pixels) score 2.
    loss = _linear_critic_loss(0.5, gp_weight=0.0)
    np.testing.assert_allclose(
        loss, 2.0, atol=1e-6, err_msg="the critic loss is E[D(fake)] - E[D(real)] = 2 - 0")


def test_discriminator_loss_adds_gp_weight_times_the_penalty():
    # D(x) = <w, x> with w = 3/2: fake ones score 6, real zeros 0, and the penalty is
    # (||w|| - 1)^2 = 4 at every interpolate.
    loss = _linear_critic_loss(1.5, gp_weight=2.0)
    np.testing.assert_allclose(
        loss, 6.0 + 2.0 * 4.0, rtol=1e-4, err_msg="the critic loss must weigh the penalty "
        "by its gp_weight argument: 6 - 0 + 2 * 4")


def test_generator_loss_is_minus_the_mean_critic_score_of_its_fakes():
    d_params, g_variables = _variables()
    noise = jax.random.normal(jax.random.key(11), (4, _CONFIG.noise_dim))

    @jax.jit  # one program, not ~100 eager ones
    def loss_and_want(g_variables, d_params, noise):
        loss, _ = wgan_gp.generator_loss(
            g_variables["params"], g_variables["batch_stats"], _CONFIG.generator,
            _CONFIG.discriminator, d_params, noise)
        fake = gan.generate(_CONFIG.generator, g_variables, noise, train=True)
        return loss, -jnp.mean(_CONFIG.discriminator.apply(d_params, fake))

    loss, want = loss_and_want(g_variables, d_params, noise)
    assert abs(float(want)) > 1e-4, "the test needs a non-zero critic score"
    np.testing.assert_allclose(
        loss, want, rtol=1e-5, err_msg="G's loss must be -E[D(G(z))] (G maximises D's score)")


def test_client_steps_raise_ds_margin_of_the_clients_images_over_fakes():
    # Gradient descent on E[D(fake)] - E[D(real)] (+ the penalty): D learns to score the
    # client's images above G's fakes (ascent would lower the margin). The round's
    # compiled client update (`_client_update`, shared with the tests above).
    config = _CONFIG
    d_params, g_variables = _variables()
    images = _client_images()
    noise = jax.random.normal(jax.random.key(13), (16, config.noise_dim))
    fakes = jitted.generate(config.generator, g_variables, noise, train=True)

    def margin(params):
        return float(jnp.mean(jitted.apply(config.discriminator, params, images))
                     - jnp.mean(jitted.apply(config.discriminator, params, fakes)))

    new = _client_update()(d_params, g_variables, images, 6, jax.random.key(5))
    assert margin(new) > margin(d_params), (
        f"D's margin of real over fake went from {margin(d_params):.4f} to {margin(new):.4f}: "
        "the client must descend the critic loss")


@functools.cache
def _generator_steps_by_hand():
    """The round's compiled G update (`_generator_update`, two steps) on fixed noise, and
    the same steps taken one by one: (its G, its metrics, their G, their losses)."""
    config = _CONFIG
    d_params, g_variables = _variables()
    noise = wgan_gp.generator_noise(jax.random.key(12), config)
    new, metrics = _generator_update()(g_variables, d_params, noise)
    loss_grad = jax.jit(jax.value_and_grad(wgan_gp.generator_loss, has_aux=True),
                        static_argnums=(2, 3))
    params, batch_stats = g_variables["params"], g_variables["batch_stats"]
    losses = []
    for batch_noise in noise:
        (loss, batch_stats), grads = loss_grad(params, batch_stats, config.generator,
                                               config.discriminator, d_params, batch_noise)
        losses.append(float(loss))
        params = jax.tree_util.tree_map(
            lambda p, g: p - config.server_g_learning_rate * g, params, grads)
    return new, metrics, params, losses


def test_server_generator_step_is_sgd_at_the_server_learning_rate():
    # Each batch of noise one SGD step from the last step's params.
    new, _, params, _ = _generator_steps_by_hand()
    np.testing.assert_allclose(
        _flat(new["params"]), _flat(params), atol=1e-6,
        err_msg="each G step must be plain SGD on -E[D(G(z))] at server_g_learning_rate")


def test_server_generator_loss_metric_is_the_mean_over_its_steps():
    # The round's G loss (metrics.jsonl) averages its steps' losses, not the last one's.
    _, metrics, _, losses = _generator_steps_by_hand()
    assert abs(losses[0] - losses[-1]) > 1e-3, f"the test needs steps of other losses: {losses}"
    np.testing.assert_allclose(
        float(metrics.generator_loss), np.mean(losses), rtol=1e-5,
        err_msg=f"G's loss metric must be the mean of its steps' losses {losses}")


class _FakesByMode(nn.Module):
    """G(z) = 0 in training mode (batch statistics), 1 in evaluation mode: 2x2 images."""

    @nn.compact
    def __call__(self, z, train=False):
        return jnp.full((z.shape[0], 2, 2, 1), 0.0 if train else 1.0)


def test_client_step_takes_its_configs_rate_and_penalty_weight_and_trains_mode_fakes():
    # One step of D(x) = <w, x>, w = 1 (||w|| = 2) on two real ones against G's fakes:
    # the gradient is E[fake] - E[real] + gp_weight * 2 (||w|| - 1) w / ||w|| = 0 - 1 + 3
    # per weight, so w' = 1 - 0.1 * 2 = 0.8. The module's rate (5e-4) would give 0.999,
    # its penalty weight (10) 0.1, and fakes of G in evaluation mode (1) 0.7.
    config = wgan_gp.WganGpConfig(
        discriminator=_Linear(), generator=_FakesByMode(), noise_dim=1, batch_size=2,
        client_d_steps=1, client_d_learning_rate=0.1, gp_weight=3.0)
    params = _linear_params(1.0)
    new = wgan_gp.train_discriminator(
        config, params, {}, jnp.ones((2, 2, 2, 1)), 2, jax.random.key(0))
    np.testing.assert_allclose(
        new["params"]["Dense_0"]["kernel"], np.full((4, 1), 0.8), rtol=1e-4,
        err_msg="a client step must be SGD at the config's client_d_learning_rate on the "
        "critic loss with its gp_weight, against G's fakes in training mode")


def test_a_client_step_uses_each_key_once(monkeypatch):
    # Every key a client's D steps take is either drawn from (the batch shuffle, each
    # step's fakes' noise and interpolation alphas) or split into others, once: two uses
    # of one key draw related numbers (e.g. the fakes' noise from the alphas' key).
    config = wgan_gp.WganGpConfig(
        discriminator=_Linear(), generator=_FakesByMode(), noise_dim=1, batch_size=2,
        client_d_steps=2)
    params = _linear_params(1.0)
    with (recording_keys(monkeypatch, jax.random, "split") as split,
          recording_keys(monkeypatch, jax.random, "uniform") as uniform,
          recording_keys(monkeypatch, jax.random, "normal") as normal):
        wgan_gp.train_discriminator(
            config, params, {}, jnp.ones((2, 2, 2, 1)), 2, jax.random.key(0))
    assert (len(uniform), len(normal)) == (3, 2), (
        f"a shuffle and two steps' alphas and noises: {len(uniform)} uniform draws, "
        f"{len(normal)} normal draws")
    used = split + uniform + normal
    assert len(set(used)) == len(used), (
        f"a key used twice: split {split}, uniform {uniform}, normal {normal}")
