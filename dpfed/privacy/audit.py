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
  One (1) Training Run"), computed by `jax_privacy.auditing` for each of a fixed set of
  guesses, "the top j scores were inserted" with j fixed by the candidate count alone
  (`fdp_audit.tests`): the best of them, Bonferroni-corrected over their number. (Not
  jax_privacy's own correction, which divides by the number of thresholds on the scores'
  ROC hull, a number the scores choose: the union bound does not cover it, and the bound
  it gives can read higher than is proven.) The bound needs each of the 2k candidate
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

All rounds (DP-FedAvg; DP-SGD's steps, m the expected batch; `RoundScores`, `observe`,
`all_rounds`). The ledger bounds an
adversary who sees every round's release, the noised mean, not only the final model. Each
round, each candidate's standardised projection s = <mean, u_c> m / C (m the expected
cohort, C the round's clip norm) moves by exactly 1 when an inserted canary takes part
and carries the noise N(0, sigma^2), sigma the update's noise multiplier. Accumulated
over the rounds: the sensitivity and the noise the run adds (`shift`, `noise_std`), an
estimate of the eps they imply, and the one-run lower bound on each candidate's
log-likelihood ratio of "takes part at rate q" against "never", a function of the
releases and public constants alone (Andrew et al. 2024's all-rounds setting). Beside
it, the f-DP one-run bound of Mahloujifar et al. 2024 within the ledger's own family,
`rounds` x PoissonSampled(q, Gaussian(s)) (`lower_bound_in_family`, `dpfed.privacy.
fdp_audit`), on the llr scores and on the final model's: the least private member the
scores prove the run is not as private as. DataLens (`dpfed.generative.datalens.canaries`)
releases noisy vote sums, not a model: its canaries are canary teachers' votes in vote
space, every step (rate 1), and its audit.json holds these all-rounds figures alone
(`all_rounds_run`: no final-model attack).

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

from dpfed.privacy import accounting, fdp_audit
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


def draw(
    key: jax.Array, params: PyTree, count: int, support: int = SUPPORT, rows: int = 1,
) -> Canaries:
    """`count` random unit directions in the space of `params` (sparse: module docstring).

    With `rows` > 1 the flat space is `rows` equal rows (e.g. the several releases of one
    step, `dpfed.generative.datalens.canaries`), and each direction has `support`
    coordinates in every row (drawn within the row as above), values +-1/sqrt(rows s): its
    norm in every row is 1/sqrt(rows). `rows` = 1 is the draw of the whole space.

    Raises:
      ValueError: for a count, support or rows < 1, or rows that do not divide the space.
    """
    if count < 1 or support < 1 or rows < 1:
        raise ValueError(f"need count, support and rows >= 1, got {count}, {support}, {rows}")
    dim = flat_size(params)
    if dim % rows:
        raise ValueError(f"{rows} rows do not divide the {dim} coordinates")
    width = dim // rows
    s = min(support, width)
    block = width // s
    offset_key, sign_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (count, rows, s), 0, block)
    starts = jnp.arange(rows)[:, None] * width + jnp.arange(s) * block
    coords = (starts + offsets).reshape(count, rows * s).astype(jnp.int32)
    signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (count, rows * s)), 1.0, -1.0)
    return Canaries(coords, (signs / np.sqrt(rows * s)).astype(jnp.float32))


def fair_coins(key: jax.Array, count: int) -> np.ndarray:
    """bool [2 `count`]: whether each of 2 `count` candidates is inserted, each by its own
    fair coin, from `key` (which must draw nothing else: `draw_pair`)."""
    return np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (2 * count,)))


