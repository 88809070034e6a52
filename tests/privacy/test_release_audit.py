"""Empirical privacy audit: each DP release, measured end to end through the public code on
neighbouring inputs, is no more distinguishable than the event its ledger records.

Per mechanism: a canary (a client or example whose update or gradient is huge in one
fixed direction u, so it is clipped to exactly C; or a teacher whose vote flips) makes
two neighbouring inputs; the real public function runs on each with fresh keys; the
Gaussian-DP parameter of the release, mu_hat (`gdp_audit.gdp_mu`, on u or on the best
linear statistic of a few coordinates), conditioned on the canary being sampled, must
match the mu of the unsampled event read back from the run's own ledger. Matching
means within 0.15 of it: the estimates' standard error is about 0.04 here (>= 1,000
draws a side), so 0.15 is ~3.5 standard errors, and the seeds are fixed. A lower
mu_hat would mean the audit no longer measures the mechanism; a higher one is a
finding. The Clopper-Pearson eps lower bound must stay below the ledger's eps of that
single (unsampled) release. In population mode, rounds that do not sample the canary
must also be indistinguishable (mu_hat < 0.15) from its neighbour's: what Poisson
sampling's analysis assumes; so must, in a group whose every update is under the clip
(the count query one-sided), rounds that sample none of 4 extra members from the group
without them. Numbers: WORKSPACE.md, "The privacy ledger".
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import dp_event

from dpfed import privacy
from dpfed.federated import (
    AdaptiveClipping,
    DpFedAvg,
    DpFedAvgConfig,
    Subpopulation,
    client_mesh,
)
from dpfed.generative.datalens import DataLensConfig, TopAgg
from dpfed.generative.datalens import training as datalens_training
from dpfed.train import dpsgd
from tests.federated import toy
from tests.privacy import gdp_audit

DELTA = 1e-5
TOLERANCE = 0.15  # ~3.5 standard errors of mu_hat at these sample sizes
_ONE_DEVICE = client_mesh(jax.devices()[:1])


def _check(name, s_in, s_out, event, relation):
    """mu_hat and the eps lower bound of (s_in, s_out) against the unsampled `event`."""
    mu = gdp_audit.gdp_mu(s_in, s_out)
    want = gdp_audit.ledger_mu(event)
    eps_low = gdp_audit.epsilon_lower_bound(s_in, s_out, DELTA)
    eps = min(privacy.epsilon(event, DELTA, relation, "rdp"),
              privacy.epsilon(event, DELTA, relation, "pld"))
    print(f"{name}: n={len(s_in)}/{len(s_out)} mu_hat {mu.mu:.3f} [{mu.low:.3f}, {mu.high:.3f}]"
          f" vs ledger {want:.3f}; eps lower bound {eps_low:.3f} vs ledger {eps:.3f}")
    assert mu.mu < want + TOLERANCE, (
        f"{name}: the release is more distinguishable (mu_hat {mu.mu:.3f}, 95% CI "
        f"[{mu.low:.3f}, {mu.high:.3f}]) than the ledger's event ({want:.3f})")
    assert mu.mu > want - TOLERANCE, (
        f"{name}: mu_hat {mu.mu:.3f} far below the ledger's {want:.3f}: the audit no longer "
        "measures the worst case (canary not clipped to C, or not sampled)")
    assert eps_low < eps, f"{name}: eps lower bound {eps_low:.3f} >= ledger eps {eps:.3f}"


# DP-FedAvg (user level): a canary client whose update is 1e6 along u = e0; the crowd's
# updates lie along v = e1 (norm 5 > C, or 0.5 < C for half of them with adaptive
# clipping), so a divisor that depends on the realised cohort shows up along v.

_CROWD, _M, _CLIP, _Z = 40, 20, 1.0, 1.0


def _crowd(adaptive=False):
    deltas = np.zeros((_CROWD, 2), np.float32)
    deltas[:, 1] = np.where(np.arange(_CROWD) % 2, 0.5, 5.0) if adaptive else 5.0
    return deltas


def _with_canary(crowd, canary):
    return np.concatenate([crowd, np.asarray([canary], np.float32)])


def _rounds(deltas, seed, n, **config):
    """`n` rounds from one state, lax.map-ped in one jit: (released params [n, 2], released
    noised unclipped fraction [n], cohort masks [n, clients]) and the engine."""
    engine = DpFedAvg(toy.add_own_vector, optax.sgd(1.0), toy.vector_clients(deltas),
                      DpFedAvgConfig(clients_per_round=_M, l2_clip=_CLIP, **config),
                      mesh=_ONE_DEVICE)
    state = engine.init(toy.params_of(2))

    def one(key):
        new, metrics = engine.round(state, key)
        indices, count = engine.cohort(key)
        member = jnp.zeros(len(deltas), bool).at[indices].max(
            jnp.arange(len(indices)) < count)
        return new.params, metrics.released["noised_unclipped_fraction"], member

    keys = jax.random.split(jax.random.key(seed), n)
    params, fraction, member = jax.jit(lambda k: jax.lax.map(one, k))(keys)
    return np.asarray(params), np.asarray(fraction), np.asarray(member), engine


def _less_the_crowd(params, fraction, member, crowd, divisor):
    """[n, 4] features of `n` rounds: the released update sum along u and v and the
    released count query (NaN without adaptive clipping), each less the contribution of
    the crowd's sampled members (the adversary knows the other users and, from the key,
    who was sampled); and how many of the crowd were sampled. `divisor` is the public
    number the round's mean divides by."""
    in_crowd = member[:, :len(crowd)]
    norms = np.linalg.norm(crowd, axis=1)
    clipped = crowd * np.minimum(1.0, _CLIP / norms)[:, None]
    update = params * divisor - in_crowd @ clipped
    count = (fraction - 0.5) * divisor - in_crowd @ np.where(norms <= _CLIP, 0.5, -0.5)
    return np.stack([update[:, 0], update[:, 1], count, in_crowd.sum(1)], axis=1)


