"""Tests for dpfed.train.canary_audit: a trainer's canaries and its audit.json."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.privacy import audit
from dpfed.train import canary_audit, seeds
from dpfed.train.workdir import AUDIT_FILE, Workdir

_PARAMS = {"w": jnp.zeros((40, 30)), "b": jnp.zeros((30,))}
_LEDGER = {"delta": 1e-5, "epsilon_rdp": 4.7, "epsilon_pld": 4.4}


def _config(canaries, seed=3):
    return types.SimpleNamespace(audit_canaries=canaries, seed=seed)


def _canaries():
    return canary_audit.draw_canaries(_config(50), _PARAMS)


def test_no_canaries_without_an_audit():
    assert canary_audit.draw_canaries(_config(0), _PARAMS) is None, (
        "audit_canaries=0 must draw nothing: a run without an audit")


def test_canaries_come_from_the_seed():
    first, again, other = _canaries(), _canaries(), canary_audit.draw_canaries(
        _config(50, seed=4), _PARAMS)
    np.testing.assert_array_equal(
        first[0].coords, again[0].coords,
        err_msg="the same seed must draw the same inserted canaries (a resumed run scores "
                "the directions it inserted)")
    assert not np.array_equal(first[0].coords, other[0].coords), (
        "another seed drew the same canaries: they must come from the run's seed")
    assert first[0].num_directions + first[1].num_directions == 100, (
        "an audit of K = 50 draws 2K candidates, split into inserted and held-out")


def test_canaries_come_from_the_audit_stream_of_the_seed():
    # Drawn from another stream (the initial model's, or the released samples'), the
    # directions and coins would be draws the run also makes, or shows, for another purpose.
    drawn = _canaries()
    expected = audit.draw_pair(seeds.stream_key(3, seeds.AUDIT_STREAM), _PARAMS, 50)
    for got, want, which in zip(drawn, expected, ("inserted", "held-out"), strict=True):
        np.testing.assert_array_equal(
            got.coords, want.coords,
            err_msg=f"the {which} canaries must be audit.draw_pair of the seed's AUDIT_STREAM")


def test_an_audit_run_writes_its_figures(tmp_path):
    wd = Workdir(tmp_path)
    canaries = _canaries()
    final = {"w": jnp.ones((40, 30)), "b": jnp.ones((30,))}
    figures = canary_audit.write_audit(wd, canaries, _PARAMS, final, _LEDGER, trained=True)
    expected = audit.audit_run(canaries, _PARAMS, final, _LEDGER)
    assert figures == expected, "the figures must be audit.audit_run's"
    written = json.loads((tmp_path / AUDIT_FILE).read_text())
    assert written["ledger_epsilon_rdp"] == pytest.approx(4.7), (
        "audit.json must hold the figures beside the ledger's eps")
    assert written["inserted"] == figures["inserted"], "audit.json must hold the figures"


def _family(rate):
    """Hand-made all-rounds figures, the callable that gives them and the deltas it got."""
    deltas = []
    family = {"rounds": 2, "rate": rate, "noise_multiplier": 1.0, "delta": 1e-5,
              "significance": 0.05, "shift": 1.0}

    def all_rounds(delta):
        deltas.append(delta)
        return family

    return family, all_rounds, deltas


def test_an_all_rounds_only_audit_writes_the_family_at_the_ledgers_delta(tmp_path):
    family, all_rounds, deltas = _family(1.0)
    figures = canary_audit.write_all_rounds_audit(Workdir(tmp_path), (21, 19), _LEDGER,
                                                  trained=True, all_rounds=all_rounds)
    assert deltas == [1e-5], "the all-rounds figures must be at the ledger's delta"
    written = json.loads((tmp_path / AUDIT_FILE).read_text())
    assert written == figures == audit.all_rounds_run(21, 19, _LEDGER, family), (
        "audit.json must hold audit.all_rounds_run's figures")
    untrained = tmp_path / "untrained"
    assert canary_audit.write_all_rounds_audit(Workdir(untrained), (21, 19), _LEDGER,
                                               trained=False, all_rounds=all_rounds) is None
    assert not (untrained / AUDIT_FILE).exists(), "a run that did not train audits nothing"


def test_an_all_rounds_audit_adds_its_figures_at_the_ledgers_delta(tmp_path):
    family, all_rounds, deltas = _family(0.5)
    canaries = _canaries()
    final = {"w": jnp.ones((40, 30)), "b": jnp.ones((30,))}
    figures = canary_audit.write_audit(Workdir(tmp_path), canaries, _PARAMS, final,
                                       _LEDGER, trained=True, all_rounds=all_rounds)
    assert deltas == [1e-5], "the all-rounds figures must be at the ledger's delta"
    written = json.loads((tmp_path / AUDIT_FILE).read_text())
    final_model = audit.family_lower_bound(family, audit.scores(canaries[0], _PARAMS, final),
                                           audit.scores(canaries[1], _PARAMS, final))
    assert written["all_rounds"] == {
        **family, "final_model_epsilon_lower_bound_fdp": final_model} == figures["all_rounds"], (
        "the all-rounds figures and the final model's f-DP bound in their family")
    assert written["inserted"] == figures["inserted"], "the final-model figures stay"


def test_the_all_rounds_figures_take_the_ledgers_delta_not_a_default(tmp_path):
    # Every ledger above has delta 1e-5, the usual default: a delta of 3e-6 tells the
    # ledger's from a constant.
    ledger = {**_LEDGER, "delta": 3e-6}
    _, all_rounds, deltas = _family(0.5)
    canary_audit.write_audit(Workdir(tmp_path / "a"), _canaries(), _PARAMS,
                             {"w": jnp.ones((40, 30)), "b": jnp.ones((30,))}, ledger,
                             trained=True, all_rounds=all_rounds)
    canary_audit.write_all_rounds_audit(Workdir(tmp_path / "b"), (21, 19), ledger,
                                        trained=True, all_rounds=all_rounds)
    assert deltas == [3e-6, 3e-6], f"the all-rounds figures must be at the ledger's delta: {deltas}"


@pytest.mark.parametrize(
    "canaries, ledger, trained, why",
    [
        (None, _LEDGER, True, "a run without canaries"),
        ("draw", None, True, "a non-private run (no ledger)"),
        ("draw", {**_LEDGER, "epsilon_rdp": None}, True, "privacy fields without an eps"),
        ("draw", _LEDGER, False, "a run that trained no round or step"),
    ],
)
def test_nothing_written_without_an_audit_to_make(tmp_path, canaries, ledger, trained, why):
    wd = Workdir(tmp_path)
    drawn = _canaries() if canaries == "draw" else None
    figures = canary_audit.write_audit(wd, drawn, _PARAMS, _PARAMS, ledger, trained=trained)
    assert figures is None, f"{why} has no audit figures"
    assert not (tmp_path / AUDIT_FILE).exists(), f"{why} must not write audit.json"


def test_engine_canaries_insert_the_first_set_and_observe_both():
    inserted, held_out = _canaries()
    assert canary_audit.engine_canaries((inserted, held_out)) == {
        "canaries": inserted, "held_out": held_out}, (
        "the engine must insert the inserted set and get the held-out one to observe")
    assert canary_audit.engine_canaries(None) == {"canaries": None, "held_out": None}, (
        "a run without an audit gives the engine no canaries")
