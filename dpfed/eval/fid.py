"""Fréchet distance between feature statistics of real and synthetic images.

FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") fits a Gaussian to each set's features and reports

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

The feature extractor is pluggable (`FeatureExtractor`); its ``metric_name`` names the
number (``fid_domain`` for the domain classifier of `dpfed.eval.domain_features`,
``fid_inception`` for Inception-v3), so a domain FID is never mistaken for the
Inception FID that papers report.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class FeatureStats(NamedTuple):
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of ``count`` feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    count: int  # type: ignore[assignment]  # shadows tuple.count: python/mypy#3950


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """Maps images float32 ``[N, H, W, C]`` in [0, 1] to features ``[N, D]``.

    Attributes:
      metric_name: what the resulting Fréchet distance is called (``fid_domain``, ...).
      description: one line saying which network and which data it was trained on.
      features: the batched feature function (jit-compiled by its maker).
      batch_size: the most images `features` takes at once (`extract_features`'
        default): its activations, not the image count, bound the memory a pass needs.
    """

    metric_name: str
    description: str
    features: Callable[[np.ndarray], np.ndarray]
    batch_size: int = 500


def feature_statistics(features: np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance of ``features`` ``[N, D]`` in float64 (needs N >= 2)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return FeatureStats(
        features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0]
    )


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    roots = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * roots) @ eigenvectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``tr((S1 S2)^1/2)``, computed stably as ``tr((S1^1/2 S2 S1^1/2)^1/2)``.

    ``S1^1/2 S2 S1^1/2`` is symmetric PSD and has the eigenvalues of ``S1 S2``, so an
    eigendecomposition gives the trace without the complex parts and the failures of a
    general ``sqrtm`` on a near-singular product (features outnumbering samples).
    """
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets (>= 0)."""
    if stats1.mean.shape != stats2.mean.shape:
        raise ValueError(f"feature sizes differ: {stats1.mean.shape} vs {stats2.mean.shape}")
    mean_term = float(np.sum((stats1.mean - stats2.mean) ** 2))
    trace_term = (
        np.trace(stats1.cov) + np.trace(stats2.cov) - 2 * trace_sqrt_product(stats1.cov, stats2.cov)
    )
    return max(mean_term + float(trace_term), 0.0)


def check_images(images: np.ndarray) -> None:
    """Raises ``ValueError`` unless ``images`` are what every `FeatureExtractor` takes:
    float ``[N > 0, H, W, C]`` with finite values in [0, 1]. An image set in [-1, 1] or
    0..255, or channels-first, would otherwise give a wrong Fréchet distance silently."""
    shape = np.shape(images)
    if len(shape) != 4 or shape[0] == 0:
        raise ValueError(f"images must be [N > 0, H, W, C], got shape {shape}")
    low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
        raise ValueError(f"images must be finite and in [0, 1], got values in [{low}, {high}]")


def extract_features(
    extractor: FeatureExtractor, images: np.ndarray, batch_size: int | None = None
) -> np.ndarray:
    """``extractor``'s features of ``images`` in batches of ``batch_size`` (default: the
    extractor's own, `FeatureExtractor.batch_size`), float64.

    The last batch is padded to ``batch_size`` (and the padding dropped), so a jitted
    extractor compiles once.

    Raises:
      ValueError: if ``images`` break `check_images`.
    """
    check_images(images)
    batch_size = min(extractor.batch_size if batch_size is None else batch_size, len(images))
    batches = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        padding = [(0, batch_size - len(batch))] + [(0, 0)] * (batch.ndim - 1)
        features = extractor.features(np.pad(batch, padding))
        batches.append(np.asarray(features, np.float64)[: len(batch)])
    return np.concatenate(batches)


def fid(
    extractor: FeatureExtractor,
    real_images: np.ndarray,
    synthetic_images: np.ndarray,
    batch_size: int | None = None,
) -> float:
    """The Fréchet distance between ``extractor``'s features of the two image sets."""
    real = feature_statistics(extract_features(extractor, real_images, batch_size))
    synthetic = feature_statistics(extract_features(extractor, synthetic_images, batch_size))
    return frechet_distance(real, synthetic)


# Papers' FIDs use at least this many images a side (Heusel et al. used 50,000).
PAPER_SAMPLE_SIZE = 10_000


def sample_size_note(num_synthetic: int, num_real: int) -> str | None:
    """The caveat for an FID of `num_synthetic` against `num_real` images, or None when
    both reach `PAPER_SAMPLE_SIZE`.

    FID's estimate is biased upward, more the fewer the images (Chong and Forsyth, 2020,
    "Effectively Unbiased FID and Inception Score and where to find them"); with fewer
    images than features the covariance is singular too. An FID of few images is only
    comparable with FIDs of as many images.
    """
    if min(num_synthetic, num_real) >= PAPER_SAMPLE_SIZE:
        return None
    return (f"FID of {num_synthetic:,} synthetic against {num_real:,} real images: FID is "
            "biased upward at small sample sizes, so compare it only with FIDs of the same "
            f"sizes (papers use {PAPER_SAMPLE_SIZE:,} or more)")
