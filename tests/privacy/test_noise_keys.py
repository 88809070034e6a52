"""Every DP noise draw of a run uses its own key (`tests.noise_keys.recording`).

Two releases (or two leaves of one release) noised from one key carry the same noise:
their difference has none, and the ledger's guarantee would be false. In this JAX
(threefry, partitionable) `jax.random.split(k, n)[i]` is `jax.random.fold_in(k, i)` bit
for bit, so code that both splits a key and folds small integers into it reuses keys
silently: only the keys the runs really draw from tell. Each trainer runs a few tiny
steps or rounds in-process; the draws must be as many as the ledger's releases times
the leaves each noises, all from distinct keys.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed import privacy
from dpfed.federated import classifier, client_mesh
from dpfed.generative import (
    contract,
    datalens,
    dpd_fvae,
    fedgan_debug,
    fedlm,
    fedlm_debug,
    group_sizes,
    selection,
)
from dpfed.models import gan, vae
from dpfed.train import dpsgd
from dpfed.train.workdir import LEDGER_FILE, Workdir
from tests.experiments import test_fedgan_debug, test_fedlm_debug
from tests.noise_keys import recording, recording_keys


def _num_releases(workdir) -> int:
    return json.loads((workdir / LEDGER_FILE).read_text())["num_releases"]


# The recorder itself.


def test_split_is_fold_in_in_this_jax():
    # Why a split and a fold_in of one key can collide (module docstring).
    key = jax.random.key(3)
    split = jax.random.key_data(jax.random.split(key, 4))
    folded = [jax.random.key_data(jax.random.fold_in(key, i)) for i in range(4)]
    assert np.array_equal(split, np.stack(folded))


def test_recorder_sees_draws_under_jit_vmap_scan_and_shard_map(monkeypatch):
    tree = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    keys = jax.random.split(jax.random.key(0), 4)

    @jax.jit
    def noised(key):
        return privacy.add_gaussian_noise(tree, key, 1.0)

    noised(keys[0])  # traced before the recording: it must be traced again
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("d",))
    sharded = jax.jit(jax.shard_map(
        jax.vmap(noised), mesh=mesh, in_specs=jax.sharding.PartitionSpec("d"),
        out_specs=jax.sharding.PartitionSpec("d")))
    with recording(monkeypatch) as recorded:
        noised(keys[0])
        jax.jit(jax.vmap(noised))(keys)
        jax.lax.scan(lambda c, k: (c, noised(k)), 0, keys)
        sharded(keys)
        jax.lax.cond(False, noised, lambda k: tree, keys[0])  # not taken: no draw
    assert len(recorded.draws) == 2 * (1 + 3 * 4)  # two leaves a call
    assert {d.shape for d in recorded.draws} == {(3,), (2, 2)}
    one_call = {tuple(np.asarray(jax.random.key_data(k))) for k in jax.random.split(keys[1], 2)}
    assert len([d for d in recorded.draws if d.key in one_call]) == 2 * 3, (
        "the vmapped, scanned and sharded calls each record element 1's two keys")
    assert len(recorded.reused()) == 2 * 4


def test_recorder_catches_a_reused_key(monkeypatch):
    key = jax.random.key(1)
    with recording(monkeypatch) as recorded:
        privacy.add_gaussian_noise(jnp.zeros(2), key, 1.0)
        privacy.add_gaussian_noise(jnp.zeros(2), key, 1.0)
    with pytest.raises(AssertionError, match="more than once"):
        recorded.assert_distinct(2)
    with pytest.raises(AssertionError):
        recorded.assert_distinct(3)


# DP-SGD: one release a step, one draw a leaf of the params.


_DPSGD = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=4, batch_size=16,
                           noise_multiplier=1.0, eval_every=2, checkpoint_every=2)
_LOGREG_LEAVES = 2  # kernel, bias


def test_dpsgd_steps_draw_from_distinct_keys_and_a_resume_replays_them(tmp_path, monkeypatch):
    with (recording(monkeypatch) as whole,
          recording_keys(monkeypatch, privacy, "poisson_sample") as batches):
        dpsgd.train(_DPSGD, tmp_path / "whole", log=lambda _: None)
    assert _num_releases(tmp_path / "whole") == 4
    whole.assert_distinct(4 * _LOGREG_LEAVES)
    whole.assert_apart_from(batches, "batch sampling")  # a step's noise: not its batch's key

    resumed = tmp_path / "resumed"
    with recording(monkeypatch) as first:
        dpsgd.train(dataclasses.replace(_DPSGD, steps=2), resumed, log=lambda _: None)
    with recording(monkeypatch) as rest:
        dpsgd.train(_DPSGD, resumed, log=lambda _: None)
    assert _num_releases(resumed) == 4
    first.assert_distinct(2 * _LOGREG_LEAVES)
    rest.assert_distinct(2 * _LOGREG_LEAVES)
    assert not set(first.keys()) & set(rest.keys()), "the resume drew steps 1-2's noise again"
    assert first.keys() + rest.keys() == whole.keys(), "a resume replays the run's keys"


# DP-FedAvg (the classifier), adaptive clipping on: a release a round, one draw a leaf of
# the update and one for the noised count of unclipped updates (the next clip).


def test_fedavg_classifier_rounds_draw_from_distinct_keys(tmp_path, monkeypatch):
    config = classifier.FedAvgClassifierConfig(
        dataset="digits", model="logreg", num_clients=20, clients_per_round=5, rounds=3,
        noise_multiplier=1.0, adaptive_clipping=True, clipped_count_stddev=2.0, local_steps=2,
        local_batch_size=10, eval_every=3, checkpoint_every=3)
    with (recording(monkeypatch) as recorded,
          recording_keys(monkeypatch, privacy, "poisson_sample") as cohorts):
        classifier.train(config, str(tmp_path), log=lambda _: None)
    assert _num_releases(tmp_path) == 3
    assert [d.shape for d in recorded.draws].count(()) == 3, "a count a round"
    recorded.assert_distinct(3 * (_LOGREG_LEAVES + 1))
    recorded.assert_apart_from(cohorts, "cohort sampling")  # neither noise: the cohort's key


# dpd_fvae: central (the decoder's update, a round) and local (per-example DP-SGD steps).


_ONE_DEVICE = client_mesh(jax.devices()[:1])
_DPD = dpd_fvae.DpdFvaeConfig(
    dataset="digits", num_clients=4, client_fraction=1.0, rounds=2, local_epochs=1,
    batch_size=256, latent_dim=2, encoder_features=(4,), decoder_features=(4,), sync="d",
    eval_every=2, checkpoint_every=2)


@pytest.mark.slow  # ~11 s: DP-FedAvg's noise is checked by the classifier's test above
def test_dpd_fvae_central_rounds_draw_from_distinct_keys(tmp_path, monkeypatch):
    config = dataclasses.replace(_DPD, dp="central", noise_multiplier=1.0)
    with recording(monkeypatch) as recorded:
        dpd_fvae.train(config, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE)
    assert _num_releases(tmp_path) == 2
    _, decoder = contract.load_generator(Workdir(tmp_path), "dpd_fvae")
    recorded.assert_distinct(2 * len(jax.tree.leaves(decoder)))


def test_dpd_fvae_local_steps_draw_from_distinct_keys(tmp_path, monkeypatch):
    config = dataclasses.replace(_DPD, num_clients=8, dp="local", noise_multiplier=1.0)
    with (recording(monkeypatch) as recorded,
          recording_keys(monkeypatch, privacy, "bernoulli_at_most") as batches,
          recording_keys(monkeypatch, jax.random, "normal") as latents):
        dpd_fvae.train(config, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE)
    # Each client's ~180 examples fit one Poisson batch (rate 1): a step a round, whose
    # noise covers the whole VAE's gradient (encoder and decoder).
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert ledger["metadata"]["worst_client_participations"] == config.rounds
    encoder, decoder = dpd_fvae.build_model(config, 10, (8, 8, 1))
    leaves = len(jax.tree.leaves(jax.eval_shape(
        functools.partial(vae.init_vae, encoder, decoder), jax.random.key(0))))
    recorded.assert_distinct(config.rounds * config.num_clients * leaves)
    # Nor from the key of the step's Poisson batch or of its VAE's latent noise.
    recorded.assert_apart_from(batches, "local batch sampling")
    recorded.assert_apart_from(latents, "VAE latent noise")


_DATALENS = datalens.DataLensConfig(  # tests/generative/test_datalens.py's TINY
    dataset="digits", num_teachers=12, topk=6, sigma=30.0, beta=0.3, vote_scope="sample",
    grad_bound=1e-3, z_dim=4, d_steps=1, pretrain_steps=2, batch_size=4, real_batch=4,
    teacher_features=(4,), generator_hidden=16, generator_width=4, teacher_chunk=2, steps=4,
    eval_every=4, checkpoint_every=4, num_synthetic=20)


# DataLens: one release (the noised vote sum) a generator step.


def test_datalens_steps_draw_from_distinct_keys(tmp_path, monkeypatch):
    with (recording(monkeypatch) as recorded,
          recording_keys(monkeypatch, datalens.TeacherEnsemble, "vote_sum", key_arg=5) as votes):
        datalens.train(_DATALENS, str(tmp_path), log=lambda _: None)
    # A step's draw noises the votes on each of its batch_size samples: a release each.
    assert _num_releases(tmp_path) == _DATALENS.steps * _DATALENS.batch_size
    assert {d.shape for d in recorded.draws} == {(_DATALENS.batch_size, 64)}
    recorded.assert_distinct(_DATALENS.steps)
    recorded.assert_apart_from(votes, "teacher vote")  # the votes' coins' key: not the noise's


# The debug demos' population mode: the noised group sizes, then each group's model.


def _population_releases(workdir, group_dirs) -> int:
    sizes = json.loads((workdir / group_sizes.GROUP_SIZES_LEDGER).read_text())["num_releases"]
    assert sizes == 1, "the group sizes are one release"
    return sum(_num_releases(workdir / name) for name in group_dirs)


@pytest.mark.slow  # ~40 s on 2 cores
def test_fedgan_debug_population_sizes_and_gans_draw_from_distinct_keys(tmp_path, monkeypatch):
    # tests/experiments/test_fedgan_debug.py's population run: the low group (<= 0.3)
    # holds no client and trains all the same, the high one (>= 0.7) 11.
    test_fedgan_debug._skip_the_app_classifier(monkeypatch)
    monkeypatch.setattr(selection, "client_accuracies",
                        lambda *args: np.linspace(0.31, 1.0, test_fedgan_debug.TINY["num_clients"]))
    config = fedgan_debug.DebugConfig(**test_fedgan_debug.POPULATION)
    with recording(monkeypatch) as recorded:
        fedgan_debug.run(config, str(tmp_path), log=lambda _: None)
    discriminator = jax.eval_shape(functools.partial(
        gan.init_discriminator, config.fedgan_config().gan.discriminator), jax.random.key(0))
    releases = _population_releases(tmp_path, ("gan_low", "gan_high"))
    assert releases == 2 * config.rounds
    sizes_draws = [d for d in recorded.draws if d.shape == (2,)]
    assert len(sizes_draws) == 1, "one draw noises both groups' sizes"
    recorded.assert_distinct(1 + releases * len(jax.tree.leaves(discriminator["params"])))


@pytest.mark.slow  # ~30 s on 2 cores
def test_fedlm_debug_population_sizes_and_lms_draw_from_distinct_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(fedlm, "client_oov_rates",  # OOV rates 0 ... 1 by client index
                        lambda texts, vocab: np.linspace(0.0, 1.0, len(texts)))
    config = fedlm_debug.TextDebugConfig(**test_fedlm_debug.POPULATION)
    with recording(monkeypatch) as recorded:
        fedlm_debug.run(config, str(tmp_path), log=lambda _: None)
    lm = config.lm_config(vocab_size=10).local.model  # the leaves do not depend on it
    params = jax.eval_shape(lm.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    releases = _population_releases(tmp_path, ("lm_high_oov", "lm_low_oov"))
    assert releases == 2 * config.rounds
    recorded.assert_distinct(1 + releases * len(jax.tree.leaves(params)))
