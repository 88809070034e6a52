"""The f-DP one-run lower bound within the ledger's own family of mechanisms.

Mahloujifar, Melis, Chaudhuri 2024, "Auditing f-Differential Privacy in One Run"
(arXiv 2410.22235). In the one-run game of `dpfed.privacy.audit` (m candidates, each
inserted by its own fair coin) an adversary guesses "inserted" for the j top-scoring
candidates. If the run is f-DP towards each candidate (a record: add or remove it), the
number of correct guesses is bounded in probability by a function of f alone (`rejects`).
Steinke et al.'s bound (`audit.lower_bound`) uses one (eps, delta) point of the curve;
this module uses the whole trade-off curve of the mechanism the ledger claims.

The family. Each canary's own mechanism in an audit run is the ledger's: `rounds` x
PoissonSampled(rate, Gaussian(s)) of sensitivity 1 (in units of C), s the noise
multiplier. Its trade-off curve f_s increases with s (a larger s is a smaller s plus
independent noise: post-processing), so "the run is f_s-DP" is a stronger claim the
larger s is. `smallest_rejected_noise` finds s*, the smallest s whose claim the scores
reject; `audit.lower_bound_in_family` reports eps at delta of that member (PLD).

Meaning: with probability >= 1 - significance, the run's canary mechanism is NOT f_{s*}-DP:
not as private as `rounds` x PoissonSampled(rate, Gaussian(s*)). An eps above the ledger's
PLD eps (s* below the ledger's multiplier) rejects the ledger's own claim: the run spends
more than it records. It is a bound within this family, not against every (eps,
delta)-DP mechanism: a mechanism outside the family (another noise shape) of the same
eps at delta may pass or fail it. Steinke et al.'s bound, which assumes nothing of the
mechanism, stays beside it.

Soundness. (1) `trade_off_lines`' curve lies below the exact f_s: each (eps_i, delta_i) is
a pessimistic PLD's, which holds for the exact mechanism under add and under remove,
so the curve is symmetric and rejecting it rejects f_s. (2) The tests (`tests`: guess
the top j, for `TESTS` values of j fixed by m alone) each run at significance / their
number (Bonferroni). (3) s* is an s whose rejection was computed. (4) Rejection is
monotone in the curve (below): if the scores reject a curve f, they reject every curve
above it. So if the run is f_{s0}-DP, every computed curve at an s <= s0 lies below
f_{s0}, and a rejection of any of them is a rejection of f_{s0}, which has probability
<= significance: the bisection may look at the scores as often as it likes.

Proof of (4). Let inverses A >= B pointwise (the blow-up inverse of a larger curve is
larger), both nondecreasing, and run `_masses` on both from the same start. Claim,
before the step at i: w_A >= w_B and r_A - c w_A >= r_B - c w_B with c = i / (j - i)
(so r_A >= r_B too). The step at i raises w to max(w, inverse(r)): A's is the larger,
as w_A >= w_B and A(r_A) >= A(r_B) >= B(r_B); it adds c x the rise to r, which keeps r -
c w fixed. The next step's c' = (i - 1) / (j - i + 1) <= c, and r - c' w = (r - c w) + (c
- c') w, so the claim holds at i - 1. Capping r at 1 keeps r_A >= r_B (if B's r reaches
1, A's uncapped r is larger, so it is capped too), and from a cap on r only the w's
order is used, which still holds. At the end both masses of A dominate B's, so A's r +
w exceeds j / m whenever B's does. Stopping at a fixed point changes nothing (no later
step would move either mass). A test checks the domination on nested curves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from dp_accounting.pld import privacy_loss_distribution

BlowUpInverse = Callable[[float], float]
# The curve's PLD grid: 10x dp_accounting's default spacing (pessimistic, so still an upper
# bound on each delta); eps at 1e-5 of 300 x Poisson(0.064, Gaussian(0.917)) moves 7e-5.
PLD_INTERVAL = 1e-3
LINES = 2000  # eps values of the curve's supporting lines, evenly spaced
SMALLEST_DELTA = 1e-14  # the largest eps of the lines: where delta falls below this,
LARGEST_EPSILON = 200.0  # or this (e^eps overflows beyond 709; fewer lines: a lower curve)
# s is searched from the ledger's noise multiplier z within [z / SEARCH_BELOW, z x
# SEARCH_ABOVE]: a rejection at z / 4 already proves the ledger wrong many times over, and
# below it the PLD grows (300 x PoissonSampled(0.064, Gaussian(0.229)): 6 s).
SEARCH_BELOW = 4.0
SEARCH_ABOVE = 64.0
RELATIVE_TOLERANCE = 5e-3  # the bisection on s stops at hi / lo < 1 + this
TESTS = 64  # numbers of guesses tested (`tests`)


@functools.lru_cache(maxsize=256)
def trade_off_lines(rounds: int, rate: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(eps_i, delta_i): `LINES` pairs for which `rounds` x PoissonSampled(`rate`,
    Gaussian(`noise`)) of sensitivity 1 is (eps_i, delta_i)-DP (PLD, pessimistic), both
    under add and under remove (dp_accounting's delta is the larger of the two)."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        noise, sampling_prob=rate, value_discretization_interval=PLD_INTERVAL,
    ).self_compose(rounds)
    top = min(max(float(pld.get_epsilon_for_delta(SMALLEST_DELTA)), 1e-3), LARGEST_EPSILON)
    epsilons = np.linspace(0.0, top, LINES)
    return epsilons, np.asarray(pld.get_delta_for_epsilon(epsilons), np.float64)


def trade_off(epsilons: np.ndarray, deltas: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The trade-off curve implied by (eps_i, delta_i)-DP for all i, at type I errors
    `alpha`: max_i max(0, 1 - delta_i - e^eps_i alpha, e^-eps_i (1 - delta_i - alpha))."""
    alpha = np.asarray(alpha, np.float64)[..., None]
    lines = np.maximum(1 - deltas - np.exp(epsilons) * alpha,
                       np.exp(-epsilons) * (1 - deltas - alpha))
    return np.maximum(np.max(lines, axis=-1), 0.0)


