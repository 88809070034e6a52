"""Tests for dpfed.eval.fid: the Fréchet distance and its batching."""

import numpy as np
import pytest

from dpfed.eval import fid


def _gaussian(n=2000, d=6, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def _distance(a, b):
    return fid.frechet_distance(fid.feature_statistics(a), fid.feature_statistics(b))


def test_distance_to_itself_is_zero():
    x = _gaussian()
    assert _distance(x, x) == pytest.approx(0.0, abs=1e-8), "FID(x, x) should be ~0"


def test_distance_grows_with_a_known_shift():
    x = _gaussian()
    distances = [_distance(x, x + shift) for shift in (0.5, 1.0, 2.0)]
    expected = [6 * 0.25, 6 * 1.0, 6 * 4.0]  # ||shift * ones(6)||^2; covariances are equal
    np.testing.assert_allclose(
        distances, expected, rtol=1e-6, err_msg="a mean shift s should add ||s||^2 to FID"
    )


def test_distance_is_symmetric():
    x, y = _gaussian(seed=0), _gaussian(seed=1, shift=0.3) * 1.5
    assert _distance(x, y) == pytest.approx(_distance(y, x), rel=1e-9), "FID is not symmetric"


def test_matches_closed_form_for_diagonal_covariances():
    a = fid.FeatureStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]), 10)
    b = fid.FeatureStats(np.ones(3), np.diag([4.0, 1.0, 1.0]), 10)
    # ||mu1 - mu2||^2 + sum_i (sqrt a_i - sqrt b_i)^2
    expected = 3.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert fid.frechet_distance(a, b) == pytest.approx(expected), "diagonal closed form differs"


def test_is_finite_when_features_outnumber_samples():
    x, y = _gaussian(n=20, d=64, seed=0), _gaussian(n=20, d=64, seed=1)
    distance = _distance(x, y)
    assert np.isfinite(distance) and distance >= 0, f"singular covariances gave {distance}"


def test_extract_features_pads_the_last_batch():
    calls = []

    def features(images):
        calls.append(images.shape[0])
        return images.reshape(len(images), -1)[:, :3]

    extractor = fid.FeatureExtractor("fid_test", "flattened pixels", features)
    images = np.random.default_rng(0).uniform(size=(7, 2, 2, 1)).astype(np.float32)
    out = fid.extract_features(extractor, images, batch_size=3)
    np.testing.assert_allclose(out, images.reshape(7, -1)[:, :3], err_msg="features reordered")
    assert set(calls) == {3}, f"batches of one shape (one compilation) expected, got {calls}"


def test_extract_features_defaults_to_the_extractors_batch_size():
    # Inception at 299x299 took ~12 GB in one batch of 359 images and 2.2 GB in batches of
    # 50 (WORKSPACE.md, "Evaluation"): the extractor, not the caller, knows its memory.
    calls = []

    def features(images):
        calls.append(images.shape[0])
        return images.reshape(len(images), -1)[:, :3]

    extractor = fid.FeatureExtractor("fid_test", "flattened pixels", features, batch_size=4)
    images = np.random.default_rng(0).uniform(size=(10, 2, 2, 1)).astype(np.float32)
    fid.fid(extractor, images, images[:6])
    assert set(calls) == {4}, f"fid must feed the extractor its own batch of 4, got {calls}"


def test_feature_statistics_needs_two_examples():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(np.zeros((1, 4)))


def test_feature_statistics_uses_the_unbiased_covariance():
    stats = fid.feature_statistics(np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_allclose(
        stats.cov, [[2.0, 2.0], [2.0, 2.0]], err_msg="the covariance must divide by N - 1"
    )


def test_fewer_samples_give_a_larger_fid_of_one_distribution():
    # What sample_size_note warns of: two samples of one Gaussian are at FID ~0 only when
    # large; the estimate of small ones is biased upward.
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6)) / np.sqrt(6)

    def mean_fid(n):
        return np.mean([_distance(rng.normal(size=(n, 6)) @ mixing,
                                  rng.normal(size=(n, 6)) @ mixing) for _ in range(5)])

    small, large = mean_fid(20), mean_fid(2000)
    assert small > 10 * large, f"FID of 20 vs 20: {small}; of 2000 vs 2000: {large}"


@pytest.mark.parametrize(
    "sizes,noted", [((20, 1000), True), ((10_000, 9_999), True), ((10_000, 50_000), False)])
def test_sample_size_note_names_both_sizes_below_papers_sizes(sizes, noted):
    note = fid.sample_size_note(*sizes)
    if not noted:
        assert note is None, f"{sizes}: both at papers' sizes need no note: {note}"
        return
    assert f"{sizes[0]:,} synthetic against {sizes[1]:,} real" in note, note
    assert "compare it only with FIDs of the same sizes" in note, note


@pytest.mark.parametrize("images,message", [
    (np.zeros((0, 4, 4, 1), np.float32), r"\[N > 0, H, W, C\]"),
    (np.zeros((5, 4, 4), np.float32), r"\[N > 0, H, W, C\]"),
    (np.linspace(-1, 1, 80, dtype=np.float32).reshape(5, 4, 4, 1), r"in \[0, 1\].*-1"),
    (np.linspace(0, 255, 80, dtype=np.float32).reshape(5, 4, 4, 1), r"in \[0, 1\].*255"),
    (np.full((5, 4, 4, 1), np.nan, np.float32), "finite"),
])
def test_images_a_feature_extractor_cannot_take_are_rejected(images, message):
    # A [-1, 1] (tanh) or 0..255 set gave a finite, wrong FID; an empty one a bare
    # "range() arg 3 must not be zero".
    extractor = fid.FeatureExtractor("fid_test", "flattened pixels",
                                     lambda x: x.reshape(len(x), -1)[:, :3])
    real = np.random.default_rng(0).uniform(size=(5, 4, 4, 1)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        fid.fid(extractor, real, images)
