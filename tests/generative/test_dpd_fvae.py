"""Tests of DPD-fVAE (dpfed.generative.dpd_fvae), Pfitzner & Arnrich 2022."""

import dataclasses
import functools
import pathlib
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.federated import ClientData, OneClient, client_mesh
from dpfed.generative import contract, dpd_fvae
from dpfed.models import vae
from dpfed.privacy import audit
from dpfed.train.config import ConfigError
from dpfed.train.resume import Spent
from dpfed.train.workdir import (
    DIAGNOSTICS_FILE,
    DIAGNOSTICS_JSON,
    DIAGNOSTICS_JSON_NOTE,
    REPORT_FILE,
    Workdir,
)
from tests import other_data
from tests.killed import (
    KilledAtRelease,
    assert_ledger_json_covers_metrics,
    kill_after_metrics_record,
)

_ONE_DEVICE = client_mesh(jax.devices()[:1])  # small tests: no 8-way replication
_CONFIG = dpd_fvae.DpdFvaeConfig(
    dataset="digits", num_clients=4, client_fraction=1.0, rounds=2, local_epochs=1,
    batch_size=4, latent_dim=2, encoder_features=(4,), decoder_features=(4,), sync="d",
    dp="none", noise_multiplier=None, eval_every=1, checkpoint_every=1)
_SHAPE = (8, 8, 1)
_COUNTS = np.array([6, 3, 5, 6], np.int32)


def _clients(seed=0) -> ClientData:
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(4, 6, *_SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, size=(4, 6)).astype(np.int32)
    return ClientData((images, labels), _COUNTS)


@functools.cache
def _trainer(**changes) -> dpd_fvae.DpdFvae:
    config = dataclasses.replace(_CONFIG, **changes)
    noise = dpd_fvae.resolve_noise_multiplier(config, _COUNTS)
    return dpd_fvae.DpdFvae(config, 10, _SHAPE, _clients(), noise, _ONE_DEVICE)


def _leaves_equal(a, b) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _structure(tree):
    return jax.tree_util.tree_structure(tree)


def _client(i: int, count: int | None = None) -> OneClient:
    images, labels = _clients().arrays
    return OneClient((jnp.asarray(images[i]), jnp.asarray(labels[i])),
                     jnp.int32(_COUNTS[i] if count is None else count))


def _client_state(state, i: int):
    return jax.tree_util.tree_map(lambda x: x[i], state.client_states)


def _norm(a, b) -> float:
    return float(privacy.global_l2_norm(jax.tree_util.tree_map(jnp.subtract, a, b)))


def test_encoder_never_leaves_a_client():
    trainer = _trainer()
    state = trainer.init()
    _, decoder_params = vae.init_vae(trainer.encoder, trainer.decoder, jax.random.key(0))
    assert _structure(state.params) == _structure(decoder_params), (
        "sync_d: the server's shared params must be exactly the decoder's tree")
    after, _ = trainer.engine.round(state, jax.random.key(2))
    assert _structure(after.params) == _structure(decoder_params), (
        "the aggregated tree (what clients send back) must be the decoder's")
    assert not _leaves_equal(after.params, state.params), "the round did not move the decoder"


def test_client_encoders_differ_after_training_and_persist_across_rounds():
    trainer = _trainer()
    s0 = trainer.init()
    s1, _ = trainer.engine.round(s0, jax.random.key(1))
    s2, _ = trainer.engine.round(s1, jax.random.key(2))
    enc0, enc1, enc2 = (s.client_states.encoder for s in (s0, s1, s2))
    first = [jax.tree_util.tree_map(lambda x, i=i: x[i], enc1) for i in range(4)]
    assert not _leaves_equal(first[0], first[1]), "two clients' encoders are equal after a round"
    assert not _leaves_equal(enc1, enc0) and not _leaves_equal(enc2, enc1), "encoders not trained"
    # Adam's step count in each client's encoder state accumulates over both rounds.
    steps = np.asarray(dpd_fvae.steps_per_round(_CONFIG, _COUNTS))
    adam_count = np.asarray(s2.client_states.encoder_opt_state[0].count)
    np.testing.assert_array_equal(adam_count, 2 * steps, "encoder optimiser state not persisted")
    np.testing.assert_array_equal(np.asarray(s2.client_states.participations), [2, 2, 2, 2])


def test_sync_ed_shares_encoder_and_decoder_and_keeps_no_client_state():
    state = _trainer(sync="ed").init()
    assert set(state.params) == {"encoder", "decoder"}, f"shared: {set(state.params)}"
    assert state.client_states == (), "sync_ed without local DP must keep nothing on clients"


_CLIP = 1e-3
# Local DP without noise, SGD with lr 1: a client's decoder delta is minus its clipped mean.
_LOCAL = dataclasses.replace(_CONFIG, dp="local", optimizer="sgd", learning_rate=1.0,
                             l2_clip=_CLIP, noise_multiplier=0.0)


@functools.cache
def _hook(dp: str):
    trainer = _trainer()
    noise = None if dp == "none" else _LOCAL.noise_multiplier  # none refuses a z
    config = dataclasses.replace(_LOCAL, dp=dp, noise_multiplier=noise)
    return jax.jit(dpd_fvae.make_client_update(config, trainer.encoder, trainer.decoder, 6, 0.0))