def _recorded(engine):
    """The round's event as the run's ledger records it (read back from the ledger)."""
    ledger = engine.user_ledger(DELTA, "audit")
    ledger.record(engine.round_event())
    (event, count), = ledger.entries
    assert count == 1
    return event, ledger.relation


def test_poisson_round_is_as_distinguishable_as_its_recorded_gaussian():
    crowd = _crowd()
    p_in, _, member, engine = _rounds(_with_canary(crowd, [1e6, 0.0]), 1, 4000,
                                      noise_multiplier=_Z)
    p_out, *_ = _rounds(crowd, 2, 2000, noise_multiplier=_Z)
    event, relation = _recorded(engine)
    assert isinstance(event, dp_event.PoissonSampledDpEvent)
    included = member[:, -1]
    # The recorded rate is the canary's realised inclusion rate (binomial, 4,000 draws:
    # 0.03 is > 3.8 standard errors).
    assert abs(included.mean() - event.sampling_probability) < 0.03, (
        f"canary sampled in {included.mean():.3f} of rounds, ledger rate "
        f"{event.sampling_probability:.3f}")
    s_in, s_out = gdp_audit.best_linear_statistic(p_in[included], p_out)
    _check("DP-FedAvg Poisson", s_in, s_out, event.event, relation)


def test_fixed_cohort_round_is_as_distinguishable_as_its_recorded_replace_one_gaussian():
    # Replace-one: the canary's update is +1e6 u in one input, -1e6 u in the other
    # (sensitivity 2C); same population, so the same keys draw the same cohorts.
    crowd = _crowd()
    p_in, _, member, engine = _rounds(_with_canary(crowd, [1e6, 0.0]), 3, 3000,
                                      sampling="fixed", noise_multiplier=_Z)
    p_out, _, member_out, _ = _rounds(_with_canary(crowd, [-1e6, 0.0]), 4, 3000,
                                      sampling="fixed", noise_multiplier=_Z)
    event, relation = _recorded(engine)
    assert isinstance(event, dp_event.SampledWithoutReplacementDpEvent)
    _check("DP-FedAvg fixed cohort", p_in[member[:, -1], 0], p_out[member_out[:, -1], 0],
           event.event, relation)


def test_adaptive_round_releases_as_distinguishable_as_its_recorded_composition():
    # Two releases: the update sum (multiplier z_d) and the clip count (2 sb); the ledger
    # records their composition, worth one Gaussian of z. The statistic combines the
    # update along u and the count, each less the crowd's known contribution (the
    # adversary knows the other users and, from the key, who was sampled).
    crowd = _crowd(adaptive=True)
    adaptive = AdaptiveClipping(clipped_count_stddev=1.0)
    worlds = []
    for seed, deltas, n in ((5, _with_canary(crowd, [1e6, 0.0]), 4000), (6, crowd, 2000)):
        params, fraction, member, engine = _rounds(
            deltas, seed, n, noise_multiplier=_Z, adaptive_clipping=adaptive)
        features = _less_the_crowd(params, fraction, member, crowd, _M)[:, :3]
        keep = member[:, -1] if len(deltas) > _CROWD else np.ones(n, bool)
        worlds.append((features[keep], engine))
    (x_in, engine), (x_out, _) = worlds
    event, relation = _recorded(engine)
    assert isinstance(event.event, dp_event.ComposedDpEvent), "sum and count both recorded"
    assert gdp_audit.ledger_mu(event.event) == pytest.approx(1 / _Z)
    s_in, s_out = gdp_audit.best_linear_statistic(x_in, x_out)
    _check("DP-FedAvg adaptive", s_in, s_out, event.event, relation)


