"""Tests of DP-FedAvg-GAN on the engine (dpfed.generative.fedgan), Augenstein et al. 2020."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.federated import (
    AdaptiveClipping,
    DpFedAvgConfig,
    OneClient,
    Subpopulation,
    client_mesh,
    loop,
)
from dpfed.generative import contract, fedgan, wgan_gp
from dpfed.models import gan
from dpfed.privacy import audit
from dpfed.train.workdir import Workdir, params_sha256
from tests import compiles
from tests.killed import KilledAtRelease, kill_at_release_write, releases_in_ledger_json

_GAN = wgan_gp.WganGpConfig(
    discriminator=gan.Discriminator(conv_features=(4, 8), dense_features=16),
    generator=gan.Generator(dense_features=16, base_features=8, convt_features=(8, 4)),
    noise_dim=8,
    batch_size=4,
    client_d_steps=2,
    server_g_steps=2,
)
_CONFIG = fedgan.FedGanConfig(
    gan=_GAN,
    rounds=2,
    clients_per_round=2,
    sampling="fixed",
    l2_clip=0.1,
    noise_multiplier=0.5,
    eval_every=1,
    checkpoint_every=1,
    eval_samples=16,
    seed=3,  # not the default 0: rounds that ignored the seed would not match
)


_ONE_DEVICE = client_mesh(jax.devices()[:1])  # small tests: no 8-way replication


def _images(seed, num_clients=4, max_n=5):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(num_clients, max_n, 28, 28, 1)).astype(np.float32)


@functools.cache
def _engine(seed=0):
    return fedgan.DpFedAvgGan(_CONFIG, _images(seed), np.array([5, 3, 4, 5]), _ONE_DEVICE)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `train_gan` run on `_engine()`'s data: (workdir, summary)."""
    workdir = tmp_path_factory.mktemp("fedgan")
    summary = fedgan.train_gan(_CONFIG, _images(0), np.array([5, 3, 4, 5]), workdir,
                               log=lambda _: None, mesh=_ONE_DEVICE)
    return workdir, summary


def test_the_engine_runs_the_configs_cohorts_clip_noise_and_population():
    # Every DP-FedAvg setting of a GAN's config must reach its engine, whose rounds the
    # ledger accounts: one dropped here would train (and account) at the engine's default.
    adaptive = AdaptiveClipping(clipped_count_stddev=1.0)
    population = Subpopulation(population=40, members_estimate=3.5)
    config = dataclasses.replace(_CONFIG, sampling="poisson", adaptive_clipping=adaptive,
                                 subpopulation=population)
    engine = fedgan.DpFedAvgGan(config, _images(0), np.array([5, 3, 4, 5]), _ONE_DEVICE).engine
    assert engine.config == DpFedAvgConfig(
        clients_per_round=2, sampling="poisson", l2_clip=0.1, noise_multiplier=0.5,
        adaptive_clipping=adaptive, subpopulation=population), (
        f"the engine must run the config's settings: {engine.config}")
    assert _engine().engine.config.sampling == "fixed", "and _CONFIG's fixed cohorts"