def test_local_dp_clips_each_examples_decoder_gradient():
    state = _trainer().init()
    clip = _CLIP
    private, plain = _hook("local"), _hook("none")
    start = _client_state(state, 0)
    args = (state.params, start)

    def moved(out):  # (decoder delta norm, joint decoder + encoder delta norm)
        before = (state.params, start.encoder)
        return _norm(out.params, state.params), _norm((out.params, out.state.encoder), before)

    # One example, one step, lr 1, no noise: the deltas are minus its clipped gradient.
    one_private = moved(private(*args, _client(0, count=1), (), jax.random.key(3)))
    one_plain = moved(plain(*args, _client(0, count=1), (), jax.random.key(3)))
    assert one_plain[0] > 100 * clip, "the test needs a decoder gradient above the clip"
    assert one_private[0] <= clip * (1 + 1e-5), "one example's decoder gradient exceeds C"
    # The encoder feeds later decoder gradients, so its gradient is clipped jointly.
    np.testing.assert_allclose(one_private[1], clip, rtol=1e-3,
                               err_msg="one example's (decoder, encoder) gradient not clipped")
    # Three examples in one step (batch 4 > 3: rate 1): the mean of three clipped gradients.
    three = moved(private(*args, _client(0, count=3), (), jax.random.key(4)))
    assert three[1] <= clip * (1 + 1e-5), "per-example clipping exceeded"


@functools.cache
def _noisy_hook(z: float):
    """The local-DP hook of `_LOCAL` at noise multiplier `z` (one trace for both noise tests)."""
    trainer = _trainer()
    return jax.jit(dpd_fvae.make_client_update(_LOCAL, trainer.encoder, trainer.decoder, 6, z))


def _flat_change(new, old) -> np.ndarray:
    """new - old over all leaves, as one flat vector."""
    return np.concatenate([np.ravel(a - b) for a, b in zip(
        jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old), strict=True)])


def test_local_dp_noise_std_is_z_clip_over_the_expected_batch():
    z = 2.0
    hook = _noisy_hook(z)  # _LOCAL's clip is _CLIP
    state = _trainer().init()
    start = _client_state(state, 0)
    for count in (1, 3):  # one step at Poisson rate 1; expected batch min(B=4, count)
        out = hook(state.params, start, _client(0, count=count), (), jax.random.key(7))
        delta = _flat_change(out.params, state.params)
        assert delta.size > 400, "too few decoder coordinates to estimate a std"
        # Noise N(0, (zC)^2) per coordinate on the clipped sum, divided by the expected
        # batch; the clipped gradients (total norm <= count * C) are negligible beside it.
        np.testing.assert_allclose(
            np.std(delta), z * _CLIP / count, rtol=0.1,
            err_msg=f"local DP noise std must be z C / E[batch] (count {count})")


def test_local_dp_noise_is_divided_by_the_expected_not_the_realised_batch():
    # 6 examples, B = 4: each step samples each example with rate 4/6 and divides the
    # noised sum by 4 whatever the realised batch; the steps' noises add up.
    trainer, z, config = _trainer(), 2.0, _LOCAL
    hook = _noisy_hook(z)
    state = trainer.init()
    start = _client_state(state, 0)
    steps = int(dpd_fvae.steps_per_round(config, 6))
    assert steps > 1, f"the test needs several steps per round, got {steps}"
    expected = np.sqrt(steps) * z * _CLIP / 4
    for k in range(8):  # realised batches vary with the key; the noise std must not
        out = hook(state.params, start, _client(0, count=6), (), jax.random.key(100 + k))
        delta = _flat_change(out.params, state.params)
        np.testing.assert_allclose(
            np.std(delta), expected, rtol=0.1,
            err_msg=f"key {k}: noise std must be sqrt(steps) z C / E[batch] with E[batch] = 4")


def test_local_dp_step_does_not_depend_on_its_chunk_size(monkeypatch):
    # A local step gathers its Poisson batch and clips it `chunk` examples a pass; with
    # 2-example chunks every batch of 3+ takes several passes, which must add up to the
    # one-pass result (the loss diagnostic too), or a large batch would be truncated.
    trainer = _trainer()
    state = trainer.init()
    args = (state.params, _client_state(state, 0), _client(0, count=6), (), jax.random.key(9))

    def update(chunk):
        monkeypatch.setattr(privacy, "poisson_chunk_size", lambda *a, **k: chunk)
        return jax.jit(dpd_fvae.make_client_update(
            _LOCAL, trainer.encoder, trainer.decoder, 6, 0.0))(*args)

    # One pass: the default chunk of B = 4 in 6 slots is 6 (`_hook("local")` is _LOCAL's
    # hook built with it, compiled by the clipping test: no third program).
    assert privacy.poisson_chunk_size(_LOCAL.batch_size, population=6) == 6
    whole, chunked = _hook("local")(*args), update(2)
    np.testing.assert_allclose(_flat_change(chunked.params, state.params),
                               _flat_change(whole.params, state.params), rtol=1e-4, atol=1e-6,
                               err_msg="2-example chunks changed the clipped gradient sum")
    for name in ("loss", "squared_error", "kl"):
        np.testing.assert_allclose(chunked.metrics[name], whole.metrics[name], rtol=1e-5,
                                   err_msg=f"2-example chunks changed the {name} diagnostic")


def test_local_dp_batches_sample_each_example_at_the_accounted_rate():
    # The ledger accounts each local step as Poisson with rate min(B, n_c) / n_c; another
    # rate (e.g. every example in every step) would leave the noise as it is and only
    # grow the clipped sum, which no noise test sees.
    mask = jnp.arange(8) < 6  # a client of 6 examples in 8 padded slots, B = 4
    keys = jax.random.split(jax.random.key(0), 4000)
    batches = np.asarray(jax.vmap(lambda k: dpd_fvae.local_dp_batch(k, mask, 4.0))(keys))
    assert not batches[:, 6:].any(), "a padded slot was sampled"
    rates = batches[:, :6].mean(axis=0)
    # Each example's rate 4/6, estimated from 4000 draws (std 0.0075).
    np.testing.assert_allclose(rates, 4 / 6, atol=0.04,
                               err_msg="each example's sample rate must be min(B, n_c) / n_c")
    sizes = batches.sum(axis=1)
    assert len(set(sizes.tolist())) > 3, "Poisson batch sizes must vary, not be fixed"


