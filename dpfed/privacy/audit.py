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
- `epsilon_estimate`: the paper's estimate, not a bound: the scores read as Gaussians,
  shifted by mu = (mean_in - mean_out) / std_out, i.e. a Gaussian mechanism of noise
  multiplier 1 / mu, and its eps at delta (analytic). (The paper fits each set its own
  variance; here both take the held-out one.)

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

from dpfed.privacy.accounting import format_upper
from dpfed.privacy.sampling import bernoulli_at_most

PyTree = Any
SUPPORT = 1024  # nonzero coordinates of a canary direction (all of them in a smaller model)
SIGNIFICANCE = 0.05  # of the lower bound: it holds with probability 0.95
# The fewest canaries (`--audit_canaries`) of an audit run: with 2k fair coins, a set of
# fewer than 2 directions (nothing to estimate from) has probability 2 (2k + 1) / 4^k.
MIN_CANARIES = 20
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
    std_held_out: float
    mu: float
    epsilon_estimate: float
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
    std = float(np.std(outside, ddof=1))
    shift = float(np.mean(inside)) - float(np.mean(outside))
    if std > 0:
        mu = shift / std
    else:  # held-out scores all equal (a model that did not move: all 0)
        mu = np.inf if shift > 0 else 0.0
    bound = auditing.CanaryScoreAuditor(inside, outside).epsilon_one_run(significance, delta)
    return AuditResult(
        inserted=inside.size,
        held_out=outside.size,
        mean_inserted=float(np.mean(inside)),
        mean_held_out=float(np.mean(outside)),
        std_held_out=std,
        mu=mu,
        epsilon_estimate=gaussian_epsilon(mu, delta),
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
        f"mu = {result['mu']:.3f} noise stds out; eps estimate {result['epsilon_estimate']:.3f}, "
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