# Population mode (`Subpopulation`): the engine holds one group's members only, users of
# a public population of N that every round Poisson-samples at q = m / N (a sampled user
# outside the group sits the round out); the mean divides by q x a released noised group
# size, never by the true count. Neighbours: the canary in the group, vs. the canary
# outside it or absent (the same input: the engine never holds it). The adversary knows
# the public divisor and, as above, the crowd and who of it was sampled.

_POPULATION = 60  # q = 20 / 60; the group of 41 sampled on its own would be at 20 / 41

# name: (the group's members besides the canary, its released noised size, adaptive?)
_GROUPS = {
    "group": (_CROWD, 37.0, False),
    "empty group": (0, 6.0, False),
    "group, adaptive": (_CROWD, 37.0, True),
}


class _PopulationRounds(NamedTuple):
    """Rounds of one group with the canary (`x_in`, `included`: was it sampled) and
    without (`x_out`), as `_less_the_crowd` features; `engine` holds the canary."""

    name: str
    x_in: np.ndarray
    included: np.ndarray
    x_out: np.ndarray
    engine: DpFedAvg


@pytest.fixture(scope="module", params=list(_GROUPS))
def population_rounds(request):
    """One `_GROUPS` entry's rounds, shared by its two tests (9,000 rounds, ~3-6 s)."""
    members, estimate, adaptive = _GROUPS[request.param]
    crowd = _crowd(adaptive)[:members]
    config = dict(noise_multiplier=_Z, subpopulation=Subpopulation(_POPULATION, estimate),
                  adaptive_clipping=AdaptiveClipping() if adaptive else None)
    divisor = _M / _POPULATION * estimate  # public: q x the released size
    # The update along u and v; the count query with adaptive clipping; the crowd's
    # sampled number where it varies (a divisor that follows the realised cohort leaves
    # a shift that is linear in it once it is a feature).
    columns = [0, 1] + ([2] if adaptive else []) + ([3] if members else [])
    first_seed = 7 + 2 * list(_GROUPS).index(request.param)
    worlds = []
    for seed, deltas, n in ((first_seed, _with_canary(crowd, [1e6, 0.0]), 6000),
                            (first_seed + 1, crowd, 3000)):
        params, fraction, member, engine = _rounds(deltas, seed, n, **config)
        features = _less_the_crowd(params, fraction, member, crowd, divisor)
        worlds.append((features[:, columns], member, engine))
    (x_in, member, engine), (x_out, *_) = worlds
    return _PopulationRounds(f"DP-FedAvg population, {request.param}", x_in, member[:, -1],
                             x_out, engine)


def test_population_round_is_as_distinguishable_as_its_recorded_event(population_rounds):
    name, x_in, included, x_out, engine = population_rounds
    event, relation = _recorded(engine)
    assert event.sampling_probability == pytest.approx(_M / _POPULATION), (
        f"{name}: the ledger must record q = m / N = {_M / _POPULATION:.3f}, got {event}")
    # 6,000 draws: 0.03 is > 4.9 standard errors; m / 41 would be 0.155 off.
    assert abs(included.mean() - event.sampling_probability) < 0.03, (
        f"{name}: the canary was sampled in {included.mean():.3f} of rounds, not at the "
        f"population's rate q = {event.sampling_probability:.3f} that the ledger records")
    s_in, s_out = gdp_audit.best_linear_statistic(x_in[included], x_out)
    _check(name, s_in, s_out, event.event, relation)


def test_population_round_that_leaves_the_canary_out_is_its_neighbours(population_rounds):
    # Poisson sampling's analysis: a round that does not sample the canary releases what
    # the group without it releases. Anything released that depends on the members'
    # true number (or the cohort's) other than through the noised sums shows up here.
    name, x_in, included, x_out, _ = population_rounds
    s_in, s_out = gdp_audit.best_linear_statistic(x_in[~included], x_out)
    mu = gdp_audit.gdp_mu(s_in, s_out)
    print(f"{name}, canary not sampled: n={len(s_in)}/{len(s_out)} mu_hat {mu.mu:.3f} "
          f"[{mu.low:.3f}, {mu.high:.3f}] vs 0")
    assert mu.mu < TOLERANCE, (
        f"{name}: rounds that did not sample the canary are told apart from its "
        f"neighbour's (mu_hat {mu.mu:.3f}, 95% CI [{mu.low:.3f}, {mu.high:.3f}]): the "
        "release depends on the group's true size, not only on the noised sums")


