"""Canary clients in the DP-FedAvg round (an audit run, `dpfed.privacy.audit`): their
insertion, their sampling, and a one-round audit of the noise the ledger records."""

import dp_accounting
import jax
import numpy as np
import optax
import pytest

from dpfed import privacy
from dpfed.federated import DpFedAvg, DpFedAvgConfig, client_mesh
from dpfed.federated.aggregation import PrivateAggregator
from dpfed.privacy import audit
from tests.federated import toy
from tests.noise_keys import recording, recording_keys
from tests.privacy.canaries import dense

DELTA = 1e-5


def canary_engine(num_clients, dim, canaries, *, rate=1.0, clip=0.5, z=0.0, deltas=None,
                  held_out=None):
    """An engine over clients that send `deltas` (default: nothing), Poisson at `rate`."""
    deltas = np.zeros((num_clients, dim), np.float32) if deltas is None else deltas
    config = DpFedAvgConfig(clients_per_round=rate * num_clients, l2_clip=clip,
                            noise_multiplier=z)
    return DpFedAvg(toy.add_own_vector, optax.sgd(1.0), toy.vector_clients(deltas), config,
                    canaries=canaries, held_out=held_out)


def one_round_change(engine, dim, seed=0):
    state = engine.init(toy.params_of(dim))
    new_state, _ = engine.round(state, jax.random.key(seed))
    return state.params, new_state.params


def test_every_sampled_canary_adds_clip_times_its_direction_to_the_sum():
    dim, clients, clip = 4_000, 20, 0.5
    canaries = audit.draw(jax.random.key(2), toy.params_of(dim), 30, support=64)
    before, after = one_round_change(canary_engine(clients, dim, canaries, clip=clip), dim)
    expected = clip * dense(canaries, dim).sum(0) / clients  # rate 1: all 30 sampled
    np.testing.assert_allclose(np.asarray(after - before), expected, atol=1e-6,
                               err_msg="the mean is not C sum(u_c) / expected cohort")


def test_canaries_are_sampled_at_the_users_rate():
    dim, clients, clip, k = 20_000, 40, 0.5, 400
    canaries = audit.draw(jax.random.key(3), toy.params_of(dim), k, support=32)
    before, after = one_round_change(
        canary_engine(clients, dim, canaries, rate=0.25, clip=clip), dim)
    # k independent directions in 20,000 coordinates: least squares recovers which took part.
    expected_cohort = 0.25 * clients  # the mean's divisor
    taken, *_ = np.linalg.lstsq(dense(canaries, dim).T,
                                np.asarray(after - before) * expected_cohort / clip, rcond=None)
    np.testing.assert_allclose(taken, np.round(taken), atol=1e-3,
                               err_msg="a canary added other than 0 or C times its direction")
    # 400 Bernoulli(0.25): the count is within 4.5 std of 100 with overwhelming probability.
    assert abs(np.round(taken).sum() - 100) < 4.5 * np.sqrt(k * 0.25 * 0.75), taken.sum()


def test_canaries_are_not_sampled_from_the_key_of_the_rounds_noise(monkeypatch):
    # The audit takes each canary's participation for a coin independent of the noise:
    # drawn from the noise's key, or one split from it, it would be a function of it.
    dim = 8
    canaries = audit.draw(jax.random.key(4), toy.params_of(dim), 4, support=4)
    engine = DpFedAvg(toy.add_own_vector, optax.sgd(1.0), toy.vector_clients(np.zeros((4, dim))),
                      DpFedAvgConfig(clients_per_round=2, l2_clip=0.5, noise_multiplier=1.0),
                      mesh=client_mesh(jax.devices()[:1]), canaries=canaries)
    with (recording(monkeypatch) as noise,
          recording_keys(monkeypatch, audit, "insert", key_arg=4) as coins):
        one_round_change(engine, dim)
    noise.assert_distinct(1)
    noise.assert_apart_from(coins, "canary sampling")


def test_canaries_need_poisson_sampling():
    canaries = audit.draw(jax.random.key(4), toy.params_of(8), 2)
    with pytest.raises(ValueError, match="poisson"):
        DpFedAvg(toy.add_own_vector, optax.sgd(1.0), toy.vector_clients(np.zeros((4, 8))),
                 DpFedAvgConfig(clients_per_round=2, sampling="fixed"), canaries=canaries)


def test_canaries_drawn_for_a_larger_model_are_refused():
    canaries = audit.draw(jax.random.key(5), toy.params_of(100), 2)
    with pytest.raises(ValueError, match="drawn for more than the 10 shared parameters"):
        canary_engine(4, 10, canaries).init(toy.params_of(10))


def one_round_scores(z, k=1_000, dim=100_000, clients=50, seed=0):
    """One round with every user and canary sampled (rate 1): the Gaussian mechanism of
    multiplier z on each canary. Returns the final-model scores (inserted, held out)."""
    inserted, held_out = audit.draw_pair(jax.random.key(seed), toy.params_of(dim), k)
    deltas = 0.01 * np.random.default_rng(seed).normal(size=(clients, dim)).astype(np.float32)
    engine = canary_engine(clients, dim, inserted, z=z, deltas=deltas)
    before, after = one_round_change(engine, dim, seed)
    return audit.scores(inserted, before, after), audit.scores(held_out, before, after)


