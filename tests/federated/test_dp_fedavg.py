"""The DP-FedAvg round: sensitivity, noise, non-finite updates, padding, sharding, states."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.federated import (
    AdaptiveClipping,
    ClientData,
    DpFedAvg,
    DpFedAvgConfig,
    Subpopulation,
    client_mesh,
)
from tests import delta_warning
from tests.federated import toy

DIM = 6


def make_engine(deltas, mesh=None, update=toy.add_own_vector, **config):
    config.setdefault("clients_per_round", len(deltas))
    config.setdefault("sampling", "fixed")
    return DpFedAvg(update, optax.sgd(1.0), toy.vector_clients(deltas),
                    DpFedAvgConfig(**config), mesh=mesh)


def server_update(engine, key, init=None, clip_norm=None):
    """The change of the shared params in one round (SGD lr 1: the noised mean update),
    from a state whose clip norm is `clip_norm` (None: the engine's initial one)."""
    state = engine.init(toy.params_of(DIM) if init is None else init)
    if clip_norm is not None:
        state = state._replace(clip_norm=jnp.float32(clip_norm))
    new_state, metrics = engine.round(state, key)
    return np.asarray(new_state.params - state.params), metrics


def random_deltas(n, seed=0, scale=1.0):
    return scale * np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def test_one_huge_client_moves_the_pre_noise_mean_by_at_most_clip_over_expected_size():
    deltas = random_deltas(20)
    huge = deltas.copy()
    huge[7] = 1e6
    clip, m = 0.5, 20
    key = jax.random.key(0)
    a, _ = server_update(make_engine(deltas, l2_clip=clip, clients_per_round=m), key)
    b, _ = server_update(make_engine(huge, l2_clip=clip, clients_per_round=m), key)
    moved = np.linalg.norm(a - b)
    assert moved <= clip / m * (1 + 1e-5), f"one user moved the mean by {moved} > C/m = {clip / m}"
    assert moved > 0.5 * clip / m, "the huge client is clipped, not dropped"


def test_added_noise_has_std_z_clip_over_expected_clients():
    dim, z, clip, m = 20_000, 1.3, 0.5, 8
    deltas = np.zeros((16, dim), np.float32)
    engine = DpFedAvg(toy.add_own_vector, optax.sgd(1.0), toy.vector_clients(deltas),
                      DpFedAvgConfig(clients_per_round=m, l2_clip=clip, noise_multiplier=z))
    state = engine.init(jnp.zeros((dim,), jnp.float32))
    new_state, _ = engine.round(state, jax.random.key(3))
    noise = np.asarray(new_state.params)
    expected = z * clip / m
    # 20,000 normal draws: the sample std is within 2% of sigma with overwhelming probability.
    assert abs(noise.std() / expected - 1) < 0.02, f"noise std {noise.std()} != zC/m {expected}"
    assert abs(noise.mean()) < 4 * expected / np.sqrt(dim), f"noise mean {noise.mean()} is not 0"


def test_non_finite_updates_are_zeroed_and_counted():
    deltas = random_deltas(8, scale=0.01)
    broken = deltas.copy()
    broken[2, 0], broken[5, 3] = np.nan, np.inf
    without = deltas.copy()
    without[[2, 5]] = 0.0
    key = jax.random.key(1)
    got, metrics = server_update(make_engine(broken, l2_clip=1.0), key)
    want, _ = server_update(make_engine(without, l2_clip=1.0), key)
    assert np.all(np.isfinite(got)), "a non-finite update leaked into the params"
    np.testing.assert_allclose(got, want, atol=1e-7, err_msg="non-finite updates must count as 0")
    assert int(metrics.diagnostics["nonfinite_updates"]) == 2, (
        "both non-finite updates should be counted")


def test_round_sums_exactly_the_sampled_clients_divided_by_the_expected_size():
    deltas = random_deltas(40, seed=2)
    deltas[0] = np.nan  # client 0 is the gather target of padded slots: it must not leak
    clip, m = 0.7, 10.0
    engine = make_engine(deltas, sampling="poisson", clients_per_round=m, l2_clip=clip,
                         chunk_size=8)  # several passes, most with padded slots
    key = jax.random.key(11)
    got, metrics = server_update(engine, key)
    indices, count = engine.cohort(key)
    cohort = np.asarray(indices)[: int(count)]
    norms = np.linalg.norm(deltas[cohort], axis=1, keepdims=True)
    clipped = np.where(np.isfinite(norms), deltas[cohort] * np.minimum(1, clip / norms), 0.0)
    want = clipped.sum(0) / m
    assert int(metrics.diagnostics["cohort_size"]) == int(count) > 8, (
        "the cohort should overflow one chunk")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7,
                               err_msg="the mean must be the cohort's clipped sum / expected size")