def _same(a, b):
    return all(
        jnp.shape(x) == jnp.shape(y) and bool(jnp.all(x == y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_client_hook_returns_only_d():
    state = _engine().init()
    hook = fedgan.discriminator_client_update(_GAN)
    client = OneClient(jnp.asarray(wgan_gp.to_gan_range(_images(1)[0])), jnp.int32(5))
    # Shapes suffice for what leaves a client: traced, not compiled (~7 s on 2 cores).
    out = jax.eval_shape(hook, state.params, (), client, state.context, jax.random.key(0))
    assert jax.tree_util.tree_structure(out.params) == jax.tree_util.tree_structure(state.params), (
        "a client must send back D's params and nothing else"
    )
    assert out.metrics == {} and out.state == (), "no metrics or state may leave a client"


def test_clients_cannot_change_g_and_g_sees_only_noise_and_d():
    ge = _engine()
    state = ge.init()
    key = jax.random.key(3)
    # Donating, as run_rounds (the program train_gan compiles): each round gets a fresh
    # (deterministic) init, as donation deletes the state it is given.
    after_round, _ = ge.round(ge.init(), key, donate=True)
    after_clients, _ = ge.engine.round(ge.init(), jax.random.fold_in(key, 0), donate=True)
    assert _same(after_clients.context, state.context), "the clients' half changed G"
    assert not _same(after_clients.params, state.params), "the clients' half did not move D"
    # G's update from the released D and the round's noise, computed by an engine over
    # *different* client data, equals the round's G: G never depends on client data.
    other = fedgan.DpFedAvgGan(_CONFIG, _images(9), np.array([1, 2, 3, 4]), _ONE_DEVICE)
    g_vars, _ = other.generator_step(
        after_clients.context, after_clients.params, jax.random.fold_in(key, 1)
    )
    assert _same(g_vars, after_round.context), "G's update depends on more than noise and D"
    assert _same(after_round.params, after_clients.params), "G's step changed D"


def test_engines_of_one_gan_config_share_one_compiled_generator_update():
    # fedgan_debug trains one GAN per group, each on its own engine (its clients' data);
    # G's update never sees that data, so the second GAN must not compile it again (at
    # make demo's sizes that compile took 4.5 s, once more per run). G's update of a
    # round is `generator_step` (`DpFedAvgGan.round` calls it after D's round).
    engines = [fedgan.DpFedAvgGan(_CONFIG, _images(seed, num_clients=n), np.full(n, 5),
                                  _ONE_DEVICE) for seed, n in ((4, 4), (5, 3))]
    with compiles.counted() as counts:
        for engine in engines:
            state = engine.init()
            g_vars = state.context
            for r in range(2):
                g_vars, _ = engine.generator_step(g_vars, state.params, loop.round_key(0, r))
            jax.block_until_ready(g_vars)
    assert counts["server_generator_update"] <= 1, (
        f"G's update compiled {counts['server_generator_update']} times for two engines "
        "with one GAN config: a jit per engine")


def test_rounds_draw_their_cohorts_and_noise_from_the_configs_seed(tiny_run):
    # fedgan_debug gives each group's GAN its own seed so that the two releases carry
    # independent noise; a run whose rounds ignored the seed would give both the same draws.
    # `tiny_run` trained `_CONFIG` (seed 3) on `_engine()`'s data.
    _, summary = tiny_run
    engine = _engine()
    state = engine.init()
    for r in range(_CONFIG.rounds):  # donating, as run_rounds: the program train_gan compiled
        state, _ = engine.round(state, loop.round_key(_CONFIG.seed, r), donate=True)
    assert params_sha256(state.context) == summary["generator_sha256"], (
        "train_gan's G is not the one of rounds keyed by its config's seed")


def test_generator_is_not_initialised_from_the_round_keys_root():
    # flax folds name hashes into G's init key: from the round keys' root, a hash equal
    # to a round number would give an initialiser that round's key.
    g_vars = _engine().init().context
    root = jax.random.fold_in(jax.random.key(_CONFIG.seed), loop.ROUND_KEY_STREAM)
    from_root = gan.init_generator(_CONFIG.gan.generator, root, _CONFIG.gan.noise_dim)
    assert not _same(g_vars, from_root), "G is initialised from the round keys' root"


def test_discriminator_is_not_initialised_from_the_round_keys_root():
    # As G: flax folds name hashes into D's init key, and a hash equal to a round number
    # would give one of D's initialisers that round's key (its noise and cohort).
    root = jax.random.fold_in(jax.random.key(_CONFIG.seed), loop.ROUND_KEY_STREAM)
    from_root = gan.init_discriminator(_CONFIG.gan.discriminator, root)
    assert not _same(_engine().initial_d, from_root), (
        "D is initialised from the round keys' root")


def test_a_gans_ledger_names_its_group():
    # fedgan_debug's two GANs each keep a ledger in their own sub-workdir: each must say
    # which group's release it accounts.
    for group in ("low", "high"):
        ledger = fedgan.new_ledger(_CONFIG, _engine(), group)
        assert ledger.metadata["group"] == group, f"{group}'s ledger: {ledger.metadata}"


def test_a_kill_while_writing_the_generator_leaves_a_ledger_of_every_round(
    tmp_path, monkeypatch
):
    kill_at_release_write(monkeypatch)
    with pytest.raises(KilledAtRelease):
        fedgan.train_gan(_CONFIG, _images(2), np.array([5, 3, 4, 5]), tmp_path,
                         log=lambda _: None, mesh=_ONE_DEVICE)
    assert releases_in_ledger_json(tmp_path) == _CONFIG.rounds, (
        "the generator was written before ledger.json held its rounds: a kill between "
        "them leaves a released G whose spend no ledger.json in the workdir counts")


def test_train_gan_writes_a_resumable_user_level_workdir(tiny_run):
    tmp_path, first = tiny_run
    images, counts = _images(0), np.array([5, 3, 4, 5])
    assert first["rounds"] == 2 and first["unit"] == "user", f"summary {first}"
    assert first["epsilon_rdp"] > 0, "a noised run must report its eps"
    assert set(first["epsilon_rdp_same_noise_if_users"]) == {"3400", "1000000"}
    ledger = Workdir(tmp_path).read_json("ledger.json")
    assert ledger["unit"] == "user", f"ledger unit {ledger['unit']}"
    again = fedgan.train_gan(
        _CONFIG, images, counts, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE
    )
    assert again["generator_sha256"] == first["generator_sha256"], "resuming changed G"
    generator, g_vars = contract.load_generator(Workdir(tmp_path), "fedgan")
    samples, labels = generator.sample(g_vars, jax.random.key(0), 5)
    assert samples.shape == (5, 28, 28, 1) and labels is None, "contract: unconditional images"
    assert float(samples.min()) >= 0 and float(samples.max()) <= 1, "contract: [0, 1]"


def test_audit_canaries_need_noise_and_poisson_cohorts():
    for settings in ({"sampling": "poisson", "noise_multiplier": 0.0},
                     {"sampling": "fixed"}, {"sampling": "poisson", "audit_canaries": 1}):
        with pytest.raises(ValueError, match="audit_canaries"):
            dataclasses.replace(_CONFIG, **{"audit_canaries": 20, **settings})


def test_canaries_are_drawn_in_d_from_the_gans_seed():
    # fedgan_debug's groups train with their own seeds: each GAN its own canaries, and a
    # resumed run the same ones (drawn again from the seed, not stored).
    images, counts = _images(2), np.array([5, 3, 4, 5])

    def canaries(seed):
        config = dataclasses.replace(_CONFIG, sampling="poisson", audit_canaries=20, seed=seed)
        return fedgan.DpFedAvgGan(config, images, counts, _ONE_DEVICE).canaries

    first, again, other = canaries(1), canaries(1), canaries(2)
    assert _same(first, again), "one seed drew two sets of canaries: a resume would differ"
    assert not _same(first[0].coords, other[0].coords), "two seeds drew the same canaries"
    inserted, held_out = first
    assert inserted.num_directions + held_out.num_directions == 40, "2 x 20 candidates"
    d_size = audit.flat_size(fedgan.initial_discriminator(_CONFIG))
    assert int(inserted.coords.max()) < d_size, "the canaries are not in D's space"


def test_one_round_of_all_users_audits_as_the_gaussian_mechanism_the_ledger_records(tmp_path):
    # All 4 users and all 1,000 canaries take part in one round (Poisson, q = 1) at z = 1:
    # one Gaussian mechanism (eps 4.377 at delta 1e-5). D's change along an inserted
    # direction is C + noise of std z C, along a held-out one the noise alone (the users'
    # clipped deltas, at most 4 C, project ~4 C / sqrt(d) on a direction): mu ~ 1 / z.
    # A D of d = 101,709, so the canaries' overlaps (K / d) add 1% to the variance.
    config = dataclasses.replace(
        _CONFIG, gan=dataclasses.replace(
            _GAN, discriminator=gan.Discriminator(conv_features=(4, 8), dense_features=256)),
        rounds=1, clients_per_round=4, sampling="poisson", noise_multiplier=1.0,
        audit_canaries=1000)
    summary = fedgan.train_gan(config, _images(2), np.array([5, 3, 4, 5]), tmp_path,
                               log=lambda _: None, mesh=_ONE_DEVICE)
    figures = Workdir(tmp_path).read_json("audit.json")
    assert figures == summary["audit"], "audit.json is not the summary's audit"
    # mu's standard error with 1,000 + 1,000 scores is ~0.05: 0.2 is 4 of them.
    assert abs(figures["mu"] - 1.0) < 0.2, (
        f"the canaries stand {figures['mu']:.3f} noise stds out, not 1 / z = 1: the canaries "
        "or the noise are not those of the ledger")
    assert figures["ledger_epsilon_pld"] == pytest.approx(4.377, abs=0.01), figures
    assert figures["epsilon_lower_bound"] < figures["ledger_epsilon_pld"], (
        f"the audit proves more eps than the ledger records: {figures}")
    every_round = figures["all_rounds"]  # D's round release: the same mechanism
    assert abs(every_round["shift"] - 1) < 0.2 and abs(every_round["noise_std"] - 1) < 0.1, (
        f"the round's release does not carry sensitivity C and noise z C: {every_round}")