def test_local_dp_batches_do_not_select_above_the_accounted_rate():
    # Key 3329 draws bits for example 864 between the thresholds of rate 0.3 (300 of
    # 1,000) that bernoulli_at_most and jax.random.bernoulli's float32 uniform imply.
    key, mask = jax.random.key(3329), jnp.ones(1000, bool)
    assert bool(jax.random.bernoulli(key, 0.3, (1000,))[864]), "the search's key moved"
    batch = np.asarray(dpd_fvae.local_dp_batch(key, mask, jnp.float32(300.0)))
    assert not batch[864], "a local-DP batch selects above its accounted rate (float32 bernoulli)"


def test_local_dp_client_out_of_budget_contributes_nothing():
    state = _trainer().init()
    hook = _hook("local")
    fresh = _client_state(state, 0)  # (derived arrays keep its sharding: no recompilation)
    spent = fresh._replace(participations=fresh.participations + 3,
                           budget=fresh.participations + 3)
    out = hook(state.params, spent, _client(0), (), jax.random.key(5))
    assert _leaves_equal(out.params, state.params), "a spent client changed the decoder"
    assert _leaves_equal(out.state, spent), "a spent client changed its state"
    assert float(out.metrics["active"]) == 0.0
    live = hook(state.params, spent._replace(participations=fresh.participations + 2),
                _client(0), (), jax.random.key(5))
    assert not _leaves_equal(live.params, state.params), "a client in budget did not train"
    assert int(live.state.participations) == 3, "participation not counted"


def test_a_local_participation_is_accounted_as_every_step_the_client_takes():
    # Every event, budget and eps of local DP derives from this event: a step fewer here
    # would pass every test that computes its expectation with it.
    config = dataclasses.replace(_CONFIG, dp="local", local_epochs=3)  # B = 4
    step = dp_event.PoissonSampledDpEvent(4 / 6, dp_event.GaussianDpEvent(1.5))
    assert dpd_fvae.local_participation_event(config, 6, 1.5) == (
        dp_event.SelfComposedDpEvent(step, 3 * 2)), (
        "6 examples at B = 4: 3 epochs of 2 Poisson steps of rate 4/6 each round")


def test_participation_budget_is_the_most_the_target_eps_affords():
    config = dataclasses.replace(_CONFIG, dp="local", noise_multiplier=1.0,
                                 target_epsilon=8.0, rounds=50)
    budget = int(dpd_fvae.participation_budgets(config, _COUNTS[:1], 1.0)[0])
    event = dpd_fvae.local_participation_event(config, int(_COUNTS[0]), 1.0)

    def eps(n):
        return privacy.epsilon(dp_event.SelfComposedDpEvent(event, n), config.delta)

    assert 0 < budget < 50, f"budget {budget} does not bind"
    assert eps(budget) <= 8.0 < eps(budget + 1), f"budget {budget} is not the largest affordable"


@pytest.mark.parametrize("field", ["noise_multiplier", "target_epsilon"])
def test_a_non_private_run_refuses_privacy_settings(field):
    # Before, --dp=none ignored them and reported "non-private" (found by a CLI audit).
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(_CONFIG, dp="none", **{field: 1.0})
    assert error.value.field == field and "--dp=none" in error.value.message, str(error.value)


@pytest.mark.parametrize("dp", ["central", "none"])
def test_a_microbatch_size_outside_local_dp_is_refused(dp):
    # Before, --dp=central and --dp=none ignored it silently (found by a review).
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(_CONFIG, dp=dp, noise_multiplier=None, microbatch_size=8)
    assert error.value.field == "microbatch_size" and f"--dp={dp}" in error.value.message, (
        str(error.value))


@pytest.mark.parametrize("flag", ["l2_clip", "delta"])
def test_privacy_flags_are_unused_with_dp_none(flag):
    # The binary's table for cli.refuse_unused: --dp=none builds no clipping mechanism
    # (the engine gets no clip, local training no GaussianSumMechanism) and no ledger, so
    # a given --l2_clip or --delta was silently ignored.
    for dp in ("central", "local"):
        private = dpd_fvae.unused_flags(dataclasses.replace(_CONFIG, dp=dp), evaluate=True)
        assert not private[flag][0], f"--{flag} takes effect with --dp={dp}: {private}"
    none = dpd_fvae.unused_flags(_CONFIG, evaluate=True)
    assert none[flag][0], f"--{flag} has no effect with --dp=none: {none}"


@pytest.mark.parametrize("evaluate", [True, False])
def test_num_synthetic_is_unused_without_evaluate(evaluate):
    # Only the binary's --evaluate draws --num_synthetic samples (experiments.evaluate
    # takes --num_samples); with --noevaluate it was silently ignored.
    table = dpd_fvae.unused_flags(_CONFIG, evaluate=evaluate)
    assert table["num_synthetic"][0] is not evaluate, (
        f"--num_synthetic must be unused exactly when --evaluate is off: {table}")