def audit_one_round(z, **kwargs):
    """`audit.estimate` of `one_round_scores`."""
    return audit.estimate(*one_round_scores(z, **kwargs), DELTA)


def test_one_round_audit_finds_the_noise_multiplier_the_ledger_records():
    z = 1.0
    result = audit_one_round(z)
    # mu's standard error with about 1,000 + 1,000 scores is ~0.05: 0.2 is 4 of them.
    assert abs(result.mu - 1 / z) < 0.2, (
        f"the canaries stand {result.mu:.3f} noise stds out, not 1/z = {1 / z}: the noise or "
        "the sensitivity of the round is not the one the ledger records")
    ledger_eps = dp_accounting.get_epsilon_gaussian(z, DELTA)
    assert result.epsilon_lower_bound <= ledger_eps, (
        f"the audit proves eps >= {result.epsilon_lower_bound:.3f} > the ledger's {ledger_eps:.3f}")


def test_an_engine_adding_a_fifth_of_its_noise_is_caught_by_the_final_model():
    recorded = dp_accounting.get_epsilon_gaussian(1.0, DELTA)  # what a z = 1 ledger says
    inserted, held_out = one_round_scores(0.2)
    # The f-DP bound in the ledger's family (one Gaussian of z = 1) proves it; Steinke et
    # al.'s bound of 2,000 candidates cannot (3.24 here; at most ~3.4 even at z = 0.1).
    bound = audit.lower_bound_in_family(inserted, held_out, 1, 1.0, 1.0, DELTA)
    assert bound > recorded, (
        f"noise of multiplier 0.2 under a ledger of z = 1 (eps {recorded:.3f}) went unnoticed: "
        f"f-DP lower bound {bound:.3f}")


def test_the_all_rounds_audit_needs_inserted_canaries_and_noise():
    held_out = audit.draw(jax.random.key(6), toy.params_of(8), 2)
    with pytest.raises(ValueError, match="all-rounds"):
        canary_engine(4, 8, None, held_out=held_out, z=1.0)
    with pytest.raises(ValueError, match="all-rounds"):
        canary_engine(4, 8, held_out, held_out=held_out, z=0.0)


def test_a_round_compiled_ahead_of_time_is_the_audit_engines_round():
    # benchmarks.local_unroll times `DpFedAvg.compile`: its calls must pass the canaries and
    # held-out directions the jitted round takes (a TypeError once, in the slow suite only).
    dim = 8
    inserted, held_out = audit.draw_pair(jax.random.key(7), toy.params_of(dim), 3)
    deltas = np.random.default_rng(0).normal(size=(6, dim)).astype(np.float32)
    engine = canary_engine(6, dim, inserted, rate=0.5, z=1.0, held_out=held_out, deltas=deltas)
    state, key = engine.init(toy.params_of(dim)), jax.random.key(8)
    compiled, _ = engine.compile(state, key)(state, key)
    jitted, _ = engine.round(state, key)
    for name in ("params", "audit"):
        for got, want in zip(jax.tree_util.tree_leaves(getattr(compiled, name)),
                             jax.tree_util.tree_leaves(getattr(jitted, name)), strict=True):
            np.testing.assert_array_equal(
                np.asarray(got), np.asarray(want),
                err_msg=f"the compiled round's {name} differs from the jitted round's")


def audit_all_rounds(z, rounds, rate, k=1_000, dim=100_000, clients=50, seed=0, engine_hook=None):
    """`rounds` rounds of an all-rounds audit run (users and canaries sampled at `rate`):
    (`DpFedAvg.all_rounds_audit`, the engine's ledger PLD eps at DELTA)."""
    inserted, held_out = audit.draw_pair(jax.random.key(seed), toy.params_of(dim), k)
    deltas = 0.01 * np.random.default_rng(seed).normal(size=(clients, dim)).astype(np.float32)
    engine = canary_engine(clients, dim, inserted, rate=rate, z=z, deltas=deltas,
                           held_out=held_out)
    if engine_hook is not None:
        engine_hook(engine)
    state = engine.init(toy.params_of(dim))
    for r in range(rounds):
        state, _ = engine.round(state, jax.random.fold_in(jax.random.key(seed), r))
    ledger_eps = privacy.epsilon(dp_accounting.SelfComposedDpEvent(engine.round_event(), rounds),
                                 DELTA, accountant="pld")
    return engine.all_rounds_audit(state, DELTA), ledger_eps


@pytest.mark.parametrize("seed", [
    0,
    # slow: ~5 s; another seed of the same code, the fast suite keeps seed 0 above
    pytest.param(1, marks=pytest.mark.slow)])
