"""Empirical privacy estimation with random canaries (one training run).

"One-shot Empirical Privacy Estimation for Federated Learning" (Andrew, Kairouz, Oh,
Oprea, McMahan, Suriyakumar, ICLR 2024). Beside the real records of the run being audited
(users of DP-FedAvg, examples of DP-SGD), canaries take part: 2k candidate directions,
each inserted by its own fair coin, the rest held out (`draw_pair`). An inserted canary
is sampled as a record is (Poisson, the records' rate q) and, each time it is sampled, adds
its random unit direction u_c times the clip norm C to the clipped sum before the noise,
the largest contribution a record can make (`insert`: a canary client's update in
`DpFedAvg`, a canary example's gradient in `dpfed.train.dpsgd`, the "gradient canary" of
Nasr et al. 2023, "Tight Auditing of Differentially Private Machine Learning"). After
training, a direction's score is the cosine of the model's change theta_T - theta_0 with
it (`scores`: the final-model attack). The inserted canaries score higher than the
held-out ones by as much as the noise lets them. From the two sets of scores
(`estimate`):

- `epsilon_lower_bound`: with probability >= 1 - significance the run's true eps is at
  least this: the one-run bound of Steinke, Nasr, Jagielski 2023 ("Privacy Auditing with
  One (1) Training Run"), computed by `jax_privacy.auditing` (its best threshold,
  Bonferroni-corrected over the thresholds). The bound needs each of the 2k candidate
  directions to be inserted or held out by its own fair coin (`draw_pair`), so the two
  sets have about k directions each. One above the ledger's eps would prove that the code
  spends more privacy than it records.
- `epsilon_estimate`: the paper's estimate, not a bound: the scores read as Gaussians of
  one std, shifted by mu = (mean_in - mean_out) / std_out, i.e. a Gaussian mechanism of
  noise multiplier 1 / mu, and its eps at delta (analytic).
- `epsilon_estimate_two_variances`: also not a bound: a Gaussian fitted to each set (its
  own mean and std, as the paper fits them) and the eps at delta of a mechanism whose
  outputs on neighbours are those two (`gaussian_pair_epsilon`). Unequal stds make the
  privacy loss quadratic, so at a small delta this reads the tails and is sensitive to
  the stds' sampling noise (a few % with 1,000 scores each).

Directions. The noise is isotropic: every unit direction sees the same noise, and what a
canary needs is to be nearly orthogonal to the other canaries and to the records'
contributions. The paper draws dense directions; here each is `support`-sparse: one
coordinate drawn uniformly in each of s equal blocks of the d parameters, values
+-1/sqrt(s) (exactly unit), so k directions take k s numbers instead of k d.

An audit run's model holds the canaries: it is for auditing, not for release. The
scores are computed from the released model alone and the canaries are no record's data,
so the audit's figures are post-processing of the run's releases (its ledger covers them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax_privacy import auditing
from scipy import optimize, stats

from dpfed.privacy.accounting import format_upper
from dpfed.privacy.sampling import bernoulli_at_most

PyTree = Any
SUPPORT = 1024  # nonzero coordinates of a canary direction (all of them in a smaller model)
SIGNIFICANCE = 0.05  # of the lower bound: it holds with probability 0.95
# The fewest canaries (`--audit_canaries`) of an audit run: with 2k fair coins, a set of
# fewer than 2 directions (nothing to estimate from) has probability 2 (2k + 1) / 4^k.
MIN_CANARIES = 20
_MAX_EPSILON = 500.0  # `gaussian_pair_epsilon` beyond it: inf (e^eps nears float overflow)
# fold_in(the key of a training step or round, STEP_KEY): the canaries it samples.
STEP_KEY = 2**31 - 1


class Canaries(NamedTuple):
    """Sparse unit directions in the flat space of the shared parameters (`ravel_pytree`).

    Attributes:
      coords: [k, s] int32, the coordinates of each direction (one in each of s blocks).
      values: [k, s] float32, +-1/sqrt(s) at those coordinates.
    """

    coords: jax.Array
    values: jax.Array

    @property
    def num_directions(self) -> int:
        """k, the number of directions."""
        return self.coords.shape[0]

    def select(self, mask: np.ndarray) -> Canaries:
        """The directions where the boolean `mask` [k] is True."""
        return Canaries(self.coords[mask], self.values[mask])


def draw(key: jax.Array, params: PyTree, count: int, support: int = SUPPORT) -> Canaries:
    """`count` random unit directions in the space of `params` (sparse: module docstring).

    Raises:
      ValueError: for a count or support < 1.
    """
    if count < 1 or support < 1:
        raise ValueError(f"need count and support >= 1, got {count} and {support}")
    dim = flat_size(params)
    s = min(support, dim)
    block = dim // s
    offset_key, sign_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (count, s), 0, block)
    coords = (jnp.arange(s) * block + offsets).astype(jnp.int32)
    signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (count, s)), 1.0, -1.0)
    return Canaries(coords, (signs / np.sqrt(s)).astype(jnp.float32))


def draw_pair(key: jax.Array, params: PyTree, count: int) -> tuple[Canaries, Canaries]:
    """(inserted, held-out) directions in the space of `params`: `2 count` candidates, each
    inserted by its own fair coin (the random inclusion the one-run lower bound needs), so
    about `count` of each."""
    candidates = draw(key, params, 2 * count)
    coins = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (2 * count,)))
    return candidates.select(coins), candidates.select(~coins)


def flat_size(params: PyTree) -> int:
    """d, the number of parameters in `params`."""
    return sum(int(np.prod(jnp.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params))


def check_fits(canaries: Canaries, params: PyTree) -> None:
    """Raises ValueError unless every coordinate of `canaries` lies in `params`' space."""
    dim = flat_size(params)
    top = int(jnp.max(canaries.coords)) if canaries.num_directions else -1
    if top >= dim:
        raise ValueError(f"the canaries were drawn for more than the {dim} shared parameters "
                         f"(a coordinate {top}): draw them from these params")


