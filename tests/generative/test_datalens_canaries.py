"""Tests for dpfed.generative.datalens.canaries: canary teachers in DataLens's vote space,
and DataLens audit runs (in process; the binary's are in tests/experiments)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.generative import datalens
from dpfed.generative.datalens import canaries
from dpfed.privacy import add_gaussian_noise, audit
from dpfed.train import seeds
from tests.generative.test_datalens import TINY

TOPAGG = datalens.TopAgg(k=6, b=1e-3, sigma=30.0, beta=0.3)
SHAPE = (4, 64)  # a step's vote sum: B = 4 samples of D = 64 pixels
SCOPES = {"batch": 1, "sample": 4}  # the rows of a canary's direction in each scope


def _candidates(inserted) -> canaries.VoteCanaries:
    return canaries.VoteCanaries(jnp.asarray(np.asarray(inserted, bool)))


def _dense(directions: audit.Canaries) -> np.ndarray:
    """[n, B*D]: the directions as dense vectors."""
    coords, values = np.asarray(directions.coords), np.asarray(directions.values)
    dense = np.zeros((coords.shape[0], math.prod(SHAPE)))
    np.add.at(dense, (np.arange(coords.shape[0])[:, None], coords), values)
    return dense


def _directions(key, count, rows):
    return canaries.directions(key, count, SHAPE, TOPAGG, rows)


@pytest.mark.parametrize("scope", SCOPES)
def test_without_noise_a_score_is_the_inserted_canaries_overlap_one_for_itself(scope):
    rows = SCOPES[scope]
    coins = np.arange(40) % 3 == 0
    directions = _directions(jax.random.key(0), 40, rows)
    summed = canaries.insert(_candidates(coins), directions, jnp.zeros(SHAPE), TOPAGG, rows)
    sums = canaries.observe(audit.RoundScores.zeros(40), directions, summed, TOPAGG, rows)
    gram = _dense(directions) @ _dense(directions).T
    np.testing.assert_allclose(np.diag(gram), 1.0, rtol=1e-6,
                               err_msg="a direction must be a unit vector")
    np.testing.assert_allclose(
        np.asarray(sums.sum), gram @ coins, atol=1e-5,
        err_msg=f"{scope} scope, no noise: each candidate's s must be its overlap with the "
                "inserted canaries (1 with itself, an inserted one's; held-out ones add 0)")


@pytest.mark.parametrize("scope", SCOPES)
def test_with_one_canary_inserted_its_score_is_one_and_the_others_their_overlap(scope):
    rows = SCOPES[scope]
    directions = _directions(jax.random.key(1), 2, rows)
    summed = canaries.insert(_candidates([True, False]), directions, jnp.zeros(SHAPE), TOPAGG,
                             rows)
    scores = canaries.observe(audit.RoundScores.zeros(2), directions, summed, TOPAGG, rows).sum
    overlap = float(_dense(directions)[0] @ _dense(directions)[1])
    assert float(scores[0]) == pytest.approx(1.0, abs=1e-6), (
        f"{scope}: an inserted canary in a zero sum without noise must score exactly 1")
    assert float(scores[1]) == pytest.approx(overlap, abs=1e-6), (
        f"{scope}: a held-out canary must see only its overlap with the inserted one")


def test_held_out_canaries_are_never_added():
    directions = _directions(jax.random.key(2), 30, 1)
    vote_sum = jax.random.normal(jax.random.key(3), SHAPE)
    summed = canaries.insert(_candidates(np.zeros(30)), directions, vote_sum, TOPAGG, 1)
    np.testing.assert_array_equal(np.asarray(summed), np.asarray(vote_sum),
                                  err_msg="candidates held out must leave the vote sum as it is")


@pytest.mark.parametrize("scope", SCOPES)
def test_each_aggregation_a_canary_moves_moves_by_the_sensitivity(scope):
    # A legal vote difference of one teacher: +-2 on k coordinates of each aggregation
    # (sample scope: each of the B rows; batch scope: the one flattened batch).
    rows = SCOPES[scope]
    directions = _directions(jax.random.key(4), 1, rows)
    added = np.asarray(canaries.insert(_candidates([True]), directions, jnp.zeros(SHAPE),
                                       TOPAGG, rows)).reshape(rows, -1)
    for row in added:
        assert np.count_nonzero(row) == TOPAGG.k, f"{scope}: k coordinates per aggregation"
        np.testing.assert_allclose(np.abs(row[row != 0]), 2.0, rtol=1e-6,
                                   err_msg=f"{scope}: a canary's vote difference is +-2")
        assert np.linalg.norm(row) == pytest.approx(TOPAGG.sensitivity, rel=1e-6), (
            f"{scope}: each aggregation's change must have norm exactly sqrt(4k)")


def _noised_steps(audited, steps, rows):
    """The all-rounds sums of `steps` steps whose vote sum is zero but for the canaries,
    noised by TOPAGG (the mechanism's noise)."""
    key = jax.random.key(5)

    def step(sums, t):
        step_key = jax.random.fold_in(key, t)
        directions = _directions(jax.random.fold_in(step_key, audit.STEP_KEY),
                                 audited.candidates, rows)
        summed = canaries.insert(audited, directions, jnp.zeros(SHAPE), TOPAGG, rows)
        noisy = TOPAGG.privatize(summed, step_key)
        return canaries.observe(sums, directions, noisy, TOPAGG, rows), None

    sums, _ = jax.jit(lambda: jax.lax.scan(
        step, audit.RoundScores.zeros(audited.candidates), jnp.arange(steps)))()
    return sums


@pytest.mark.parametrize("scope", SCOPES)
def test_with_the_mechanisms_noise_the_held_out_scores_read_its_multiplier(scope):
    # 100 held-out of 200 candidates x 400 steps: the std's relative error ~0.4%; the
    # shift's standard error z sqrt(2 / 100) / sqrt(400), 0.043 in batch scope.
    rows = SCOPES[scope]
    audited = _candidates(np.arange(200) < 100)
    figures = canaries.all_steps_audit(
        _noised_steps(audited, 400, rows), audited, 400, TOPAGG, rows)(1e-5)
    expected = TOPAGG.noise_multiplier / math.sqrt(rows)
    assert figures["noise_multiplier"] == pytest.approx(expected), (
        f"{scope}: a step's score carries noise z / sqrt(rows)")
    assert figures["noise_std"] == pytest.approx(expected, rel=0.03), (
        f"{scope}: the held-out scores' std {figures['noise_std']} must be the mechanism's "
        f"z / sqrt(rows) = {expected}")
    assert figures["shift"] == pytest.approx(1.0, abs=0.2), (
        f"{scope}: an inserted canary must move its score by 1 a step, got {figures['shift']}")
    assert figures["rounds"] == 400 and figures["rate"] == 1.0, "every step, every canary"


# One inserted of four tells the inserted count from the held-out one (2 of 4 does not).
@pytest.mark.parametrize("coins, ordered", [
    ([False, True, False, True], [1.0, 3.0, 0.0, 2.0]),
    ([False, True, False, False], [1.0, 0.0, 2.0, 3.0]),
])
def test_all_steps_audit_puts_the_inserted_candidates_first_and_counts_them(
    monkeypatch, coins, ordered
):
    sums = audit.RoundScores(*(jnp.arange(4.0) for _ in range(3)))
    captured = {}

    def all_rounds(ordered, inserted, *_):
        captured.update(ordered=np.asarray(ordered.sum), inserted=inserted)

    monkeypatch.setattr(audit, "all_rounds", all_rounds)
    canaries.all_steps_audit(sums, _candidates(np.array(coins)), 3, TOPAGG, 1)(1e-5)
    np.testing.assert_array_equal(captured["ordered"], ordered,
                                  err_msg="audit.all_rounds reads the inserted first")
    assert captured["inserted"] == sum(coins), (
        f"audit.all_rounds must get the inserted count ({sum(coins)}), not "
        f"{captured['inserted']}: the first `inserted` ordered scores are read as theirs")


def test_a_canary_has_a_row_per_aggregation_of_its_scope():
    # The sample scope aggregates each of the B samples apart: its canaries have B rows
    # (weight 2 sqrt(kB), score noise z / sqrt(B)); the batch scope aggregates once.
    assert canaries.rows("sample", 4) == 4, "vote_scope 'sample': one row per sample"
    assert canaries.rows("batch", 4) == 1, "vote_scope 'batch': one aggregation a step"
    assert canaries.noise_multiplier(TOPAGG, canaries.rows("sample", 4)) == pytest.approx(
        TOPAGG.noise_multiplier / 2), "B = 4 Gaussians of z observed together: z / sqrt(4)"


def test_the_candidates_come_from_the_seed():
    first, again, other = (canaries.draw(50, seed) for seed in (3, 3, 4))
    assert first is not None and again is not None and other is not None
    np.testing.assert_array_equal(np.asarray(first.inserted), np.asarray(again.inserted),
                                  err_msg="a resumed run must insert the same candidates")
    assert not np.array_equal(np.asarray(first.inserted), np.asarray(other.inserted)), (
        "another seed drew the same coins: they must come from the run's seed")
    assert first.candidates == 100 and sum(first.counts) == 100, "2K candidates for K = 50"
    assert canaries.draw(0, 3) is None, "audit_canaries=0: no audit"


def test_the_candidates_coins_come_from_the_audit_stream_of_the_seed():
    # The trainers' rule (`canary_audit.draw_canaries`): another stream of the root key
    # (the released samples', the initial generator's) would reuse draws made for them.
    coins = audit.fair_coins(seeds.stream_key(3, seeds.AUDIT_STREAM), 50)
    np.testing.assert_array_equal(
        np.asarray(canaries.draw(50, 3).inserted), np.asarray(coins),
        err_msg="the coins must be audit.fair_coins of the seed's AUDIT_STREAM")


# In-process runs on TINY (tests/generative/test_datalens.py; 8 CPU devices).
def _lens(config):
    digits = datalens.training.data_lib.load(config.dataset, "train")
    return datalens.training.build(config, digits.num_classes, digits.image_shape)


def test_a_run_without_an_audit_keeps_its_state_and_checkpoint_keys():
    lens = _lens(TINY)
    assert set(lens.init(jax.random.key(0))) == {"teachers", "generator", "step"}, (
        "a run without an audit must checkpoint what it did before the audit existed")
    assert "audit" in lens.init(jax.random.key(0), 40), "an audit run keeps its sums"


@pytest.mark.parametrize("scope", SCOPES)
def test_an_audit_step_with_every_candidate_held_out_is_the_step_without_an_audit(scope):
    # Same vote sum, same noise key: the canaries change nothing but what they add.
    config = dataclasses.replace(TINY, vote_scope=scope)
    lens = _lens(config)
    ids = lens.ensemble.teacher_ids()
    plain, _ = lens.generator_step(lens.init(jax.random.key(0)), ids, jax.random.key(1))
    audited, _ = lens.generator_step(lens.init(jax.random.key(0), 20), ids, jax.random.key(1),
                                     _candidates(np.zeros(20)))
    for got, want in zip(jax.tree.leaves(audited["generator"]),
                         jax.tree.leaves(plain["generator"]), strict=True):
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(want),
            err_msg=f"{scope}: an audit step must noise the same vote sum with the same key")