# The count query on a one-sided crowd. Above, half the crowd is under C and half over,
# so its count terms +-1/2 cancel on average, and a count that depends on the group's
# true size (e.g. divided by q x the true size instead of q x the estimate) moves nothing
# on average. Here every member's update (norm 0.5) is under C, so the k sampled ones'
# terms add up to k/2, and such a count moves with the group's size. One member more
# moves it by ~0.1 in mu_hat at q = 1/3 (under the tolerance); K = 4 extra members move
# it about K-fold, and the rounds that sample none of them (~(2/3)^4 of the draws) must
# still release what the group without them releases. sb = 0.55 (2 sb = 1.1, just above
# z) puts most of the round's mu on the count; the estimate, 50 for 30-34 members, keeps
# the released fraction 0.5 + k / (2 q E) ~ 0.8 under 1, where the clip to [0, 1] would
# hide the count.

_ONE_SIDED_MEMBERS, _EXTRA_MEMBERS, _ONE_SIDED_ESTIMATE = 30, 4, 50.0


def test_population_count_query_ignores_unsampled_members_of_a_one_sided_group():
    crowd = np.tile(np.asarray([[0.0, 0.5]], np.float32), (_ONE_SIDED_MEMBERS, 1))
    with_extra = np.concatenate([crowd, crowd[:_EXTRA_MEMBERS]])
    config = dict(noise_multiplier=_Z,
                  subpopulation=Subpopulation(_POPULATION, _ONE_SIDED_ESTIMATE),
                  adaptive_clipping=AdaptiveClipping(clipped_count_stddev=0.55))
    divisor = _M / _POPULATION * _ONE_SIDED_ESTIMATE
    worlds = []
    for seed, deltas, n in ((13, with_extra, 8000), (14, crowd, 3000)):
        params, fraction, member, _ = _rounds(deltas, seed, n, **config)
        features = _less_the_crowd(params, fraction, member, crowd, divisor)
        worlds.append((features, member))
    (x_in, member), (x_out, _) = worlds
    none_sampled = ~member[:, _ONE_SIDED_MEMBERS:].any(1)
    s_in, s_out = gdp_audit.best_linear_statistic(x_in[none_sampled], x_out)
    mu = gdp_audit.gdp_mu(s_in, s_out)
    print(f"DP-FedAvg population, one-sided adaptive group, {_EXTRA_MEMBERS} extra members "
          f"not sampled: n={len(s_in)}/{len(s_out)} mu_hat {mu.mu:.3f} "
          f"[{mu.low:.3f}, {mu.high:.3f}] vs 0")
    assert mu.mu < TOLERANCE, (
        f"rounds that sampled none of {_EXTRA_MEMBERS} extra members are told apart from "
        f"the group without them (mu_hat {mu.mu:.3f}, 95% CI [{mu.low:.3f}, {mu.high:.3f}]) "
        "when every member's update is under the clip: the released count query depends "
        "on the group's true size (e.g. divided by q x the true size, not q x the "
        "estimate), which the ledger's q = m / N does not count")


# DP-SGD (example level): a linear classifier at zero; the canary image is 1e4 e0 and the
# crowd's 10 e1 (all label 0), so the canary's gradient is along u = e0 x (-1, 1), the
# crowd's along v = e1 x (-1, 1), both clipped to C. SGD at lr 1 releases -noised sum / B.


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, use_bias=False, kernel_init=nn.initializers.zeros)(x)


def _dpsgd_steps(n_examples, canary, seed, draws, config):
    images = np.zeros((n_examples, 2), np.float32)
    images[:, 1] = 10.0
    if canary:
        images[-1] = [1e4, 0.0]
    labels = np.zeros(n_examples, np.int32)
    mechanism = privacy.GaussianSumMechanism(config.l2_clip, config.noise_multiplier)
    model, optimizer = _Linear(), optax.sgd(1.0)
    step = dpsgd.make_train_step(model, optimizer, config, n_examples, mechanism)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    rate = config.batch_size / n_examples

    def one(key):
        kernel = step(state, images, labels, key)["params"]["params"]["Dense_0"]["kernel"]
        # The step's own sample (`make_train_step` splits its key into sample and noise).
        indices, count = privacy.poisson_sample(jax.random.split(key)[0], n_examples, rate)
        sampled = jnp.any((indices == n_examples - 1) & (jnp.arange(n_examples) < count))
        return kernel[:, 1] - kernel[:, 0], sampled

    keys = jax.random.split(jax.random.key(seed), draws)
    features, sampled = jax.jit(lambda k: jax.lax.map(one, k))(keys)
    return np.asarray(features), np.asarray(sampled)