def draw_pair(key: jax.Array, params: PyTree, count: int) -> tuple[Canaries, Canaries]:
    """(inserted, held-out) directions in the space of `params`: `2 count` candidates, each
    inserted by its own fair coin (the random inclusion the one-run lower bound needs), so
    about `count` of each.

    The directions and the coins come from two keys split from `key`: the lower bound
    needs coins independent of the directions. (Until stop 67 the coins came from
    ``fold_in(key, 1)``, which under partitionable threefry is the key `draw` split off
    for the directions' signs: coin i was a sign of candidate i // s.)"""
    direction_key, coin_key = jax.random.split(key)
    candidates = draw(direction_key, params, 2 * count)
    coins = fair_coins(coin_key, count)
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
    -C for a gradient that descent subtracts (DP-SGD), so the model moves along u_c; or
    [k], one weight a direction (0 for one held out: DataLens's candidates, each drawn
    anew every step, `dpfed.generative.datalens.canaries`).
    """
    present = bernoulli_at_most(key, rate, (canaries.num_directions,))
    flat, unravel = ravel_pytree(clipped_sum)
    weights = weight * present.astype(flat.dtype)
    added = jnp.zeros_like(flat).at[canaries.coords.ravel()].add(
        (weights[:, None] * canaries.values).ravel())
    return unravel(flat + added)


def concat(first: Canaries, second: Canaries) -> Canaries:
    """The directions of `first`, then those of `second`."""
    return Canaries(jnp.concatenate([first.coords, second.coords]),
                    jnp.concatenate([first.values, second.values]))


def _project(canaries: Canaries, flat: jax.Array) -> jax.Array:
    """[k]: <flat, u_c> for each direction (a gather of its s coordinates)."""
    return jnp.sum(flat[canaries.coords] * canaries.values, axis=1)


@jax.jit
def scores(canaries: Canaries, initial: PyTree, final: PyTree) -> jax.Array:
    """[k]: the cosine of the model's change `final - initial` with each direction."""
    change = ravel_pytree(final)[0].astype(jnp.float32) - ravel_pytree(initial)[0].astype(
        jnp.float32)
    projections = _project(canaries, change)
    return projections / jnp.maximum(jnp.linalg.norm(change), jnp.finfo(jnp.float32).tiny)


class RoundScores(NamedTuple):
    """Per-candidate sums over the rounds of the standardised projection s (`observe`).

    Attributes:
      sum: [k] float32, sum over rounds of s.
      sum_sq: [k] float32, sum over rounds of s^2.
      llr: [k] float32, sum over rounds of log((1 - q) + q exp((s - 1/2) / sigma^2)).
    """

    sum: jax.Array
    sum_sq: jax.Array
    llr: jax.Array

    @classmethod
    def zeros(cls, count: int) -> RoundScores:
        """The sums of `count` candidates before any round."""
        return cls(*(jnp.zeros((count,), jnp.float32) for _ in range(3)))


def observe(
    sums: RoundScores, canaries: Canaries, mean: PyTree, clip: jax.Array, divisor: float,
    rate: float, noise_multiplier: float,
) -> RoundScores:
    """`sums` plus one round's standardised projections s = <mean, u_c> divisor / clip.

    `mean` is the round's release (the noised sum / `divisor`, the expected cohort), in
    which a canary that took part adds clip u_c / divisor: s shifts by 1 when it does, and
    the noise adds N(0, noise_multiplier^2) to s. The llr term is that of a direction
    taking part at `rate` q against never (q = 1 included).
    """
    flat = ravel_pytree(mean)[0].astype(jnp.float32)
    s = _project(canaries, flat) * (divisor / clip)
    log_absent = -np.inf if rate >= 1 else float(np.log1p(-rate))
    llr = jnp.logaddexp(log_absent, np.log(rate) + (s - 0.5) / noise_multiplier**2)
    return RoundScores(sums.sum + s, sums.sum_sq + s * s, sums.llr + llr)


def all_rounds(
    sums: RoundScores, inserted: int, rounds: int, rate: float, noise_multiplier: float,
    delta: float, significance: float = SIGNIFICANCE,
) -> dict[str, Any]:
    """audit.json's `all_rounds` figures from `rounds` rounds' `sums` (`observe`) of
    candidates whose first `inserted` were inserted, the rest held out.

    - `shift`: the inserted sets' mean sum of s above the held-out one, per expected
      participation (rounds x rate): the sensitivity, in units of C / divisor (1 expected);
    - `noise_std`: the held-out s's std, pooled over candidates and rounds: the noise
      multiplier the run adds (at least `noise_multiplier`; more by the records' projected
      sum). Below it beyond sampling error: less noise than the ledger records;
    - `epsilon_estimate`: eps at `delta` of `rounds` Poisson-sampled (`rate`) Gaussian
      mechanisms of multiplier noise_std / shift (PLD): an estimate, not a bound;
    - `epsilon_lower_bound`: the one-run bound (`lower_bound`) on the llr scores;
    - `epsilon_lower_bound_fdp`: the f-DP one-run bound within the ledger's family
      (`lower_bound_in_family`: `rounds` x PoissonSampled(`rate`, Gaussian(s))) on the
      llr scores.

    Raises:
      ValueError: for fewer than 2 candidates in a set, no rounds, or a non-finite sum.
    """
    total, total_sq, llr = (np.asarray(x, np.float64) for x in sums)
    held_out = total.size - inserted
    if min(inserted, held_out) < 2 or rounds < 1:
        raise ValueError("the all-rounds audit needs >= 1 round and 2 candidates of each set")
    if not all(np.all(np.isfinite(x)) for x in (total, total_sq, llr)):
        raise ValueError("a round's canary projection is NaN or inf: the model diverged")
    shift = float(np.mean(total[:inserted]) - np.mean(total[inserted:])) / (rounds * rate)
    count = held_out * rounds
    pooled_mean = np.sum(total[inserted:]) / count
    noise_std = float(np.sqrt(max(np.sum(total_sq[inserted:]) - count * pooled_mean**2, 0.0)
                              / max(count - 1, 1)))
    return {
        "rounds": rounds,
        "rate": rate,
        "noise_multiplier": noise_multiplier,
        "shift": shift,
        "noise_std": noise_std,
        "epsilon_estimate": sampled_gaussian_epsilon(noise_std, shift, rate, rounds, delta),
        "epsilon_lower_bound": lower_bound(llr[:inserted], llr[inserted:], delta, significance),
        "epsilon_lower_bound_fdp": lower_bound_in_family(
            llr[:inserted], llr[inserted:], rounds, rate, noise_multiplier, delta, significance),
        "significance": significance,
        "delta": delta,
    }