def test_all_rounds_audit_of_one_round_reads_the_sensitivity_and_noise_of_the_ledger(seed):
    figures, ledger_eps = audit_all_rounds(z=1.0, rounds=1, rate=1.0, seed=seed)
    # ~1,000 scores a set: shift's standard error ~0.045, noise_std's ~0.022.
    assert abs(figures["shift"] - 1) < 0.1, f"a canary moved s by {figures['shift']:.3f}, not 1"
    assert abs(figures["noise_std"] - 1) < 0.1, f"noise std {figures['noise_std']:.3f}, not z = 1"
    assert abs(figures["epsilon_estimate"] - 4.377) < 0.6, figures  # exact: one Gaussian, z = 1
    assert abs(ledger_eps - 4.377) < 0.01, ledger_eps
    assert figures["epsilon_lower_bound"] <= ledger_eps, figures
    # The f-DP bound in the ledger's family must not reject the run's own, true claim.
    assert figures["epsilon_lower_bound_fdp"] <= ledger_eps, figures


# slow: ~16 s; the fast suite keeps this file's one-round all-rounds audit (seed 0) and
# test_dpsgd's ten sampled steps estimating the ledger's eps (the same audit.all_rounds)
@pytest.mark.slow
def test_all_rounds_audit_of_ten_sampled_rounds_estimates_the_ledgers_eps():
    figures, ledger_eps = audit_all_rounds(z=1.0, rounds=10, rate=0.2)
    # shift: a canary's sum over 10 rounds has variance ~10 + 1.6; /(T q) = 2: ~0.08 std error.
    assert abs(figures["shift"] - 1) < 0.25, figures
    assert abs(figures["noise_std"] - 1) < 0.05, figures  # 10,000 held-out values
    assert abs(figures["epsilon_estimate"] - ledger_eps) < 0.25 * ledger_eps, (
        f"estimate {figures['epsilon_estimate']:.3f} against the ledger's {ledger_eps:.3f}")
    assert figures["epsilon_lower_bound"] <= ledger_eps, figures
    assert figures["epsilon_lower_bound_fdp"] <= ledger_eps, figures


class _UnderNoised(PrivateAggregator):
    """An aggregator that adds `fraction` of the noise its multiplier (and the ledger)
    states."""

    fraction = 1.0

    def noised_mean(self, clipped_sum, clip, key):
        return PrivateAggregator(self.noise_multiplier * self.fraction,
                                 self.expected_clients).noised_mean(clipped_sum, clip, key)


def _under_noised(fraction):
    def hook(engine):
        engine.aggregator = type("Bugged", (_UnderNoised,), {"fraction": fraction})(
            engine.aggregator.noise_multiplier, engine.aggregator.expected_clients)
    return hook


@pytest.mark.parametrize("rounds, rate", [
    (1, 1.0),
    # slow: ~18 s; the fast suite keeps the one-round case (1-1.0), the same bug and figures
    pytest.param(10, 0.2, marks=pytest.mark.slow)])
def test_all_rounds_audit_measures_an_engine_adding_half_its_noise(rounds, rate):
    figures, ledger_eps = audit_all_rounds(z=1.0, rounds=rounds, rate=rate,
                                           engine_hook=_under_noised(0.5))
    assert abs(figures["noise_std"] - 0.5) < 0.05, (
        f"half the noise went unnoticed: noise std {figures['noise_std']:.3f} under z = 1")
    assert figures["epsilon_estimate"] > 1.5 * ledger_eps, figures
    # Neither one-run bound of 2,000 candidates proves this bug: Steinke et al.'s reads 2.07
    # and 1.83, the f-DP one in the ledger's family 3.07 and 3.90, against 4.38 and 4.98 (seed
    # 1: 2.09 / 3.96 and 1.83 / 3.90). The noise std is the figure that shows it. The family
    # bound does read more from the same scores:
    assert figures["epsilon_lower_bound_fdp"] > figures["epsilon_lower_bound"], figures


# slow: ~8 s; the fast suite keeps test_datalens_canaries' under-noised run (its f-DP bound
# proves the ledger wrong), test_audit's rejection tests and the half-noise test above
@pytest.mark.slow
def test_all_rounds_f_dp_bound_proves_an_engine_adding_three_tenths_of_its_noise_wrong():
    figures, ledger_eps = audit_all_rounds(z=1.0, rounds=1, rate=1.0,
                                           engine_hook=_under_noised(0.3))
    # Measured 5.03 (seed 1: 5.97) against 4.38, where Steinke et al.'s bound reads 2.80 (2.86).
    assert figures["epsilon_lower_bound_fdp"] > ledger_eps, (
        f"f-DP bound {figures['epsilon_lower_bound_fdp']:.3f} <= the ledger's {ledger_eps:.3f}")


def test_all_rounds_audit_reads_canaries_inserted_at_half_the_clip_norm(monkeypatch):
    insert = audit.insert
    monkeypatch.setattr(audit, "insert", lambda canaries, total, weight, rate, key: insert(
        canaries, total, weight / 2, rate, key))
    figures, _ = audit_all_rounds(z=1.0, rounds=1, rate=1.0)
    assert abs(figures["shift"] - 0.5) < 0.1, f"C/2 canaries moved s by {figures['shift']:.3f}"
    assert abs(figures["noise_std"] - 1) < 0.1, figures