def test_dpsgd_step_is_as_distinguishable_as_its_recorded_gaussian():
    crowd, z = 40, 1.0
    config = dpsgd.DpSgdConfig(batch_size=20, l2_clip=1.0, noise_multiplier=z,
                               sampling="poisson", optimizer="sgd", learning_rate=1.0)
    x_in, sampled = _dpsgd_steps(crowd + 1, True, 1, 4000, config)
    x_out, _ = _dpsgd_steps(crowd, False, 2, 2000, config)
    ledger = dpsgd.new_ledger(config, z, crowd + 1)
    ledger.record(dpsgd.step_event(config, z, crowd + 1))
    (event, _), = ledger.entries
    assert abs(sampled.mean() - event.sampling_probability) < 0.03, "sampled at its rate"
    s_in, s_out = gdp_audit.best_linear_statistic(x_in[sampled], x_out)
    _check("DP-SGD Poisson", s_in, s_out, event.event, ledger.relation)


# DataLens TopAgg: one teacher's k-sparse vote flips sign on its top-k coordinates (the
# sensitivity sqrt(4k) the event assumes); the other teachers vote deterministically
# (|gradient| > b). The release is the noisy vote sum (the threshold is post-processing).


def test_topagg_release_is_as_distinguishable_as_its_recorded_gaussian():
    config = DataLensConfig(num_teachers=5, topk=4, grad_bound=1e-3, sigma=4.0)
    topagg = config.topagg()
    assert isinstance(topagg, TopAgg)
    dim, k = 50, config.topk
    rng = np.random.default_rng(0)
    others = rng.normal(size=(config.num_teachers - 1, dim)).astype(np.float32)
    canary = np.zeros(dim, np.float32)
    canary[:k] = 1.0

    def release(sign, key):
        vote_key, noise_key = jax.random.split(key)
        grads = jnp.concatenate([jnp.asarray(others), sign * canary[None]])
        keys = jax.random.split(vote_key, len(grads))
        votes = jax.vmap(topagg.vote)(grads, keys)
        return jnp.sum(topagg.privatize(jnp.sum(votes, 0), noise_key)[:k])

    run = jax.jit(jax.vmap(release, in_axes=(None, 0)))
    s_in = np.asarray(run(1.0, jax.random.split(jax.random.key(1), 2000)))
    s_out = np.asarray(run(-1.0, jax.random.split(jax.random.key(2), 2000)))
    ledger = datalens_training.new_ledger(config, 1000)
    ledger.record(topagg.dp_event(), count=config.aggregations_per_step)
    (event, _), = ledger.entries
    _check("DataLens TopAgg", s_in, s_out, event, ledger.relation)


# The helpers themselves, on exact Gaussians.


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gdp_mu_recovers_a_known_shift_and_the_eps_bound_stays_below_its_eps(mu):
    rng = np.random.default_rng(int(mu * 10))
    s_in, s_out = rng.normal(mu, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    got = gdp_audit.gdp_mu(s_in, s_out)
    assert got.low < mu < got.high and abs(got.mu - mu) < TOLERANCE
    eps = privacy.epsilon(dp_event.GaussianDpEvent(1 / mu), DELTA, accountant="pld")
    assert 0 <= gdp_audit.epsilon_lower_bound(s_in, s_out, DELTA) < eps


def test_eps_lower_bound_of_separated_samples_exceeds_a_small_eps():
    s_in, s_out = np.full(2000, 10.0), np.zeros(2000)
    bound = gdp_audit.epsilon_lower_bound(s_in, s_out, DELTA)
    assert bound > math.log(1000 / 4), f"perfectly separated samples gave eps >= {bound}"


def test_eps_lower_bound_of_a_test_that_fails_on_the_held_out_halves_is_zero():
    # The first halves pick "s > 0" (perfect there); on the second halves it fires on
    # 5% of s_in and all of s_out: no evidence of any eps, and eps >= 0 anyway.
    s_in = np.concatenate([np.full(1000, 10.0), np.full(50, 5.0), np.zeros(950)])
    s_out = np.concatenate([np.zeros(1000), np.full(1000, 5.0)])
    bound = gdp_audit.epsilon_lower_bound(s_in, s_out, DELTA)
    assert bound == 0.0, f"a test worse than chance gave the eps lower bound {bound}"
