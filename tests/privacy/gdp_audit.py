"""Empirical privacy audit helpers: how distinguishable two sets of releases are.

The idea of Jagielski et al. 2020 and Nasr et al. 2021 (auditing DP with canaries): run a
mechanism many times on two neighbouring inputs, reduce each release to a scalar
statistic, and compare how far apart the two distributions are with what the ledger
claims. For Gaussian mechanisms the natural yardstick is Gaussian DP (Dong, Roth, Su
2019): a Gaussian event of noise multiplier z is mu-GDP with mu = 1/z, and a linear
statistic of its release is normal with the same std on both sides, so
mu_hat = |mean_in - mean_out| / pooled std estimates mu.

`epsilon_lower_bound` is the classic audit: a threshold test on the statistic whose
false positive and negative rates, bounded with Clopper-Pearson intervals, give a
lower bound on eps at delta that holds with the stated confidence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from dp_accounting import dp_event
from scipy import stats


class MuEstimate(NamedTuple):
    """A Gaussian-DP parameter estimate and its normal-approximation confidence interval."""

    mu: float
    low: float
    high: float


def gdp_mu(s_in: np.ndarray, s_out: np.ndarray, confidence: float = 0.95) -> MuEstimate:
    """mu_hat = |mean_in - mean_out| / pooled std of two samples of a scalar statistic.

    The interval uses the large-sample standard error of a standardised mean difference,
    sqrt(1/n_in + 1/n_out + mu^2 / (2 (n_in + n_out))).
    """
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    n_in, n_out = len(s_in), len(s_out)
    pooled = ((n_in - 1) * s_in.var(ddof=1) + (n_out - 1) * s_out.var(ddof=1)) / (
        n_in + n_out - 2)
    mu = abs(s_in.mean() - s_out.mean()) / math.sqrt(pooled)
    se = math.sqrt(1 / n_in + 1 / n_out + mu**2 / (2 * (n_in + n_out)))
    z = stats.norm.ppf(0.5 + confidence / 2)
    return MuEstimate(mu, max(mu - z * se, 0.0), mu + z * se)


def best_linear_statistic(x_in: np.ndarray, x_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projections of [n, k] feature samples on Fisher's direction Sigma^-1 (m_in - m_out).

    For normal features of a common covariance this is the most powerful linear test;
    its standardised mean difference is the Mahalanobis distance. With k features
    fitted on n draws per side, the fit inflates mu_hat^2 by about 2k / n (negligible for
    k <= 3 and n >= 1,000).
    """
    x_in, x_out = np.asarray(x_in, np.float64), np.asarray(x_out, np.float64)
    cov = 0.5 * (np.cov(x_in, rowvar=False) + np.cov(x_out, rowvar=False))
    w = np.linalg.solve(np.atleast_2d(cov), x_in.mean(0) - x_out.mean(0))
    return x_in @ w, x_out @ w


def ledger_mu(event: dp_event.DpEvent) -> float:
    """mu of an unsampled event of Gaussians: 1/z, or sqrt(sum_i z_i^-2) for a composition
    (a composition of Gaussian mechanisms is Gaussian DP with those mu's in quadrature)."""
    if isinstance(event, dp_event.GaussianDpEvent):
        return math.inf if event.noise_multiplier == 0 else 1 / event.noise_multiplier
    if isinstance(event, dp_event.ComposedDpEvent):
        return math.sqrt(sum(ledger_mu(e) ** 2 for e in event.events))
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return math.sqrt(event.count) * ledger_mu(event.event)
    raise ValueError(f"not a (composition of) Gaussian event(s): {event}")


def epsilon_lower_bound(
    s_in: np.ndarray, s_out: np.ndarray, delta: float, confidence: float = 0.95
) -> float:
    """A lower bound on eps at `delta`, valid with probability `confidence`.

    The threshold test "statistic > t" (and "< t") is chosen on the first half of each
    sample (a sweep over its quantiles, for the largest point estimate of eps); its true
    and false positive rates are then counted on the second half and bounded with
    Clopper-Pearson intervals of level 1 - (1 - confidence) / 2 each, so choosing the
    threshold costs no confidence. eps >= log((TPR_low - delta) / FPR_high); 0 when no
    test beats delta, or when the chosen test does worse on the second halves than chance.
    """
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    h_in, h_out = len(s_in) // 2, len(s_out) // 2
    fit_in, test_in = s_in[:h_in], s_in[h_in:]
    fit_out, test_out = s_out[:h_out], s_out[h_out:]
    alpha = (1 - confidence) / 2
    # Choose the test (its direction: the canary may shift the statistic either way, and
    # its threshold) on the first halves only, then bound its rates once on the second.
    best_score, sign, t = -math.inf, 1.0, 0.0
    for s in (1.0, -1.0):
        a, b = s * fit_in, s * fit_out
        thresholds = np.quantile(np.concatenate([a, b]), np.linspace(0.0, 1.0, 201))
        tpr = (a[None] > thresholds[:, None]).mean(1)
        fpr = (b[None] > thresholds[:, None]).mean(1)
        with np.errstate(divide="ignore"):
            score = np.log(np.maximum(tpr - delta, 0.0)) - np.log(np.maximum(fpr, 0.5 / h_out))
        i = int(np.argmax(score))
        if score[i] > best_score:
            best_score, sign, t = score[i], s, thresholds[i]
    hits = int(np.sum(sign * test_in > t))
    false = int(np.sum(sign * test_out > t))
    tpr_low = stats.beta.ppf(alpha, hits, len(test_in) - hits + 1) if hits else 0.0
    fpr_high = (stats.beta.ppf(1 - alpha, false + 1, len(test_out) - false)
                if false < len(test_out) else 1.0)
    return max(math.log((tpr_low - delta) / fpr_high), 0.0) if tpr_low > delta else 0.0