def sampled_gaussian_epsilon(
    noise_std: float, shift: float, rate: float, rounds: int, delta: float
) -> float:
    """eps at `delta` (PLD) of `rounds` Gaussian mechanisms of multiplier noise_std / shift,
    each Poisson-sampled at `rate`: 0 for shift <= 0, inf for noise_std 0."""
    if not shift > 0:
        return 0.0
    if not noise_std > 0:
        return np.inf
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(noise_std / shift)), rounds)
    eps = accounting.epsilon(event, delta, accountant="pld")
    assert eps is not None  # PLD supports Poisson-sampled Gaussians
    return float(eps)


def lower_bound(inserted_scores: Any, held_out_scores: Any, delta: float,
                significance: float = SIGNIFICANCE) -> float:
    """The one-run lower bound on eps at `delta` (Steinke, Nasr, Jagielski 2023; module
    docstring) from the scores of the candidates inserted and held out by fair coins: the
    best of the guesses "the top j were inserted", j in `fdp_audit.tests` (fixed by the
    candidate count), each at `significance` / their number (Bonferroni)."""
    inside = np.asarray(inserted_scores, np.float64)
    outside = np.asarray(held_out_scores, np.float64)
    auditor = auditing.CanaryScoreAuditor(inside, outside)
    top = np.sort(np.concatenate([inside, outside]))[::-1]
    guesses = fdp_audit.tests(top.size)
    return max(float(auditor.epsilon_one_run(
        significance / guesses.size, delta,
        threshold_strategy=auditing.Explicit(float(top[j - 1])))) for j in guesses)


def lower_bound_in_family(
    inserted_scores: Any, held_out_scores: Any, rounds: int, rate: float,
    noise_multiplier: float, delta: float, significance: float = SIGNIFICANCE,
) -> float:
    """The f-DP one-run lower bound (Mahloujifar, Melis, Chaudhuri 2024) within the family
    of `rounds` x PoissonSampled(`rate`, Gaussian(s)), s > 0 (`fdp_audit`): eps at `delta`
    (PLD) of the member of the smallest s that the scores of the candidates inserted and
    held out by fair coins reject. With probability >= 1 - `significance` the run's
    canary mechanism is not as private as that member; 0 when no s up to
    `noise_multiplier` x `fdp_audit.SEARCH_ABOVE` is rejected, and at most the eps of s =
    `noise_multiplier` / `fdp_audit.SEARCH_BELOW`. Not a bound against every (eps,
    delta)-DP mechanism: `lower_bound` is."""
    noise = fdp_audit.smallest_rejected_noise(
        np.asarray(inserted_scores, np.float64), np.asarray(held_out_scores, np.float64),
        rounds, rate, noise_multiplier, significance)
    return 0.0 if noise is None else sampled_gaussian_epsilon(noise, 1.0, rate, rounds, delta)


def family_lower_bound(
    family: dict[str, Any], inserted_scores: Any, held_out_scores: Any,
) -> float:
    """`lower_bound_in_family` of the scores, in the family and at the delta and
    significance of `family` (an `all_rounds` result)."""
    return lower_bound_in_family(
        inserted_scores, held_out_scores, family["rounds"], family["rate"],
        family["noise_multiplier"], family["delta"], family["significance"])


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
        epsilon_lower_bound=lower_bound(inside, outside, delta, significance),
        significance=significance,
        delta=delta,
    )