def test_a_microbatch_size_with_local_dp_is_accepted():
    config = dataclasses.replace(_CONFIG, dp="local", microbatch_size=8)
    assert config.microbatch_size == 8, "local DP's microbatch size was not kept"


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_a_target_no_client_affords_once_is_a_config_error(noise):
    # Before, every budget was 0: no client trained and the initial decoder was released
    # as "(0, delta)-DP" with exit 0 (found by a CLI audit).
    config = dataclasses.replace(_CONFIG, dp="local", noise_multiplier=noise,
                                 target_epsilon=0.01, rounds=5)
    with pytest.raises(ConfigError) as error:
        dpd_fvae.participation_budgets(config, _COUNTS, noise)
    assert error.value.field == "target_epsilon" and "cannot be met" in error.value.message, (
        str(error.value))


def test_the_local_ledger_is_the_worst_clients_every_local_step():
    # A participation is local_epochs x ceil(n_c / B) DP-SGD steps, and the ledger states
    # the client of most eps. In local_resume every client takes one step a round, in
    # as many rounds as the others: neither the steps nor the worst client showed there.
    config = dataclasses.replace(_CONFIG, dp="local", noise_multiplier=1.0, local_epochs=3)
    counts, participations = np.array([4, 2, 3]), np.array([1, 3, 2])  # one batch each
    ledger = dpd_fvae.local_ledger(config, counts, participations, np.full(3, 5), 1.0)
    assert ledger.metadata["worst_client"] == 1, (
        f"client 1 took part most, at the same cost a round: {ledger.metadata['worst_client']}")
    worst = dp_event.SelfComposedDpEvent(dpd_fvae.local_participation_event(config, 2, 1.0), 3)
    assert ledger.epsilon() == privacy.rdp_epsilon(worst, config.delta), (
        "the ledger must count 3 local steps in each of the worst client's 3 rounds")


def test_adopting_budgets_keeps_clients_within_them_and_takes_the_new_budgets():
    trainer = _trainer(dp="local", noise_multiplier=1.0, target_epsilon=8.0, rounds=50)
    state = trainer.init()
    clients = state.client_states
    state = state._replace(client_states=clients._replace(budget=clients.budget + 10))
    adopted = trainer.adopt_budgets(state)
    np.testing.assert_array_equal(
        adopted.client_states.budget, trainer.budgets,
        err_msg="the restored state must take this invocation's budgets")


_CENTRAL = dataclasses.replace(_CONFIG, num_clients=8, batch_size=180, dp="central",
                               noise_multiplier=1.0)


@pytest.fixture(scope="module")
def central_run(tmp_path_factory) -> pathlib.Path:
    """A 2-round `_CENTRAL` run's workdir, shared by the resume tests below (each resumes
    a copy): the run and its round's compilation once, not once per test."""
    workdir = tmp_path_factory.mktemp("central_run")
    dpd_fvae.train(_CENTRAL, workdir, log=lambda _: None, mesh=_ONE_DEVICE)
    return workdir


@pytest.mark.parametrize("dp,noise", [
    # slow: ~8 s; budgets are --rounds outside local DP alike, the fast suite keeps central
    pytest.param("none", None, marks=pytest.mark.slow),
    ("central", 1.0)])
def test_a_resume_with_more_rounds_keeps_every_client_training(tmp_path, dp, noise, request):
    # Every client takes part in each of the first 2 rounds (rate 1); outside local DP
    # their budget is --rounds, which the resume raises to 4. Before, the restored state
    # kept budget 2, and every client sent a zero delta in rounds 3 and 4. (8 clients of
    # ~180 examples, batch 180: one local step a round, not _CONFIG's ~90 of batch 4.)
    config = dataclasses.replace(_CENTRAL, dp=dp, noise_multiplier=noise)
    if config == _CENTRAL:  # its first 2 rounds: a copy of `central_run`
        shutil.copytree(request.getfixturevalue("central_run"), tmp_path, dirs_exist_ok=True)
    else:
        dpd_fvae.train(config, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE)
    dpd_fvae.train(dataclasses.replace(config, rounds=4), tmp_path, log=lambda _: None,
                   mesh=_ONE_DEVICE)
    active = {r["round"]: r["client_active"] for r in Workdir(tmp_path).read_diagnostics()}
    assert active == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}, (
        f"fraction of sampled clients that trained, by round: {active}")


def test_a_central_resume_on_other_training_data_is_refused_naming_the_flag(
        tmp_path, monkeypatch, central_run):
    # Checked before the checkpoint's ledger is read for z (`checkpointed_spend`): other
    # data must not continue its model and ledger. (A copy of `central_run`'s workdir.)
    shutil.copytree(central_run, tmp_path, dirs_exist_ok=True)
    other_data.assert_resume_on_other_data_is_refused(  # digits is embedded: --dataset
        monkeypatch, lambda: dpd_fvae.train(dataclasses.replace(_CENTRAL, rounds=4), tmp_path,
                                            log=lambda _: None, mesh=_ONE_DEVICE),
        tmp_path, "dataset")


def test_adopting_budgets_some_clients_already_exceed_is_refused():
    # Before, those clients trained no more and the decoder was released with a worst
    # client eps above the new target (a warning said how many).
    trainer = _trainer(dp="local", noise_multiplier=1.0, target_epsilon=8.0, rounds=50)
    state = trainer.init()
    past = np.array(trainer.budgets) + np.array([2, 0, 0, 1])  # clients 0 and 3 overspent
    state = state._replace(client_states=state.client_states._replace(
        participations=jnp.asarray(past, jnp.int32)))
    with pytest.raises(ConfigError) as error:
        trainer.adopt_budgets(state)
    assert error.value.field == "target_epsilon" and "2 of 4 clients" in error.value.message, (
        f"the error must name the target and the 2 of 4 clients past it: {error.value}")


