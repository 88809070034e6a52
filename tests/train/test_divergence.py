"""Divergence: NaN or inf in a run's parameters or in a loss it logs is told to the user."""

import math

import jax.numpy as jnp
import numpy as np

from dpfed.train import divergence


def test_all_finite_looks_at_every_float_leaf_and_ignores_integers():
    tree = {"w": jnp.ones((2, 3)), "b": np.zeros(3, np.float32), "step": jnp.int32(7)}
    assert divergence.all_finite(tree), "finite floats and an int counter"
    for bad in (math.nan, math.inf, -math.inf):
        broken = {**tree, "b": np.array([0.0, bad, 0.0], np.float32)}
        assert not divergence.all_finite(broken), f"one {bad} in one leaf must be found"
    assert divergence.all_finite({}), "no leaves: nothing diverged"


def test_only_figures_named_loss_count_as_diverged_losses():
    record = {"step": 3, "test_loss": math.nan, "generator_loss": np.float32(math.inf),
              "sample_oov_rate": math.nan, "epsilon_rdp": None, "train_loss": 0.5}
    assert divergence.nonfinite_losses(record) == ["generator_loss", "test_loss"], (
        "a NaN rate of an empty sample (fedlm) is no divergence; None is no figure")


def test_a_figure_is_a_loss_only_when_its_name_ends_in_loss():
    # "...loss" is the rule (a weight or a count of a loss is no loss): a NaN there is no
    # divergence of the model.
    record = {"loss_weight": math.nan, "lossless_rate": math.inf, "test_loss": 0.5}
    assert divergence.nonfinite_losses(record) == [], (
        "only figures whose name ends in 'loss' are losses")


def test_diverged_is_a_nonfinite_loss_or_nonfinite_params():
    finite = {"w": jnp.ones(2)}
    assert not divergence.diverged(finite, {"test_loss": 0.3})
    assert divergence.diverged(finite, {"test_loss": math.inf}), "overflowing logits"
    assert divergence.diverged({"w": jnp.array([1.0, math.nan])}, {}), "NaN params"


def test_the_watch_warns_once_naming_the_first_failing_step():
    messages = []
    watch = divergence.DivergenceWatch("round", messages.append)
    watch.check({"w": jnp.ones(2)}, {"test_loss": 0.1}, 2)
    watch.check({"w": jnp.ones(2)}, {"test_loss": math.nan}, 4)
    watch.check({"w": jnp.full(2, math.nan)}, {"test_loss": math.nan}, 6)
    assert watch.diverged_at == 4, watch.diverged_at
    assert len(messages) == 1 and "test_loss after round 4" in messages[0], messages
    assert "diverged" in messages[0], messages


def test_the_report_line_appears_for_a_diverged_model_only():
    assert divergence.report_line({"diverged": False}) == ""
    assert divergence.report_line({}) == "", "a summary of an older run"
    assert "diverged" in divergence.report_line({"diverged": True})


def test_the_warning_names_the_run_it_comes_from():
    messages = []
    divergence.DivergenceWatch("round", messages.append, label="fedgan[low]").check(
        {"w": jnp.full(2, math.nan)}, {}, 3)
    assert messages[0].startswith("[fedgan[low]] warning: NaN or inf in the parameters"), messages