def test_padding_and_chunking_do_not_change_the_result():
    deltas = random_deltas(30, seed=4)
    key = jax.random.key(5)
    common = {"sampling": "poisson", "clients_per_round": 20, "l2_clip": 0.3}
    small, _ = server_update(make_engine(deltas, chunk_size=8, **common), key)
    large, _ = server_update(make_engine(deltas, chunk_size=32, **common), key)
    np.testing.assert_allclose(small, large, atol=1e-7,
                               err_msg="passes of 8 and one padded pass of 32 must agree")


def test_fixed_cohort_has_exactly_m_distinct_clients():
    engine = make_engine(random_deltas(50), clients_per_round=7)
    indices, count = engine.cohort(jax.random.key(0))
    assert int(count) == 7 and len(set(np.asarray(indices).tolist())) == 7, "need 7 distinct"


def test_client_states_persist_for_sampled_clients_only():
    n = 24
    engine = DpFedAvg(toy.count_visits, optax.sgd(1.0), toy.vector_clients(np.zeros((n, DIM))),
                      DpFedAvgConfig(clients_per_round=6, l2_clip=1.0, chunk_size=8))
    state = engine.init(toy.params_of(DIM), client_states=jnp.zeros((n,), jnp.int32))
    visits = np.zeros(n, np.int32)
    for r in range(4):
        key = jax.random.key(r)
        indices, count = engine.cohort(key)
        visits[np.asarray(indices)[: int(count)]] += 1
        state, _ = engine.round(state, key)
    np.testing.assert_array_equal(np.asarray(state.client_states), visits,
                                  err_msg="each client's state must count its own rounds")


def test_padded_slots_never_write_over_client_0s_state():
    # A padded slot trains on client 0's data (the gather target) and is left out of the
    # sums; its state must be dropped too, or client 0's own round is written over with its
    # old state (DPD-fVAE's participation counts: a lost count is a release left uncounted).
    # All 6 clients are sampled, in a pass of 8: 2 padded slots.
    engine = DpFedAvg(toy.count_visits, optax.sgd(1.0), toy.vector_clients(np.zeros((6, DIM))),
                      DpFedAvgConfig(clients_per_round=6, sampling="fixed", l2_clip=1.0,
                                     chunk_size=8), mesh=client_mesh(jax.devices()[:1]))
    state = engine.init(toy.params_of(DIM), client_states=jnp.zeros((6,), jnp.int32))
    state, _ = engine.round(state, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(state.client_states), np.ones(6),
                                  err_msg="every client took part once; padding counts none")


def test_eight_devices_give_the_result_of_one_device():
    assert jax.device_count() == 8, "conftest should provide 8 CPU devices"
    deltas = random_deltas(40, seed=6)
    config = {"sampling": "poisson", "clients_per_round": 12, "l2_clip": 0.5,
              "noise_multiplier": 0.8, "adaptive_clipping": AdaptiveClipping(),
              "chunk_size": 16}
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        engine = make_engine(deltas, mesh=client_mesh(devices), **config)
        state = engine.init(toy.params_of(DIM))
        for r in range(3):
            state, _ = engine.round(state, jax.random.key(r))
        results.append((np.asarray(state.params), float(state.clip_norm)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-7,
                               err_msg="8 devices must match 1 device (same seed)")
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6), "clip norms must match"