def _train(tmp_path, name, **changes):
    config = dataclasses.replace(TINY, **changes)
    return datalens.train(config, str(tmp_path / name), log=lambda _: None), tmp_path / name


def test_an_audit_run_resumed_midway_writes_the_uninterrupted_runs_audit(tmp_path):
    whole, whole_dir = _train(tmp_path, "whole", audit_canaries=20)
    _train(tmp_path, "resumed", audit_canaries=20, steps=2)  # checkpoint at step 2
    _, resumed_dir = _train(tmp_path, "resumed", audit_canaries=20)
    written = (whole_dir / "audit.json").read_bytes()
    assert (resumed_dir / "audit.json").read_bytes() == written, (
        "the all-rounds sums are checkpointed: a resumed run must give the same audit.json")
    figures = json.loads(written)
    assert whole["audit"] == figures and figures["all_rounds"]["rounds"] == TINY.steps, (
        "summary.json's audit is audit.json's, over every step")
    assert "canary audit" in (whole_dir / "report.md").read_text(), "report.md says so"


def test_an_under_noised_datalens_is_caught_by_its_audit(tmp_path, monkeypatch):
    # TopAgg noising with a fifth of the sigma its ledger records: 8 batch-scope steps,
    # 400 candidates. Measured at this seed: f-DP bound 2.72 against the ledger's PLD eps
    # 1.82 (noise std 1.59 against the recorded 6.12); at sigma 30 the run's bounds are 0.
    def under_noised(self, vote_sum, key):
        return add_gaussian_noise(vote_sum, key, self.sigma / 5)

    monkeypatch.setattr(datalens.TopAgg, "privatize", under_noised)
    # A DataLens of its own: the cached one (`training.build`) keeps the right noise.
    monkeypatch.setattr(datalens.training, "build", lambda config, classes, shape: (
        datalens.DataLens(config, classes, shape)))
    summary, _ = _train(tmp_path, "under", vote_scope="batch", steps=8, audit_canaries=200,
                        eval_every=8, checkpoint_every=8)
    figures = summary["audit"]["all_rounds"]
    ledger_epsilon = summary["audit"]["ledger_epsilon_pld"]
    assert figures["epsilon_lower_bound_fdp"] > 1.2 * ledger_epsilon, (
        f"sigma / 5: the f-DP bound {figures['epsilon_lower_bound_fdp']:.3f} must prove the "
        f"run spends more than the ledger's PLD eps {ledger_epsilon:.3f}")
    assert figures["noise_std"] < figures["noise_multiplier"] / 3, (
        f"sigma / 5: the noise std {figures['noise_std']:.3f} must read far below the "
        f"ledger's multiplier {figures['noise_multiplier']:.3f}")