def blow_up_inverse(epsilons: np.ndarray, deltas: np.ndarray) -> BlowUpInverse:
    """y -> the least P-mass of a set whose Q-mass is y, for (P, Q) neighbours' output
    distributions under the curve f of `trade_off`: the inverse of x -> 1 - f(x),
    max(0, max_i (y - delta_i) e^-eps_i, 1 - delta_i - e^eps_i (1 - y))."""
    scale_down, scale_up = np.exp(-epsilons), np.exp(epsilons)

    def inverse(y: float) -> float:
        return max(0.0, float(np.max((y - deltas) * scale_down)),
                   float(np.max(1 - deltas - scale_up * (1 - y))))

    return inverse


def rejects(inverse: BlowUpInverse, candidates: int, guesses: int, correct: int,
            level: float) -> bool:
    """Whether `correct` right out of `guesses` among `candidates` fair-coin candidates
    rejects, at `level`, the claim of the curve behind `inverse` (`blow_up_inverse`).

    Mahloujifar et al. 2024's recursion (`_masses`): suppose the event ">= `correct`
    right" had probability `level`. If the masses the f-DP claim then forces exceed
    guesses / candidates, the fraction of candidates guessed, no mechanism with that
    curve reaches the event with probability `level`: the claim is rejected."""
    right, wrong = _masses(inverse, candidates, guesses, correct, level)
    return right + wrong > guesses / candidates


def _masses(inverse: BlowUpInverse, candidates: int, guesses: int, correct: int,
            level: float) -> tuple[float, float]:
    """The recursion's final (right, wrong) masses. The event's mass splits into r (right
    guesses) and w (wrong ones), a fraction of `level` each. Walking down i = correct -
    1, ..., 0, the f-DP claim forces w up to at least the blow-up inverse of r, and each
    such rise moves i / (guesses - i) of it back to r. Both are nondecreasing in the
    inverse (the module docstring's proof of (4))."""
    right = level * correct / candidates
    wrong = level * (guesses - correct) / candidates
    for i in range(correct - 1, -1, -1):
        raised = max(wrong, inverse(right))
        if raised == wrong:  # a fixed point: neither mass moves again
            break
        right = min(right + i / (guesses - i) * (raised - wrong), 1.0)
        wrong = raised
    return right, wrong