def test_vmapping_clients_together_does_not_change_the_result():
    deltas = random_deltas(32, seed=8)
    common = {"sampling": "poisson", "clients_per_round": 10, "l2_clip": 0.5, "chunk_size": 16}
    key = jax.random.key(2)
    one, _ = server_update(make_engine(deltas, clients_per_device_step=1, **common), key)
    two, _ = server_update(make_engine(deltas, clients_per_device_step=2, **common), key)
    np.testing.assert_allclose(one, two, atol=1e-7, err_msg="vmap width changed the result")


@pytest.mark.parametrize("width", [1, 2])
def test_padded_slots_are_left_out_of_the_clip_norm_count(width):
    # Every client's norm (0.2) is under C, so the count sum_i (1{||d_i|| <= C} - 1/2) of a
    # cohort of c clients is c / 2. A padded slot trains client 0 under vmap (width > 1);
    # counted, it would move the released fraction and the count's sensitivity.
    deltas = np.full((32, DIM), 0.2 / np.sqrt(DIM), np.float32)
    engine = make_engine(
        deltas, sampling="poisson", clients_per_round=10, l2_clip=1.0, chunk_size=16,
        clients_per_device_step=width, adaptive_clipping=AdaptiveClipping())
    _, metrics = server_update(engine, jax.random.key(2))
    cohort = int(metrics.diagnostics["cohort_size"])
    assert cohort % 16, f"the test needs a cohort that leaves padded slots, got {cohort}"
    expected = min(0.5 * cohort / 10 + 0.5, 1.0)  # count / expected clients + 1/2
    got = float(metrics.released["noised_unclipped_fraction"])
    assert got == pytest.approx(expected), (
        f"width {width}: released unclipped fraction {got}, expected {expected} for a "
        f"cohort of {cohort}: padded slots were counted")


def test_clients_are_clipped_to_the_current_adaptive_clip_norm():
    # Adaptive clipping moved C from the initial l2_clip 0.5 to 0.1: the noise is z * 0.1,
    # so one client must move the pre-noise mean by at most 0.1 / m, not 0.5 / m.
    deltas = random_deltas(20)
    huge = deltas.copy()
    huge[7] = 1e6
    m, clip = 20, 0.1
    a, b = (server_update(make_engine(d, l2_clip=0.5, clients_per_round=m,
                                      adaptive_clipping=AdaptiveClipping()),
                          jax.random.key(0), clip_norm=clip)[0] for d in (deltas, huge))
    moved = np.linalg.norm(a - b)
    assert moved <= clip / m * (1 + 1e-5), (
        f"one user moved the mean by {moved} > C_t/m = {clip / m}: clipped to another C")


def test_count_noise_and_update_noise_are_independent():
    # Drawn from one key, the count's noise equals the update's first coordinate's: the
    # two releases together would let an observer subtract the noise.
    norms = np.where(np.arange(40) % 2, 0.1, 10.0)  # the raw unclipped fraction is 0.5
    deltas = random_deltas(40, seed=4)
    deltas *= (norms / np.linalg.norm(deltas, axis=1))[:, None]
    engine = make_engine(deltas, l2_clip=1.0, noise_multiplier=1.0,
                         adaptive_clipping=AdaptiveClipping(clipped_count_stddev=2.0))
    state = engine.init(toy.params_of(DIM))
    fractions, first = [], []
    for r in range(300):
        new_state, metrics = engine.round(state, jax.random.key(r))
        fractions.append(float(metrics.released["noised_unclipped_fraction"]))
        first.append(float(new_state.params[0]))
    correlation = np.corrcoef(fractions, first)[0, 1]
    # 300 independent pairs: |r| < 0.2 with probability > 0.999.
    assert abs(correlation) < 0.2, (
        f"the count's and the update's noise correlate ({correlation:.2f}): one key for both")


def test_adaptive_clip_norm_tracks_the_target_quantile():
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(0.0, 1.0, size=200))  # log-normal update norms
    directions = rng.normal(size=(200, DIM))
    deltas = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
    for quantile in (0.3, 0.8):
        engine = make_engine(
            deltas, sampling="poisson", clients_per_round=100, l2_clip=0.05,
            noise_multiplier=0.5, adaptive_clipping=AdaptiveClipping(target_quantile=quantile))
        state = engine.init(toy.params_of(DIM))
        clips = []
        for r in range(150):
            state, _ = engine.round(state, jax.random.key(r))
            clips.append(float(state.clip_norm))
        reached = np.mean(norms <= np.median(clips[-50:]))
        assert abs(reached - quantile) < 0.08, (
            f"C should settle near the {quantile} quantile of norms; it clips "
            f"{1 - reached:.2f} of them")