def test_a_resume_under_a_target_clients_already_exceed_leaves_the_workdir_as_it_was(
        tmp_path, local_resume):
    # Before, the refusal came after the resume pinned config.json (with the refused
    # --target_epsilon and --rounds) and truncated the logs. local_resume's clients took
    # part in its 4 rounds at the z its first target (8 for 2 rounds) calibrated: a
    # target of 8 affords each 2 participations. (Its workdir, copied: its compiled round.)
    summary = local_resume.summary
    assert summary["participations_max"] >= 3, (
        f"the test needs a client that took part in 3 rounds: {summary['participations_max']}")
    shutil.copytree(local_resume.workdir, tmp_path, dirs_exist_ok=True)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    lowered = dataclasses.replace(local_resume.resumed, rounds=5, target_epsilon=8.0)
    with pytest.raises(ConfigError) as error:
        dpd_fvae.train(lowered, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE)
    assert error.value.field == "target_epsilon" and "already spent" in error.value.message, (
        f"the resume must be refused naming the target clients exceed: {error.value}")
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    changed = sorted(name for name in before.keys() | after.keys()
                     if before.get(name) != after.get(name))
    assert not changed, f"a refused resume must leave the workdir as it was; changed: {changed}"


def test_central_ledger_is_user_level_and_decoder_keeps_the_contract(tmp_path):
    # The real digits split: 8 clients of ~180 images, 2 local steps of batch 90. The local
    # (per-example) ledger is tested through the binary (tests/experiments/test_dpd_fvae.py).
    config = dataclasses.replace(_CONFIG, num_clients=8, client_fraction=0.5, batch_size=90,
                                 sync="ed", dp="central", noise_multiplier=1.0)
    summary = dpd_fvae.train(config, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE)
    ledger = Workdir(tmp_path).read_json("ledger.json")
    assert ledger["unit"] == summary["unit"] == "user", f"central unit {ledger['unit']}"
    assert summary["epsilon_rdp"] > 0 and ledger["neighboring_relation"] == "add_or_remove_one"

    generator, params = contract.load_generator(Workdir(tmp_path), "dpd_fvae")
    images, labels = generator.sample(params, jax.random.key(0), 5)
    assert images.shape == (5, *_SHAPE) and labels.shape == (5,), "contract shapes"
    assert float(images.min()) >= 0 and float(images.max()) <= 1, "contract: [0, 1]"
    _, asked = generator.sample(params, jax.random.key(0), 3, jnp.array([7, 7, 2]))
    assert asked.tolist() == [7, 7, 2], "a conditional generator must honour the labels asked"
    assert (tmp_path / "samples.png").exists(), "no per-class sample grid"


class LocalResume(NamedTuple):
    """A local-DP run of 2 rounds at target eps 8, resumed to 4 rounds at 16, in `workdir`."""

    config: dpd_fvae.DpdFvaeConfig  # the first invocation's
    resumed: dpd_fvae.DpdFvaeConfig  # the second's
    workdir: pathlib.Path
    first: dict  # the summaries of both
    summary: dict


@pytest.fixture(scope="module")
def local_resume(tmp_path_factory) -> LocalResume:
    """Shared by the tests of a resumed local run (the runs are most of their time);
    they only read its workdir (a test that changes it works on a copy). The killed local
    run takes its config and z, so it runs this run's compiled round.

    Batch 256 holds each client's ~180 examples: one local step of rate 1 per round,
    whose RDP is closed-form (at batch 90, rate 1/2, each z calibration took ~10 s)."""
    workdir = tmp_path_factory.mktemp("local_resume")
    config = dataclasses.replace(_CONFIG, num_clients=8, client_fraction=1.0, batch_size=256,
                                 dp="local", target_epsilon=8.0)
    first = dpd_fvae.train(config, workdir, log=lambda _: None, mesh=_ONE_DEVICE)
    resumed = dataclasses.replace(config, rounds=4, target_epsilon=16.0)
    summary = dpd_fvae.train(resumed, workdir, log=lambda _: None, mesh=_ONE_DEVICE)
    return LocalResume(config, resumed, workdir, first, summary)


def test_resumed_local_run_keeps_its_z_and_adopts_the_new_budgets(local_resume):
    # Local DP recomputes each client's eps from its participation count at one z, so a
    # resume must not recalibrate z: with --rounds 2 -> 4 a new z (calibrated for 4
    # participations) made the ledger report eps 4.7 for what cost eps 8.
    config, resumed, workdir, first, summary = local_resume
    assert summary["noise_multiplier"] == first["noise_multiplier"], "z changed on resume"
    assert summary["participations_max"] > first["participations_max"], (
        "the raised target's budgets were not adopted: no client trained after the resume")
    meta = Workdir(workdir).read_json("ledger.json")["metadata"]
    event = dpd_fvae.local_participation_event(
        resumed, meta["worst_client_examples"], first["noise_multiplier"])
    true_eps = privacy.epsilon(
        dp_event.SelfComposedDpEvent(event, meta["worst_client_participations"]), config.delta)
    assert summary["epsilon_rdp"] == true_eps <= 16.0, (
        f"ledger eps {summary['epsilon_rdp']} but the worst client's participations at the "
        f"z they ran with cost {true_eps}")


def test_local_rerun_without_checkpoints_after_a_changed_resume_is_refused(
        local_resume, tmp_path):
    # The resume keeps z; with checkpoints/ deleted a rerun would calibrate a new z from
    # the resumed flags and replay the logged rounds with it (eps 11.2 -> 16.0 reported).
    workdir = tmp_path / "copy"
    shutil.copytree(local_resume.workdir, workdir)  # the fixture's workdir stays as it is
    shutil.rmtree(workdir / "checkpoints")
    with pytest.raises(ConfigError, match="local noise multiplier") as error:
        dpd_fvae.train(local_resume.resumed, workdir, log=lambda _: None, mesh=_ONE_DEVICE)
    assert error.value.field == "workdir", error.value.field