def audit_run(
    canaries: tuple[Canaries, Canaries], initial: PyTree, final: PyTree, ledger: dict[str, Any],
    family: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """audit.json of a run whose model went from `initial` to `final` with `canaries` =
    (inserted, held-out): `AuditResult.to_json` at the delta of `ledger` (its
    `PrivacyLedger.to_json`), beside the ledger's `ledger_epsilon_rdp` and `_pld`. With
    `family` (the run's `all_rounds` figures), those as `all_rounds`, with the final-model
    scores' `family_lower_bound` as `final_model_epsilon_lower_bound_fdp`: the final model
    is post-processing of all the releases, so the family's claim covers it."""
    inserted, held_out = canaries
    inside, outside = scores(inserted, initial, final), scores(held_out, initial, final)
    figures = {**estimate(inside, outside, ledger["delta"]).to_json(), **_ledger_fields(ledger)}
    if family is not None:
        figures["all_rounds"] = {
            **family,
            "final_model_epsilon_lower_bound_fdp": family_lower_bound(family, inside, outside)}
    return figures


def all_rounds_run(
    inserted: int, held_out: int, ledger: dict[str, Any], family: dict[str, Any],
) -> dict[str, Any]:
    """audit.json of a run audited in its releases alone (its canaries are not in the
    model's parameters: DataLens's, in vote space), with `inserted` and `held_out`
    candidates: the counts and the ledger's eps (as `audit_run`), and `family` (the
    run's `all_rounds` figures at the ledger's delta) as `all_rounds`."""
    return {"inserted": inserted, "held_out": held_out, **_ledger_fields(ledger),
            "all_rounds": family}


def _ledger_fields(ledger: dict[str, Any]) -> dict[str, Any]:
    """audit.json's eps of the ledger (its `PrivacyLedger.to_json`)."""
    return {"ledger_epsilon_rdp": ledger["epsilon_rdp"],
            "ledger_epsilon_pld": ledger["epsilon_pld"]}


def report_line(summary: dict[str, Any]) -> str:
    """report.md's line on the figures (`audit_run`) of a trainer's summary.json object
    (its `audit`); empty for a run without an audit."""
    result = summary.get("audit")
    if result is None:
        return ""
    ledger_epsilon = format_upper(result["ledger_epsilon_rdp"])
    if "mu" not in result:  # the all-rounds figures alone (`all_rounds_run`)
        return _all_rounds_line(result, ledger_epsilon)
    return (
        f"- **canary audit** (Andrew et al. 2024; an audit run: its model holds "
        f"{result['inserted']} canaries and is not for release): the canaries stand "
        f"mu = {result['mu']:.3f} noise stds out; eps estimate {result['epsilon_estimate']:.3f} "
        f"({result['epsilon_estimate_two_variances']:.3f} with each set's own std), "
        f"lower bound {result['epsilon_lower_bound']:.3f} (holds with probability "
        f"{1 - result['significance']:g}), against the ledger's {ledger_epsilon} (RDP) at delta "
        f"{result['delta']:g}{_all_rounds_clause(result.get('all_rounds'))}\n"
    )


def _all_rounds_clause(figures: dict[str, Any] | None) -> str:
    """report.md's words on the `all_rounds` figures; empty without them."""
    if figures is None:
        return ""
    return (
        f"; all rounds' releases ({figures['rounds']} rounds): each participation moves a canary "
        f"{figures['shift']:.3f} C / m (1 expected), {_release_figures(figures)} "
        f"({figures['final_model_epsilon_lower_bound_fdp']:.3f} from the final model)"
    )


def _release_figures(figures: dict[str, Any]) -> str:
    """report.md's words on what the `all_rounds` figures read from the releases: the
    noise, the eps estimate and both lower bounds."""
    return (
        f"noise std {figures['noise_std']:.3f} (the ledger's {figures['noise_multiplier']:.4g}), "
        f"eps estimate {figures['epsilon_estimate']:.3f}, lower bound "
        f"{figures['epsilon_lower_bound']:.3f}, f-DP lower bound within the ledger's family "
        f"(Mahloujifar et al. 2024) {figures['epsilon_lower_bound_fdp']:.3f}"
    )


def _all_rounds_line(result: dict[str, Any], ledger_epsilon: str) -> str:
    """report.md's line on `all_rounds_run`'s figures (each step's score moves by 1 when
    an inserted canary takes part, in units of the mechanism's sensitivity)."""
    figures = result["all_rounds"]
    return (
        f"- **canary audit** (Andrew et al. 2024, every step's release; an audit run: it "
        f"trained with {result['inserted']} canaries and is not for release): over "
        f"{figures['rounds']} steps a canary moves its score {figures['shift']:.3f} "
        f"sensitivities a step (1 expected), {_release_figures(figures)} (the bounds hold "
        f"with probability {1 - figures['significance']:g}), against the ledger's {ledger_epsilon} "
        f"(RDP; PLD {format_upper(result['ledger_epsilon_pld'])}) at delta "
        f"{figures['delta']:g}\n"
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