def test_noise_multiplier_zero_without_clip_is_plain_fedavg():
    deltas = random_deltas(10, seed=9, scale=5.0)
    got, _ = server_update(make_engine(deltas, l2_clip=None), jax.random.key(0))
    np.testing.assert_allclose(got, deltas.mean(0), rtol=1e-5,
                               err_msg="without clipping and noise the round is FedAvg's mean")
    assert make_engine(deltas, l2_clip=None).round_event() is None, "no noise: nothing to record"


def test_round_event_is_sampled_gaussian_for_poisson():
    engine = make_engine(random_deltas(100), sampling="poisson", clients_per_round=10,
                         l2_clip=0.5, noise_multiplier=1.0)
    expected = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0))
    assert engine.round_event() == expected, "Poisson round: PoissonSampled(q, Gaussian(z))"


def test_round_event_of_a_fixed_cohort_uses_replace_one_units():
    engine = make_engine(random_deltas(100), sampling="fixed", clients_per_round=10,
                         l2_clip=0.5, noise_multiplier=1.0)
    expected = dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(0.5))
    assert engine.round_event() == expected, "fixed cohort: replace-one halves z"


def test_adaptive_round_event_costs_exactly_one_gaussian_of_the_total_multiplier():
    z = 1.0
    engine = make_engine(random_deltas(1000), sampling="poisson", clients_per_round=100,
                         l2_clip=0.5, noise_multiplier=z, adaptive_clipping=AdaptiveClipping())
    event = engine.round_event()
    assert isinstance(event.event, dp_event.ComposedDpEvent), "both queries must be recorded"
    single = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z))
    eps_pair = privacy.epsilon(dp_event.SelfComposedDpEvent(event, 50), 1e-5)
    eps_single = privacy.epsilon(dp_event.SelfComposedDpEvent(single, 50), 1e-5)
    assert eps_pair == pytest.approx(eps_single, rel=1e-6), "noise split must keep eps of z"


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_eps_with_another_population_counts_each_recorded_round_with_its_noise(sampling):
    # 4 rounds at z 1.0, then (a calibrated resume) 6 at z 2.0: the figure for 1,000 users
    # must compose those 10 rounds, not 10 rounds at the last z.
    engines = [make_engine(random_deltas(100), sampling=sampling, clients_per_round=10,
                           l2_clip=0.5, noise_multiplier=z) for z in (1.0, 2.0)]
    ledger = engines[0].user_ledger(1e-5, "test")
    ledger.record(engines[0].round_event(), 4)
    ledger.record(engines[1].round_event(), 6)
    big = [make_engine(random_deltas(1000), sampling=sampling, clients_per_round=10,
                       l2_clip=0.5, noise_multiplier=z) for z in (1.0, 2.0)]
    direct = dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(big[0].round_event(), 4),
        dp_event.SelfComposedDpEvent(big[1].round_event(), 6)])
    relation = privacy.relation_for(sampling)
    expected = privacy.epsilon(direct, 1e-5, relation)
    got = engines[1].epsilon_with_population(ledger, 1000, 1e-5)
    assert got == pytest.approx(expected, rel=1e-9), (
        f"eps with 1,000 users {got} must equal the recorded rounds' {expected}")
    last_z_only = privacy.epsilon(
        dp_event.SelfComposedDpEvent(big[1].round_event(), 10), 1e-5, relation)
    assert got > last_z_only, "the first 4 rounds' lower noise must count"