def insert(
    canaries: Canaries, clipped_sum: PyTree, weight: jax.Array | float, rate: float,
    key: jax.Array,
) -> PyTree:
    """`clipped_sum` plus weight * u_c for each canary sampled (Poisson, `rate`, as
    `sampling.bernoulli_at_most` samples records).

    A canary is one more record whose clipped contribution has norm |weight| = C, the
    records' clip norm: the sum's sensitivity to it is theirs, and the noise added
    afterwards is the step's. `weight` is C for an update the server adds (DP-FedAvg) and
    -C for a gradient that descent subtracts (DP-SGD), so the model moves along u_c.
    """
    present = bernoulli_at_most(key, rate, (canaries.num_directions,))
    flat, unravel = ravel_pytree(clipped_sum)
    weights = weight * present.astype(flat.dtype)
    added = jnp.zeros_like(flat).at[canaries.coords.ravel()].add(
        (weights[:, None] * canaries.values).ravel())
    return unravel(flat + added)


@jax.jit
def scores(canaries: Canaries, initial: PyTree, final: PyTree) -> jax.Array:
    """[k]: the cosine of the model's change `final - initial` with each direction."""
    change = ravel_pytree(final)[0].astype(jnp.float32) - ravel_pytree(initial)[0].astype(
        jnp.float32)
    projections = jnp.sum(change[canaries.coords] * canaries.values, axis=1)
    return projections / jnp.maximum(jnp.linalg.norm(change), jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The audit's figures (module docstring); eps at `delta`."""

    inserted: int
    held_out: int
    mean_inserted: float
    mean_held_out: float
    std_inserted: float
    std_held_out: float
    mu: float
    epsilon_estimate: float
    epsilon_estimate_two_variances: float
    epsilon_lower_bound: float
    significance: float
    delta: float

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)


def estimate(
    inserted_scores: Any, held_out_scores: Any, delta: float,
    significance: float = SIGNIFICANCE,
) -> AuditResult:
    """eps's estimate and lower bound at `delta` from the two sets of scores.

    Raises:
      ValueError: with fewer than 2 scores in a set, a non-finite score, or delta or
        significance outside (0, 1).
    """
    inside = np.asarray(inserted_scores, np.float64)
    outside = np.asarray(held_out_scores, np.float64)
    if min(inside.size, outside.size) < 2:
        raise ValueError("the audit needs at least 2 inserted and 2 held-out scores")
    if not (np.all(np.isfinite(inside)) and np.all(np.isfinite(outside))):
        raise ValueError("a canary score is NaN or inf: the model diverged")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    std_in, std_out = float(np.std(inside, ddof=1)), float(np.std(outside, ddof=1))
    mean_in, mean_out = float(np.mean(inside)), float(np.mean(outside))
    shift = mean_in - mean_out
    if std_out > 0:
        mu = shift / std_out
    else:  # held-out scores all equal (a model that did not move: all 0)
        mu = np.inf if shift > 0 else 0.0
    bound = auditing.CanaryScoreAuditor(inside, outside).epsilon_one_run(significance, delta)
    return AuditResult(
        inserted=inside.size,
        held_out=outside.size,
        mean_inserted=mean_in,
        mean_held_out=mean_out,
        std_inserted=std_in,
        std_held_out=std_out,
        mu=mu,
        epsilon_estimate=gaussian_epsilon(mu, delta),
        epsilon_estimate_two_variances=gaussian_pair_epsilon(
            (mean_in, std_in), (mean_out, std_out), delta),
        epsilon_lower_bound=float(bound),
        significance=significance,
        delta=delta,
    )