def test_local_logs_of_this_noise_pass_and_of_another_are_refused(tmp_path):
    wd = Workdir(tmp_path)
    wd.append_metrics({"round": 1})  # written before z was logged
    wd.append_metrics({"round": 2, dpd_fvae.LOCAL_NOISE_KEY: 0.95})
    dpd_fvae.refuse_logs_of_other_local_noise(wd, 0.95)
    with pytest.raises(ConfigError, match="round 2 with local noise multiplier 0.95"):
        dpd_fvae.refuse_logs_of_other_local_noise(wd, 0.75)


def test_local_logs_of_a_noise_that_differs_in_its_last_digits_are_refused(tmp_path):
    # A z calibrated afresh from other flags differs from the logged one anywhere, down to
    # its last digits: any difference is another mechanism (the test above is 20% off).
    wd = Workdir(tmp_path)
    wd.append_metrics({"round": 2, dpd_fvae.LOCAL_NOISE_KEY: 0.95})
    with pytest.raises(ConfigError, match="round 2 with local noise multiplier 0.95"):
        dpd_fvae.refuse_logs_of_other_local_noise(wd, 0.95 * (1 + 1e-6))


def test_local_rounds_logged_past_the_checkpoint_refuse_other_budgets(tmp_path):
    # The target sets each client's participation budget; a replay of rounds 3-4 under
    # another would stop other clients in rounds whose logged releases they took part in.
    wd = Workdir(tmp_path)
    for r in (2, 4):
        wd.append_metrics({"round": r, dpd_fvae.LOCAL_NOISE_KEY: 0.95,
                           dpd_fvae.LOCAL_TARGET_KEY: 8.0})
    dpd_fvae.refuse_logs_of_other_local_noise(wd, 0.95, 8.0, checkpoint_round=2)
    dpd_fvae.refuse_logs_of_other_local_noise(wd, 0.95, 10.0, checkpoint_round=4)  # all kept
    with pytest.raises(ConfigError, match="round 4 past its last checkpoint") as error:
        dpd_fvae.refuse_logs_of_other_local_noise(wd, 0.95, 10.0, checkpoint_round=2)
    assert error.value.field == "target_epsilon", error.value.field


@pytest.mark.parametrize("torn, checkpoint_round, refused", [
    # Cut before its target: the budgets it was logged with are unknown.
    ('{"round": 4, "clients_out_of_budget": 0, "epsilon_rdp_worst_client": 1.5, "local_n',
     2, "workdir"),
    ('{"round": 4, "local_noise_multiplier": 0.95, "local_target_epsilon": 8.0, "lo', 2,
     "target_epsilon"),  # its target, whole: 8.0, not this run's 10.0
    ('{"round": 4, "clients_out_of_budget": 0, "ep', 4, None),  # at the checkpoint: kept
])
def test_a_torn_local_record_past_the_checkpoint_needs_its_target(
        tmp_path, torn, checkpoint_round, refused):
    wd = Workdir(tmp_path)
    wd.append_metrics({"round": 2, dpd_fvae.LOCAL_NOISE_KEY: 0.95,
                       dpd_fvae.LOCAL_TARGET_KEY: 10.0})
    with wd.file("metrics.jsonl").open("a") as f:
        f.write(torn)
    check = functools.partial(dpd_fvae.refuse_logs_of_other_local_noise, wd, 0.95, 10.0,
                              checkpoint_round=checkpoint_round)
    if refused is None:
        check()
        return
    with pytest.raises(ConfigError) as error:
        check()
    assert error.value.field == refused, (
        f"a torn round-4 record past checkpoint {checkpoint_round} must be refused naming "
        f"{refused}: {error.value}")


@pytest.mark.parametrize("pinned, refused", [(10.0, None), (8.0, "target_epsilon")])
def test_a_torn_local_record_cut_before_its_target_has_config_jsons(
        tmp_path, pinned, refused):
    # A run killed inside its metrics append (crash_writes dpd_fvae --mode=local, point
    # 4) left a line cut before its target; the run that logged it pinned its target in
    # config.json first, so its rerun with the same flags resumes (it was refused).
    wd = Workdir(tmp_path)
    wd.write_json("config.json", {"dp": "local", "target_epsilon": pinned})
    with wd.file("metrics.jsonl").open("a") as f:
        f.write('{"round": 1, "clients_out_of_budget": 0, "epsilon_rdp_worst_client": 1.5, '
                '"local_n')
    check = functools.partial(dpd_fvae.refuse_logs_of_other_local_noise, wd, 0.95, 10.0)
    if refused is None:
        check()
        return
    with pytest.raises(ConfigError, match="target_epsilon=8.0") as error:
        check()
    assert error.value.field == refused, error.value


def test_a_local_resume_on_other_training_data_is_refused_naming_the_flag(
        local_resume, tmp_path, monkeypatch):
    # A local run keeps its checkpoint's z without reading a ledger (no
    # `checkpointed_spend`): the resume of its rounds (`run_rounds`) must check the data.
    workdir = tmp_path / "copy"
    shutil.copytree(local_resume.workdir, workdir)  # the fixture's workdir stays as it is
    resumed = dataclasses.replace(local_resume.resumed, rounds=6)
    other_data.assert_resume_on_other_data_is_refused(  # digits is embedded: --dataset
        monkeypatch, lambda: dpd_fvae.train(resumed, workdir, log=lambda _: None,
                                            mesh=_ONE_DEVICE), workdir, "dataset")