def test_eps_with_another_population_keeps_the_ledgers_cohort_not_the_engines():
    # The expected cohort was the engine's: a ledger of cohorts of 5 read through an engine
    # of cohorts of 2 was under-counted by half (found by an API audit).
    five, two = (make_engine(random_deltas(10), sampling="poisson", clients_per_round=m,
                             l2_clip=0.5, noise_multiplier=1.0) for m in (5, 2))
    ledger = five.user_ledger(1e-5, "test")
    ledger.record(five.round_event(), 20)
    assert two.epsilon_with_population(ledger, 10, 1e-5) == pytest.approx(
        ledger.epsilon(), rel=1e-9), "at its own population the ledger's eps must come back"
    assert two.epsilon_with_population(ledger, 1000, 1e-5) == pytest.approx(
        five.epsilon_with_population(ledger, 1000, 1e-5), rel=1e-12), "no engine dependence"


@pytest.mark.parametrize("delta, warns", [(0.1, True), (0.099, False)])
def test_a_user_ledger_warns_of_a_delta_of_at_least_one_over_the_users(caplog, delta, warns):
    # User-level DP: delta >= 1/num_users admits a mechanism that releases one user's data;
    # every federated binary's ledger comes from user_ledger.
    engine = make_engine(random_deltas(10), sampling="poisson", clients_per_round=5,
                         l2_clip=0.5, noise_multiplier=1.0)
    with caplog.at_level(logging.WARNING):
        engine.user_ledger(delta, "test")
    warnings = delta_warning.warnings_logged(caplog)
    assert len(warnings) == warns and all("(N=10 users)" in w for w in warnings), (
        f"delta={delta} with 10 users: {'one warning' if warns else 'no warning'} naming "
        f"the users expected, got {warnings}")


@pytest.mark.parametrize("population", [float("inf"), 100.5, 0, 3])
def test_eps_with_a_population_refuses_one_that_cannot_hold_the_cohorts(population):
    engine = make_engine(random_deltas(10), sampling="poisson", clients_per_round=5,
                         l2_clip=0.5, noise_multiplier=1.0)
    ledger = engine.user_ledger(1e-5, "test")
    ledger.record(engine.round_event(), 3)
    with pytest.raises(ValueError):
        engine.epsilon_with_population(ledger, population, 1e-5)


def test_an_infinite_clip_norm_is_refused():
    with pytest.raises(ValueError, match="l2_clip"):
        DpFedAvgConfig(clients_per_round=5, l2_clip=float("inf"), noise_multiplier=1.0)


def test_noise_without_a_clip_norm_is_refused():
    with pytest.raises(ValueError, match="l2_clip"):
        DpFedAvgConfig(clients_per_round=5, l2_clip=None, noise_multiplier=1.0)


def test_client_states_need_one_row_per_client():
    engine = make_engine(random_deltas(10), l2_clip=1.0)
    with pytest.raises(ValueError, match="leading axis of 10"):
        engine.init(toy.params_of(DIM), client_states=jnp.zeros((3,)))


def test_padding_examples_inside_a_client_never_enter_its_update():
    deltas = random_deltas(12, seed=10)
    padded = ClientData(np.concatenate([deltas[:, None, :], np.full((12, 3, DIM), np.nan)], 1)
                        .astype(np.float32), np.ones(12, np.int32))

    def mean_of_real_rows(shared, state, client, context, key):
        rows = jnp.where(client.mask[:, None], client.arrays, 0.0).sum(0) / client.count
        return toy.ClientOutput(shared + rows, state, {})

    engine = DpFedAvg(mean_of_real_rows, optax.sgd(1.0), padded,
                      DpFedAvgConfig(clients_per_round=12, sampling="fixed", l2_clip=10.0))
    state = engine.init(toy.params_of(DIM))
    new, _ = engine.round(state, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(new.params), deltas.mean(0), rtol=1e-5,
                               err_msg="the NaN padding rows must not reach the update")


def test_clients_see_the_broadcast_context_which_the_round_keeps():
    def move_by_context(shared, state, client, context, key):
        return toy.ClientOutput(shared + context, state, {})

    engine = DpFedAvg(move_by_context, optax.sgd(1.0), toy.vector_clients(np.zeros((8, DIM))),
                      DpFedAvgConfig(clients_per_round=8, sampling="fixed", l2_clip=10.0))
    context = jnp.arange(DIM, dtype=jnp.float32)
    state = engine.init(toy.params_of(DIM), context=context)
    new, _ = engine.round(state, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(new.params), np.asarray(context), rtol=1e-6,
                               err_msg="every client moved by the broadcast context")
    np.testing.assert_array_equal(np.asarray(new.context), np.asarray(context),
                                  err_msg="clients do not change the context")