def tests(candidates: int) -> np.ndarray:
    """The numbers of guesses tested, fixed before the scores are seen (so Bonferroni's
    correction over them is valid): `TESTS` values j, evenly spaced in log between 1 and
    `candidates`; the guess j tests "the top j scores were inserted"."""
    return np.unique(np.round(np.geomspace(1, candidates, TESTS)).astype(np.int64))


def correct_guesses(inserted_scores: np.ndarray, held_out_scores: np.ndarray,
                    guesses: np.ndarray) -> np.ndarray:
    """The inserted candidates among the top `guesses` scores (each a count), ties broken
    against the guesser (held-out first): never more than a tie-break blind to the coins
    gets, so a bound on that one's count holds for this one."""
    scores = np.concatenate([inserted_scores, held_out_scores])
    labels = np.concatenate([np.ones(inserted_scores.size, np.int64),
                             np.zeros(held_out_scores.size, np.int64)])
    order = np.lexsort((labels, -scores))  # descending; at a tie, held-out first
    return np.cumsum(labels[order])[guesses - 1]


def smallest_rejected_noise(
    inserted_scores: np.ndarray, held_out_scores: np.ndarray, rounds: int, rate: float,
    noise_multiplier: float, significance: float,
) -> float | None:
    """s*: the smallest noise multiplier s whose claim "`rounds` x PoissonSampled(`rate`,
    Gaussian(s))" the scores reject at `significance` (module docstring), searched from
    `noise_multiplier` down to / `SEARCH_BELOW` and up to x `SEARCH_ABOVE`: None if none
    there is rejected; the low end if it is."""
    inside = np.asarray(inserted_scores, np.float64)
    outside = np.asarray(held_out_scores, np.float64)
    candidates = inside.size + outside.size
    guesses = tests(candidates)
    correct = correct_guesses(inside, outside, guesses)
    # Right half the time or less does not reject even perfect privacy's curve 1 - alpha,
    # above every f_s: skipping a test is sound, as it only rejects less.
    useful = 2 * correct > guesses
    guesses, correct = guesses[useful], correct[useful]
    level = significance / tests(candidates).size  # Bonferroni over the fixed tests

    def rejected(noise: float) -> bool:
        inverse = blow_up_inverse(*trade_off_lines(rounds, rate, noise))
        return any(rejects(inverse, candidates, int(j), int(c), level)
                   for j, c in zip(guesses, correct, strict=True))

    return _smallest_rejected(rejected, noise_multiplier / SEARCH_BELOW, noise_multiplier,
                              noise_multiplier * SEARCH_ABOVE)


def _smallest_rejected(rejected: Callable[[float], bool], low: float, start: float,
                       high: float) -> float | None:
    """The smallest s in [`low`, `high`] with `rejected(s)`, to a relative
    `RELATIVE_TOLERANCE`, if `rejected` is monotone in s (false below some s, true from
    it): doubling or halving s from `start`, then bisecting. Always one that was rejected
    (sound either way: (4) in the module docstring); None if `high` is not; `low` if it
    is."""
    if rejected(start):
        above = start
        while True:
            if above / 2 < low:
                return low if rejected(low) else _bisect(rejected, low, above)
            if not rejected(above / 2):
                return _bisect(rejected, above / 2, above)
            above /= 2
    below = start
    while True:
        if below * 2 > high:
            return _bisect(rejected, below, high) if rejected(high) else None
        if rejected(below * 2):
            return _bisect(rejected, below, below * 2)
        below *= 2


def _bisect(rejected: Callable[[float], bool], below: float, above: float) -> float:
    """Bisection (in log s) between `below` (not rejected) and `above` (rejected): the
    upper end, once within `RELATIVE_TOLERANCE` of the lower."""
    while above / below > 1 + RELATIVE_TOLERANCE:
        middle = float(np.sqrt(above * below))
        if rejected(middle):
            above = middle
        else:
            below = middle
    return above