def test_central_calibration_meets_the_target_with_the_engines_own_round_event():
    # The noise is calibrated with `central_event`; the ledger records the engine's round
    # event. If the two disagreed (another sampling rate), the run would be stopped early
    # by its budget guard with its noise calibrated for all its rounds.
    trainer = _trainer(dp="central", client_fraction=0.5, rounds=20, target_epsilon=5.0)
    rounds = dp_event.SelfComposedDpEvent(trainer.engine.round_event(), 20)
    eps = privacy.epsilon(rounds, trainer.config.delta)
    assert 0.99 * 5.0 <= eps <= 5.0, (
        f"20 rounds of the engine's event at the calibrated z spend eps {eps:.4f}, not 5")


def test_resumed_central_calibration_ends_at_the_new_target():
    # Rate 1: the rounds' RDP is closed-form (at rate 0.2 the three calibrations took
    # ~10 s); what the checkpoint spent is composed the same way at any rate.
    config = dataclasses.replace(_CONFIG, num_clients=100, client_fraction=1.0, rounds=20,
                                 dp="central", target_epsilon=5.0)
    z_first = dpd_fvae.resolve_noise_multiplier(config, _COUNTS)
    spent = privacy.PrivacyLedger("user", "add_or_remove_one", config.delta)
    spent.record(dpd_fvae.central_event(config, z_first, 1), 10)  # a checkpoint of round 10
    longer = dataclasses.replace(config, rounds=40, target_epsilon=8.0)
    z = dpd_fvae.resolve_noise_multiplier(longer, _COUNTS, Spent(10, spent))
    spent.record(dpd_fvae.central_event(config, z, 1), 30)
    assert 0.99 * 8.0 <= spent.epsilon() <= 8.0, (
        f"10 rounds at z {z_first:.4f} then 30 at z {z:.4f} spend eps {spent.epsilon():.4f}: "
        "the remaining rounds must be calibrated against the checkpoint's spend")


def _keys(tree) -> set[str]:
    """Every dict key in a JSON tree, at any depth."""
    if isinstance(tree, dict):
        return set(tree).union(*(_keys(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(_keys(v) for v in tree))
    return set()


def test_central_run_keeps_participation_counts_out_of_the_release(tmp_path):
    # Sync "d" counts each client's participations; in central mode their sum is the sum of
    # the realised Poisson cohort sizes, a raw-data figure (one user's membership moves it).
    # The binary's TINY central config at z 2 on all 8 devices: the round that
    # tests/experiments/test_dpd_fvae.py's test_a_run_resumes_on_another_device_count runs
    # in-process, so the session compiles it once (its persistent cache).
    config = dataclasses.replace(_CONFIG, num_clients=8, client_fraction=0.5, batch_size=90,
                                 dp="central", noise_multiplier=2.0)
    summary = dpd_fvae.train(config, tmp_path, log=lambda _: None)  # all 8 devices
    wd = Workdir(tmp_path)
    leaked = {k for k in _keys(wd.read_json("summary.json")) if "participations" in k}
    assert not leaked, f"summary.json releases the raw-data participation figures {leaked}"
    report = [line for line in wd.file(REPORT_FILE).read_text().splitlines()
              if "participation" in line and DIAGNOSTICS_JSON not in line]
    assert not report, f"report.md shows participation figures outside the pointer: {report}"
    diagnostics = wd.read_json(DIAGNOSTICS_JSON)
    assert diagnostics["note"] == DIAGNOSTICS_JSON_NOTE, "not labelled 'not a release'"
    cohorts = sum(row["cohort_size"] for row in wd.read_diagnostics())  # eval_every 1
    assert diagnostics["participations_mean"] * config.num_clients == cohorts > 0, (
        f"diagnostics.json's participations {diagnostics} must count the {cohorts} clients "
        f"the cohorts in {DIAGNOSTICS_FILE} held over {summary['rounds']} rounds")


def test_config_with_a_target_only_is_calibrated_not_run_at_the_default_noise():
    """A notebook's `DpdFvaeConfig(target_epsilon=...)` must calibrate z, as the binary does."""
    central = dpd_fvae.DpdFvaeConfig(dp="central", num_clients=100, client_fraction=1.0,
                                     rounds=20, target_epsilon=5.0)  # rate 1: closed-form RDP
    assert dpd_fvae.resolve_noise_multiplier(central, _COUNTS) != (
        dpd_fvae.DEFAULT_NOISE_MULTIPLIER), "z must come from the target, not the default"
    assert dpd_fvae.resolve_noise_multiplier(dataclasses.replace(
        central, target_epsilon=None), _COUNTS) == dpd_fvae.DEFAULT_NOISE_MULTIPLIER, (
        "without z or a target the default z applies")


def test_local_calibration_takes_the_z_of_the_client_size_that_needs_the_most(monkeypatch):
    # Each client size is calibrated to afford its expected participations; the run takes
    # the largest z, or the sizes that need more noise get budgets below them. Here each
    # "calibrated z" is the steps of a participation (B = 4): 1, 3 and 2.
    def calibrate(make_event, target_epsilon, delta, relation):
        return float(make_event(1.0).event.count)

    monkeypatch.setattr(privacy, "calibrate_noise_multiplier", calibrate)
    config = dataclasses.replace(_CONFIG, dp="local", target_epsilon=8.0)
    assert dpd_fvae.resolve_noise_multiplier(config, np.array([3, 9, 5])) == 3.0, (
        "local DP must run at the largest z of its client sizes")


def test_central_dp_without_noise_is_a_flag_error():
    # z 0 would build a noiseless engine that run_rounds refuses a ledger (a traceback).
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(_CONFIG, dp="central", noise_multiplier=0.0)
    assert error.value.field == "noise_multiplier", (
        f"--dp=central --noise_multiplier=0 must name --noise_multiplier, not {error.value.field}")


def test_a_short_clients_step_is_on_the_mean_loss_of_its_own_examples():
    # Client 1 holds 3 examples, batch 4: the batch repeats one of them in its masked slot,
    # which must not count. Its encoder's logvar is pinned to -30 (z = mu), so the loss is
    # a function of the examples alone, whatever reparameterisation noise the hook draws.
    trainer, state = _trainer(), _trainer().init()
    start = _client_state(state, 1)
    logvar = start.encoder["params"]["logvar"]
    pinned = {"kernel": jnp.zeros_like(logvar["kernel"]),
              "bias": jnp.full_like(logvar["bias"], -30.0)}
    encoder = {"params": {**start.encoder["params"], "logvar": pinned}}
    out = _hook("none")(state.params, start._replace(encoder=encoder), _client(1), (),
                        jax.random.key(8))
    images, labels = (x[:3] for x in _client(1).arrays)

    def mean_loss(decoder_params):
        loss, _, _ = vae.example_losses(trainer.encoder, trainer.decoder, encoder, decoder_params,
                                        images, labels, jnp.zeros((3, 2)), _LOCAL.beta)
        return jnp.mean(loss)

    # SGD, lr 1: the delta is minus the gradient (jitted: one program, not ~100 eager ops)
    grads = jax.jit(jax.grad(mean_loss))(state.params)
    want = -np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])
    np.testing.assert_allclose(
        _flat_change(out.params, state.params), want, rtol=1e-4, atol=1e-6,
        err_msg="a 3-example client's step with batch 4 must descend the mean loss of its 3 "
        "examples (the masked slot of the batch must not count)")