@pytest.mark.parametrize("sampling, relation", [("poisson", "add_or_remove_one"),
                                                ("fixed", "replace_one")])
def test_user_ledger_states_unit_relation_and_noise(sampling, relation):
    engine = make_engine(random_deltas(20), clients_per_round=5, sampling=sampling,
                         noise_multiplier=1.5)
    ledger = engine.user_ledger(1e-6, "test mechanism", dataset="toy")
    assert ledger.unit == "user", "DP-FedAvg protects one user"
    assert ledger.neighboring_relation == relation, f"{sampling} sampling's relation"
    assert ledger.metadata["noise_multiplier"] == 1.5, "the ledger states the noise"
    assert ledger.metadata["num_users"] == 20 and ledger.metadata["dataset"] == "toy", (
        f"population and caller fields belong in the metadata: {ledger.metadata}")


def test_a_donating_round_gives_the_same_state_and_deletes_the_old_one():
    # run_rounds donates: the new state reuses the old one's buffers (no copy of the
    # per-client states each round); the round itself must not change.
    engine = make_engine(random_deltas(8), l2_clip=1.0, noise_multiplier=0.5,
                         clients_per_round=4)
    kept, _ = engine.round(engine.init(toy.params_of(DIM)), jax.random.key(4))
    state = engine.init(toy.params_of(DIM))
    donated, _ = engine.round(state, jax.random.key(4), donate=True)
    np.testing.assert_array_equal(np.asarray(donated.params), np.asarray(kept.params),
                                  err_msg="donating the state changed the round's result")
    assert state.params.is_deleted(), "a donated state's buffers must be taken, not copied"


def test_eps_with_a_population_refuses_fewer_users_than_a_fixed_cohort():
    # A fixed cohort of 5 cannot be drawn without replacement from 3 users: no eps for it.
    engine = make_engine(random_deltas(10), sampling="fixed", clients_per_round=5,
                         l2_clip=0.5, noise_multiplier=1.0)
    ledger = engine.user_ledger(1e-5, "test")
    ledger.record(engine.round_event(), 3)
    with pytest.raises(ValueError, match="fewer than a round's cohort of 5"):
        engine.epsilon_with_population(ledger, 3, 1e-5)


def test_eps_with_a_population_refuses_a_ledger_that_does_not_record_its_users():
    # Without num_users a Poisson round's expected cohort is unknown; guessing it from the
    # engine would misstate eps for a ledger of another population.
    engine = make_engine(random_deltas(10), sampling="poisson", clients_per_round=5,
                         l2_clip=0.5, noise_multiplier=1.0)
    ledger = engine.user_ledger(1e-5, "test")
    ledger.record(engine.round_event(), 3)
    del ledger.metadata["num_users"]
    with pytest.raises(ValueError, match="num_users"):
        engine.epsilon_with_population(ledger, 1000, 1e-5)


def test_a_chunk_size_that_does_not_split_over_the_devices_is_refused():
    devices = client_mesh().shape["clients"]
    assert devices > 1, "the suite runs on 8 fake CPU devices (tests/conftest.py)"
    with pytest.raises(ValueError, match=f"multiple of {devices} devices"):
        make_engine(random_deltas(16), chunk_size=devices + 1)


@pytest.mark.parametrize("field", ["chunk_size", "clients_per_device_step"])
def test_an_execution_width_below_one_is_refused_naming_it(field):
    with pytest.raises(ValueError, match=f"^{field} must be >= 1"):
        DpFedAvgConfig(clients_per_round=5, **{field: 0})


# A subpopulation: the engine's clients are the taking-part users of a larger population.