def audit_run(
    canaries: tuple[Canaries, Canaries], initial: PyTree, final: PyTree, ledger: dict[str, Any]
) -> dict[str, Any]:
    """audit.json of a run whose model went from `initial` to `final` with `canaries` =
    (inserted, held-out): `AuditResult.to_json` at the delta of `ledger` (its
    `PrivacyLedger.to_json`), beside the ledger's `ledger_epsilon_rdp` and `_pld`."""
    inserted, held_out = canaries
    result = estimate(scores(inserted, initial, final), scores(held_out, initial, final),
                      ledger["delta"]).to_json()
    return {**result, "ledger_epsilon_rdp": ledger["epsilon_rdp"],
            "ledger_epsilon_pld": ledger["epsilon_pld"]}


def report_line(summary: dict[str, Any]) -> str:
    """report.md's line on the figures (`audit_run`) of a trainer's summary.json object
    (its `audit`); empty for a run without an audit."""
    result = summary.get("audit")
    if result is None:
        return ""
    ledger_epsilon = format_upper(result["ledger_epsilon_rdp"])
    return (
        f"- **canary audit** (Andrew et al. 2024; an audit run: its model holds "
        f"{result['inserted']} canaries and is not for release): the canaries stand "
        f"mu = {result['mu']:.3f} noise stds out; eps estimate {result['epsilon_estimate']:.3f} "
        f"({result['epsilon_estimate_two_variances']:.3f} with each set's own std), "
        f"lower bound {result['epsilon_lower_bound']:.3f} (holds with probability "
        f"{1 - result['significance']:g}), against the ledger's {ledger_epsilon} (RDP) at delta "
        f"{result['delta']:g}\n"
    )


def gaussian_epsilon(mu: float, delta: float) -> float:
    """eps at `delta` of a Gaussian mechanism whose outputs on neighbours are `mu` noise
    stds apart (mu-GDP; the analytic formula of Balle and Wang 2018, in dp_accounting):
    0 for mu <= 0, inf for an infinite mu."""
    if not mu > 0:
        return 0.0
    return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))


def gaussian_pair_epsilon(
    inserted: tuple[float, float], held_out: tuple[float, float], delta: float
) -> float:
    """eps at `delta` of a mechanism whose outputs on neighbours are the Gaussians
    N(mean, std^2) of `inserted` and `held_out` (each a (mean, std)), in both orders: the
    smallest eps whose hockey-stick divergences are both <= delta. With equal stds, the
    Gaussian mechanism's (Balle and Wang 2018). A zero std: inf for a positive shift,
    else 0."""
    if min(inserted[1], held_out[1]) <= 0:
        return np.inf if inserted[0] > held_out[0] else 0.0

    def excess(epsilon: float) -> float:
        return max(_hockey_stick(inserted, held_out, epsilon),
                   _hockey_stick(held_out, inserted, epsilon)) - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        if high > _MAX_EPSILON:
            return np.inf
        high *= 2
    return float(optimize.brentq(excess, high / 2 if high > 1 else 0.0, high, xtol=1e-9))


def _hockey_stick(p: tuple[float, float], q: tuple[float, float], epsilon: float) -> float:
    """sup_S P(S) - e^eps Q(S) for P = N(p), Q = N(q) ((mean, std) each): P - e^eps Q
    on the set where the privacy loss log(dP/dQ)(x) = a x^2 + b x + c exceeds eps."""
    (mean_p, std_p), (mean_q, std_q) = p, q
    a = 0.5 / std_q**2 - 0.5 / std_p**2
    b = mean_p / std_p**2 - mean_q / std_q**2
    c = 0.5 * mean_q**2 / std_q**2 - 0.5 * mean_p**2 / std_p**2 + np.log(std_q / std_p) - epsilon
    intervals = _positive_set(a, b, c)
    mass_p = sum(_mass(mean_p, std_p, lo, hi) for lo, hi in intervals)
    mass_q = sum(_mass(mean_q, std_q, lo, hi) for lo, hi in intervals)
    return max(mass_p - np.exp(epsilon) * mass_q, 0.0)


def _positive_set(a: float, b: float, c: float) -> list[tuple[float, float]]:
    """The intervals where a x^2 + b x + c > 0 (roots by the cancellation-free formula)."""
    if a == 0:
        if b == 0:
            return [(-np.inf, np.inf)] if c > 0 else []
        root = -c / b
        return [(root, np.inf)] if b > 0 else [(-np.inf, root)]
    disc = b * b - 4 * a * c
    if disc <= 0:
        return [(-np.inf, np.inf)] if a > 0 else []
    half = -0.5 * (b + np.copysign(np.sqrt(disc), b))
    low, high = sorted((half / a, c / half))
    return [(-np.inf, low), (high, np.inf)] if a > 0 else [(low, high)]


def _mass(mean: float, std: float, low: float, high: float) -> float:
    """P(low < X < high) for X ~ N(mean, std^2), from the nearer tails."""
    z_low, z_high = (low - mean) / std, (high - mean) / std
    if z_low > 0:
        return float(stats.norm.sf(z_low) - stats.norm.sf(z_high))
    return float(stats.norm.cdf(z_high) - stats.norm.cdf(z_low))