def test_config_defaults_are_the_papers_mnist_setting():
    config = dpd_fvae.DpdFvaeConfig()
    got = (config.latent_dim, config.encoder_features, config.decoder_features, config.beta,
           config.optimizer, config.learning_rate, config.sync)
    want = (8, (32, 64), (64, 32), 0.01, "adam", 1e-3, "d")
    assert got == want, f"DPD-fVAE defaults {got}, the paper's are {want}"


def test_a_local_run_killed_after_a_logged_round_leaves_a_ledger_json_that_counts_it(
        tmp_path, monkeypatch, local_resume):
    # Local DP's ledger is the worst client's, built from the participation counts; it
    # used to be written at the run's end only. (local_resume's config and z: its round's
    # program, already compiled, not another.)
    config = dataclasses.replace(local_resume.config, rounds=3, target_epsilon=None,
                                 noise_multiplier=local_resume.first["noise_multiplier"])
    kill_after_metrics_record(monkeypatch, "round", 2)
    with pytest.raises(KilledAtRelease):
        dpd_fvae.train(config, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE)
    assert_ledger_json_covers_metrics(tmp_path, "epsilon_rdp_worst_client", rel=1e-12)


@pytest.mark.parametrize("dp, noise, canaries, says", [
    ("local", 1.0, 20, "--dp=central, not --dp=local"),  # noise per client, unit one example
    ("none", None, 20, "--dp=central, not --dp=none"),  # no noise, no ledger
    ("central", 1.0, 19, ">= 20"),  # fewer than audit.MIN_CANARIES
])
def test_an_audit_that_cannot_apply_is_a_config_error_naming_it(dp, noise, canaries, says):
    with pytest.raises(ConfigError, match=says) as error:
        dataclasses.replace(_CONFIG, dp=dp, noise_multiplier=noise, audit_canaries=canaries)
    assert error.value.field == "audit_canaries", f"names {error.value.field}: {error.value}"


def test_audit_canaries_stand_one_over_z_noise_stds_out_after_one_all_sampled_round(tmp_path):
    # One round with every user and every canary sampled (rate 1) is one Gaussian mechanism
    # on the sum of clipped decoder deltas: a canary inserted at weight C moves the decoder
    # C/E[cohort] along its direction under noise of std z C/E[cohort], so the inserted
    # canaries stand 1/z held-out stds out (the ledger's z). The decoder has d ~ 80,000
    # params (one 64-wide layer), so 500 canaries' overlaps (K/d) and the 8 users' clipped
    # deltas (a sum of norm <= 8: variance <= 64/d) are negligible; the standard error of
    # mu from 500 + 500 scores is ~0.07. Canaries not inserted give mu ~0, at weight C/2
    # ~0.5, with noise of std z C/2 ~2.
    config = dataclasses.replace(
        _CONFIG, num_clients=8, client_fraction=1.0, rounds=1, batch_size=90,
        decoder_features=(64,), dp="central", noise_multiplier=1.0, audit_canaries=500)
    summary = dpd_fvae.train(config, tmp_path, log=lambda _: None, mesh=_ONE_DEVICE)
    result = summary["audit"]
    assert result["mu"] == pytest.approx(1 / summary["noise_multiplier"], abs=0.25), (
        f"the canaries stand mu = {result['mu']:.3f} noise stds out, not the ledger's 1/z = "
        f"{1 / summary['noise_multiplier']:g}: not inserted at weight C with its noise")
    exact = audit.gaussian_epsilon(1 / summary["noise_multiplier"], config.delta)  # 4.377
    assert result["epsilon_lower_bound"] <= exact <= summary["epsilon_rdp"], (
        f"the lower bound {result['epsilon_lower_bound']:.3f} exceeds the exact eps "
        f"{exact:.3f} of one Gaussian mechanism at the ledger's z, or the ledger's "
        f"{summary['epsilon_rdp']:.3f} is below it")