def test_a_subpopulation_round_divides_the_clipped_sum_by_q_times_the_members_estimate():
    deltas = random_deltas(30, seed=4)
    clip, m, population, estimate = 0.7, 20.0, 100, 25.0
    engine = make_engine(deltas, sampling="poisson", clients_per_round=m, l2_clip=clip,
                         subpopulation=Subpopulation(population, estimate))
    key = jax.random.key(5)
    got, _ = server_update(engine, key)
    indices, count = engine.cohort(key)
    cohort = np.asarray(indices)[: int(count)]
    norms = np.linalg.norm(deltas[cohort], axis=1, keepdims=True)
    want = (deltas[cohort] * np.minimum(1, clip / norms)).sum(0) / (m / population * estimate)
    np.testing.assert_allclose(
        got, want, rtol=1e-5, atol=1e-7,
        err_msg="the mean must be the clipped sum / (q x the members estimate), not the count")


def test_a_subpopulation_samples_its_clients_at_the_populations_rate():
    engine = make_engine(random_deltas(40), sampling="poisson", clients_per_round=10,
                         l2_clip=0.5, noise_multiplier=1.0,
                         subpopulation=Subpopulation(200, 40.0))
    keys = jax.random.split(jax.random.key(6), 2000)
    counts = np.asarray(jax.vmap(lambda k: engine.cohort(k)[1])(keys))
    q, n = 10 / 200, 40
    assert abs(counts.mean() - q * n) < 4 * np.sqrt(n * q * (1 - q) / len(counts)), (
        f"mean cohort {counts.mean()} should be q x clients = {q * n}, q = m / population")
    expected = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.0))
    assert engine.round_event() == expected, "the round is accounted at q = m / population"


def test_a_subpopulation_ledger_names_the_population_not_the_members():
    engine = make_engine(random_deltas(20), sampling="poisson", clients_per_round=5,
                         noise_multiplier=1.5, subpopulation=Subpopulation(300, 21.5))
    ledger = engine.user_ledger(1e-6, "test mechanism")
    assert ledger.metadata["num_users"] == 300, (
        f"the ledger (a release) must give the public population, not the 20 members: "
        f"{ledger.metadata}")
    assert ledger.metadata["members_estimate"] == 21.5, "and the estimate the mean divides by"
    assert ledger.metadata["sampling_rate"] == 5 / 300, (
        f"the rate is of the population: m / members ({5 / 20}) would give the member count "
        f"away: {ledger.metadata['sampling_rate']}")
    assert 20 not in ledger.metadata.values(), "the true member count appears nowhere"


def test_a_subpopulation_with_a_fixed_cohort_is_refused():
    with pytest.raises(ValueError, match="Poisson"):
        make_engine(random_deltas(20), sampling="fixed", clients_per_round=5,
                    subpopulation=Subpopulation(100, 20.0))


# An empty subpopulation (a group no user takes part in) must still train: refusing it
# would tell the population apart from its neighbour with one member; each of its
# cohorts is empty, and its rounds add noise alone.
@pytest.mark.parametrize("num_clients", [16, 0])
def test_a_subpopulation_round_adds_noise_of_std_z_clip_over_q_times_the_members_estimate(
        num_clients):
    dim, z, clip, m, population, estimate = 20_000, 1.3, 0.5, 8, 64, 24.0
    engine = DpFedAvg(toy.add_own_vector, optax.sgd(1.0),
                      toy.vector_clients(np.zeros((num_clients, dim), np.float32)),
                      DpFedAvgConfig(clients_per_round=m, l2_clip=clip, noise_multiplier=z,
                                     subpopulation=Subpopulation(population, estimate)))
    state = engine.init(jnp.zeros((dim,), jnp.float32))
    state, metrics = engine.round(state, jax.random.key(4))
    noise = np.asarray(state.params)
    expected = z * clip / (m / population * estimate)
    assert abs(noise.std() / expected - 1) < 0.02, (
        f"noise std {noise.std()} != zC / (q x estimate) = {expected}: the divisor sets it")
    assert int(metrics.diagnostics["cohort_size"]) <= num_clients, "only members take part"
    assert engine.round_event() == dp_event.PoissonSampledDpEvent(
        m / population, dp_event.GaussianDpEvent(z)), "accounted at q = m / N, members or not"


def test_an_engine_without_clients_and_without_a_subpopulation_is_refused():
    with pytest.raises(ValueError, match="clients per round"):
        make_engine(np.zeros((0, 3), np.float32), sampling="poisson", clients_per_round=1)
