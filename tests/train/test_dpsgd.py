"""Tests of the DP-SGD trainer library (dpfed.train.dpsgd)."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event

from dpfed import models, privacy
from dpfed.privacy import audit
from dpfed.train import dpsgd
from dpfed.train.config import ConfigError
from dpfed.train.workdir import EVAL_BEGIN, EVAL_END, Workdir
from tests import delta_warning, dispatch, other_data
from tests.killed import (
    KilledAtRelease,
    assert_ledger_json_covers_metrics,
    kill_after_metrics_record,
)


def _tiny(n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(size=(n, 4, 4, 1)) * 20, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
    model = models.get_classifier("logreg", 3)
    params = model.init(jax.random.key(0), images[:1])
    return model, params, images, labels


def _state(params, optimizer):
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}


def _expected_update(model, params, images, labels, indices, clip, denominator, lr):
    loss = dpsgd.example_loss(model)
    batch = (images[indices], labels[indices])
    summed = privacy.clipped_grad_sum(loss, params, batch, jnp.ones(len(indices)), clip)
    return jax.tree_util.tree_map(lambda p, g: p - lr * g / denominator, params, summed.grad_sum)


@pytest.mark.parametrize("delta,warns", [(1 / 1438, True), (1e-5, False)])
def test_a_delta_of_at_least_one_over_n_is_warned_about(
    tmp_path, monkeypatch, caplog, delta, warns
):
    # delta >= 1/N admits a mechanism that releases one of the N records in the clear.
    monkeypatch.setattr(dpsgd.models, "get_classifier", delta_warning.stop)  # after the check
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=1, batch_size=16,
                               delta=delta)  # digits: N = 1438 training examples
    delta_warning.assert_warns_of_delta(
        caplog, lambda: dpsgd.train(config, tmp_path, log=lambda _: None), delta, warns,
        1438, "example")


@pytest.mark.parametrize("learning_rate,diverges", [(1e38, True), (0.5, False)])
def test_a_diverging_run_warns_once_and_says_so_in_its_summary_and_report(
        tmp_path, learning_rate, diverges):
    # lr 1e38 overflows the logistic regression's loss to inf by step 2; it goes on.
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=4, batch_size=16,
                               learning_rate=learning_rate, noise_multiplier=1.0, eval_every=2,
                               checkpoint_every=4)
    messages = []
    summary = dpsgd.train(config, tmp_path, log=messages.append)
    warnings = [m for m in messages if "diverged" in m]
    assert summary["diverged"] is diverges, f"lr {learning_rate}: {summary['test_loss']}"
    assert len(warnings) == int(diverges), f"one warning at the first sign: {messages}"
    assert summary["steps"] == 4, "a diverged run still runs the steps its flags ask for"
    report = (tmp_path / "report.md").read_text()
    assert ("the model diverged" in report) is diverges, report
    messages.clear()
    dpsgd.train(config, tmp_path, log=messages.append)  # a finished run, rerun
    rewarned = [m for m in messages if "diverged" in m]
    assert len(rewarned) == int(diverges), f"the rerun must say it again: {messages}"


def test_a_finished_run_rerun_keeps_its_evaluation_and_one_trained_on_drops_it(tmp_path):
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=2, batch_size=16,
                               noise_multiplier=1.0, eval_every=2, checkpoint_every=2)
    dpsgd.train(config, tmp_path, log=lambda _: None)
    section = f"{EVAL_BEGIN}\n## Evaluation\nlogreg 90%\n{EVAL_END}\n"
    report = tmp_path / "report.md"
    report.write_text(report.read_text() + "\n" + section)  # as experiments.evaluate adds it
    dpsgd.train(config, tmp_path, log=lambda _: None)
    assert section in report.read_text(), "a rerun that trains nothing must keep the evaluation"
    dpsgd.train(dataclasses.replace(config, steps=4), tmp_path, log=lambda _: None)
    assert EVAL_BEGIN not in report.read_text(), "the evaluation of 2 steps is stale at 4"


def test_fixed_size_step_is_clipped_sum_over_batch_size():
    model, params, images, labels = _tiny()
    config = dpsgd.DpSgdConfig(batch_size=8, sampling="fixed", optimizer="sgd", learning_rate=0.1)
    opt = dpsgd.make_optimizer("sgd", 0.1)
    mech = privacy.GaussianSumMechanism(l2_clip=0.5, noise_multiplier=0.0)
    step = dpsgd.make_train_step(model, opt, config, 8, mech)
    new = step(_state(params, opt), images, labels, jax.random.key(3))
    expected = _expected_update(model, params, images, labels, np.arange(8), 0.5, 8.0, 0.1)
    for a, b in zip(
        jax.tree_util.tree_leaves(new["params"]), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg="step != clipped sum / B")


def test_fast_clipping_step_equals_the_vmap_step():
    model, params, images, labels = _tiny()
    opt = dpsgd.make_optimizer("sgd", 0.1)
    mech = privacy.GaussianSumMechanism(l2_clip=0.5, noise_multiplier=1.0)
    results = []
    for clipping in dpsgd.CLIPPINGS:
        config = dpsgd.DpSgdConfig(
            batch_size=4, optimizer="sgd", learning_rate=0.1, clipping=clipping
        )
        step = dpsgd.make_train_step(model, opt, config, 8, mech)
        results.append(step(_state(params, opt), images, labels, jax.random.key(5)))
    for a, b in zip(*(jax.tree_util.tree_leaves(r["params"]) for r in results), strict=True):
        np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6, err_msg="fast and vmap clipping must give one step"
        )


class _BatchCentred(nn.Module):
    """A classifier whose hidden units are centred on the batch: its examples mix."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(8)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(h - h.mean(0))


def test_fast_clipping_refuses_a_model_whose_examples_mix(tmp_path, monkeypatch):
    # One batched pass cannot give such a model's per-example norms: the run must stop
    # before its first step rather than clip by wrong norms.
    monkeypatch.setattr(dpsgd.models, "get_classifier", lambda _, k: _BatchCentred(k))
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=1, batch_size=16,
                               noise_multiplier=1.0, clipping="fast")
    with pytest.raises(ConfigError, match="loss moves with the values of other examples") as e:
        dpsgd.train(config, tmp_path, log=lambda _: None)
    assert e.value.field == "clipping", f"the error must name --clipping, got {e.value.field}"
    assert not (tmp_path / "ledger.json").exists(), "a refused run must release nothing"


def test_fast_clippings_check_reads_the_public_test_split_not_the_training_data(
        tmp_path, monkeypatch):
    # A refusal on the training records (a NaN one record causes) would be a release.
    seen = []
    monkeypatch.setattr(dpsgd, "check_fast_clipping_applies",
                        lambda model, params, images, labels, config: seen.append(images))
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=1, batch_size=16,
                               noise_multiplier=1.0, clipping="fast")
    dpsgd.train(config, tmp_path, log=lambda _: None)
    test_images = dpsgd.data_lib.load("digits", "test").images
    assert len(seen) == 1 and np.array_equal(seen[0], test_images), (
        "the check must run on the test split")


def test_a_fast_clipping_run_trains_and_records_every_step(tmp_path):
    config = dpsgd.DpSgdConfig(dataset="digits", model="cnn", steps=2, batch_size=16,
                               noise_multiplier=1.0, clipping="fast", eval_every=2)
    summary = dpsgd.train(config, tmp_path, log=lambda _: None)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert summary["steps"] == 2, f"fast clipping ran {summary['steps']} of 2 steps"
    assert sum(e["count"] for e in ledger["events"]) == 2, f"ledger: {ledger['events']}"


def _poisson_step(config, mechanism, clip, denominator, err_msg):
    """One Poisson step of 40 examples at E[B] = 10, under a key whose realised batch size
    differs from 10, against `_expected_update(clip, denominator(count))`."""
    model, params, images, labels = _tiny(n=40)
    # Example 0 fills the padding slots and _tiny's model fits it (gradient ~1e-7):
    # mislabelled, padding counted by mistake shows.
    labels = labels.at[0].set((labels[0] + 1) % 3)
    opt = dpsgd.make_optimizer("sgd", 0.1)
    step = dpsgd.make_train_step(model, opt, config, 40, mechanism)
    for seed in range(100):  # a key whose realised batch size differs from E[B] = 10
        key = jax.random.key(seed)
        indices, count = privacy.poisson_sample(jax.random.split(key)[0], 40, 10 / 40)
        if int(count) != 10:
            break
    new = step(_state(params, opt), images, labels, key)
    expected = _expected_update(
        model, params, images, labels, np.asarray(indices[: int(count)]), clip,
        denominator(int(count)), 0.1
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(new["params"]), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=err_msg(int(count)))


def test_poisson_step_divides_by_expected_not_realised_batch_size():
    config = dpsgd.DpSgdConfig(batch_size=10, optimizer="sgd", learning_rate=0.1)
    mech = privacy.GaussianSumMechanism(l2_clip=0.5, noise_multiplier=0.0)
    _poisson_step(config, mech, 0.5, lambda count: 10.0, lambda count: "must divide by E[B]=10")


@pytest.mark.parametrize("sampling, expected", [
    ("poisson", dp_event.PoissonSampledDpEvent(64 / 4000, dp_event.GaussianDpEvent(1.1))),
    # replace-one: a changed example moves the sum by 2C, so z counts half (as 1.1 / 2)
    ("fixed", dp_event.SampledWithoutReplacementDpEvent(
        4000, 64, dp_event.GaussianDpEvent(0.55))),
])
def test_step_event_samples_the_expected_batch_from_the_examples(sampling, expected):
    config = dpsgd.DpSgdConfig(batch_size=64, sampling=sampling)
    got = dpsgd.step_event(config, 1.1, 4000)
    assert got == expected, f"one step samples 64 of 4,000 examples at z 1.1: {got}"


def test_noise_in_step_has_std_z_clip_over_batch_size():
    model, params, images, labels = _tiny()
    config = dpsgd.DpSgdConfig(batch_size=8, sampling="fixed", optimizer="sgd", learning_rate=1.0)
    opt = dpsgd.make_optimizer("sgd", 1.0)
    quiet = dpsgd.make_train_step(model, opt, config, 8, privacy.GaussianSumMechanism(0.5, 0.0))
    noisy = dpsgd.make_train_step(model, opt, config, 8, privacy.GaussianSumMechanism(0.5, 2.0))
    diffs = []
    for i in range(20):
        key = jax.random.key(i)
        a = quiet(_state(params, opt), images, labels, key)["params"]
        b = noisy(_state(params, opt), images, labels, key)["params"]
        diffs.append(
            np.concatenate(
                [
                    np.ravel(x - y)
                    for x, y in zip(
                        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
                    )
                ]
            )
        )
    std = np.concatenate(diffs).std()
    assert abs(std / (2.0 * 0.5 / 8) - 1) < 0.05, f"noise std {std} is not z*C/B = 0.125"


def test_a_run_noises_with_the_z_and_clip_its_ledger_records(tmp_path, monkeypatch):
    # make_train_step and step_event are tested with the mechanism they are given; this is
    # what `train` gives them: the noise of its steps and its ledger's event at one z and C.
    built = {}

    class BuiltError(Exception):
        pass

    def resume_or_start(*args, event, **kwargs):
        built["event"] = event
        return real_resume(*args, event=event, **kwargs)

    def make_train_step(model, optimizer, config, n, mechanism, *canaries):
        built["mechanism"], built["n"] = mechanism, n
        raise BuiltError  # before the step is compiled: its arguments are what is tested

    real_resume = dpsgd.resume_or_start
    monkeypatch.setattr(dpsgd, "resume_or_start", resume_or_start)
    monkeypatch.setattr(dpsgd, "make_train_step", make_train_step)
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=1, batch_size=16,
                               noise_multiplier=1.3, l2_clip=0.7)
    with pytest.raises(BuiltError):
        dpsgd.train(config, tmp_path, log=lambda _: None)
    assert built["mechanism"] == privacy.GaussianSumMechanism(0.7, 1.3), (
        f"the steps must be noised at z 1.3, C 0.7: {built['mechanism']}")
    assert built["event"] == dpsgd.step_event(config, 1.3, built["n"]), (
        f"the ledger must record the steps' z 1.3: {built['event']}")


def test_config_rejects_bad_values_naming_the_field():
    for kwargs, field in [
        ({"l2_clip": -1.0}, "l2_clip"),
        ({"l2_clip": float("inf")}, "l2_clip"),  # clipped nothing, noise std inf
        ({"delta": 2.0}, "delta"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),  # no noise, eps inf: that is --nodp
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"eval_every": 0}, "eval_every"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"nodp": True, "noise_multiplier": 1.0}, "noise_multiplier"),  # ignored before
        ({"nodp": True, "target_epsilon": 1.0}, "target_epsilon"),  # ignored before
    ]:
        with pytest.raises(dpsgd.ConfigError) as info:
            dpsgd.DpSgdConfig(**kwargs)
        assert info.value.field == field, f"{kwargs} should be blamed on {field}"


def test_config_with_a_target_only_is_calibrated_not_run_at_the_default_noise():
    """A notebook's `DpSgdConfig(target_epsilon=...)` must calibrate z, as the binary does."""
    z = dpsgd.resolve_noise_multiplier(
        dpsgd.DpSgdConfig(target_epsilon=2.0, steps=50, batch_size=64), 4000)
    assert z != dpsgd.DEFAULT_NOISE_MULTIPLIER, "z must come from the target, not the default"
    assert dpsgd.resolve_noise_multiplier(dpsgd.DpSgdConfig(), 4000) == (
        dpsgd.DEFAULT_NOISE_MULTIPLIER), "without z or a target the default z applies"


def test_a_fixed_size_run_is_calibrated_under_replace_one():
    # Fixed-size batches are accounted under replace-one, as the ledger is; every other
    # calibrated run here samples Poisson. All 8 of 8 examples: closed-form RDP, no cost.
    config = dpsgd.DpSgdConfig(sampling="fixed", batch_size=8, steps=3, target_epsilon=2.0)
    z = dpsgd.resolve_noise_multiplier(config, 8)
    steps = dp_event.SelfComposedDpEvent(dpsgd.step_event(config, z, 8), 3)
    eps = privacy.epsilon(steps, config.delta, privacy.relation_for("fixed"))
    assert 0.99 * 2.0 <= eps <= 2.0, f"3 fixed-size steps at the calibrated z {z} cost eps {eps}"


def test_default_physical_batch_covers_three_sigma():
    assert dpsgd.default_physical_batch(256) >= 256 + 3 * 16
    assert dpsgd.default_physical_batch(256) % 8 == 0


_CALIBRATED = dpsgd.DpSgdConfig(
    dataset="digits", model="logreg", steps=10, batch_size=64, noise_multiplier=None,
    target_epsilon=1.0, eval_every=5, checkpoint_every=5)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """`_CALIBRATED` (10 steps at target eps 1) trained to its end: (config, workdir, its
    z). Shared: copy the workdir before writing to it."""
    workdir = tmp_path_factory.mktemp("calibrated")
    z = dpsgd.train(_CALIBRATED, workdir, log=lambda _: None)["noise_multiplier"]
    return _CALIBRATED, workdir, z


@pytest.mark.parametrize("new_target", [
    # slow: ~9 s; the same recalibration, the fast suite keeps the 2.0 case
    pytest.param(1.2, marks=pytest.mark.slow),
    2.0])
def test_resume_with_a_new_target_calibrates_the_rest_to_end_at_it(
        tmp_path, calibrated_run, new_target):
    first, workdir, z_first = calibrated_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    longer = dataclasses.replace(first, steps=20, target_epsilon=new_target)
    summary = dpsgd.train(longer, tmp_path, log=lambda _: None)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert summary["steps"] == 20, f"the resumed run stopped at step {summary['steps']}"
    assert 0.99 * new_target <= ledger["epsilon_rdp"] <= new_target, (
        f"10 steps at z {z_first:.4f} then 10 at z {summary['noise_multiplier']:.4f} spent "
        f"eps {ledger['epsilon_rdp']:.4f}: the remaining steps must be calibrated against "
        f"what the checkpoint spent, to end at the new target {new_target}"
    )
    change = ledger["metadata"]["changed_on_resume"]
    assert change == [{"step": 10, "noise_multiplier": summary["noise_multiplier"],
                       "target_epsilon": new_target}], f"the ledger must say what changed: {change}"


def test_resume_with_a_new_target_over_an_emptied_metrics_log_is_refused(
        tmp_path, calibrated_run):
    # The stop-29 storage audit's uncovered case: metrics.jsonl emptied by hand while a
    # checkpoint is left; a new target recalibrates z, and releases a killed run logged
    # after the checkpoint (gone with the log) would be replayed at another z, uncounted.
    first, workdir, _ = calibrated_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="lost 2 record") as error:
        dpsgd.train(dataclasses.replace(first, steps=20, target_epsilon=2.0), tmp_path,
                    log=lambda _: None)
    assert error.value.field == "workdir", error.value.field


def test_rerunning_a_finished_calibrated_run_ends_where_it_ended(tmp_path):
    # Rerunning the command of a finished target-eps run raised a ValueError from the
    # budget guard (0 steps left) since 4e54de7, in every binary (found by a docs audit).
    config = dpsgd.DpSgdConfig(
        dataset="digits", model="logreg", steps=6, batch_size=64, noise_multiplier=None,
        target_epsilon=1.0, eval_every=3, checkpoint_every=3)
    first = dpsgd.train(config, tmp_path, log=lambda _: None)
    again = dpsgd.train(config, tmp_path, log=lambda _: None)
    same = ("steps", "params_sha256", "epsilon_rdp", "noise_multiplier")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}, (
        f"a rerun must report the finished run as it was: {first} vs {again}")


def test_progress_lines_wait_for_the_step_they_report(tmp_path, monkeypatch):
    # With asynchronous dispatch the host runs steps ahead of the device; a line that did
    # not wait for its step would count steps that are only queued.
    seen = dispatch.record_progress_waits(monkeypatch, dpsgd, lambda state: state["step"])
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=3, batch_size=64,
                               eval_every=3, checkpoint_every=3)
    dpsgd.train(config, tmp_path, log=lambda _: None)
    assert seen == [(1, 1), (2, 2), (3, 3)], (
        f"(line's step, state it waits for): {seen}; each line must wait for its step")


class _KilledError(Exception):
    """Stands for a kill right after a metrics record was written."""


def test_calibrated_run_killed_past_its_checkpoint_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    # The same command after the kill must replay steps 11-15 with the killed run's exact
    # noise: a recalibrated z (a few 1e-5 away) was refused, or changed params and ledger.
    config = dpsgd.DpSgdConfig(
        dataset="digits", model="logreg", steps=20, batch_size=64, noise_multiplier=None,
        target_epsilon=1.0, eval_every=5, checkpoint_every=10)
    whole = dpsgd.train(config, tmp_path / "whole", log=lambda _: None)
    append = Workdir.append_metrics

    def append_then_kill(self, record):
        append(self, record)
        if record.get("step") == 15:
            raise _KilledError

    with monkeypatch.context() as patch:
        patch.setattr(Workdir, "append_metrics", append_then_kill)
        with pytest.raises(_KilledError):
            dpsgd.train(config, tmp_path / "killed", log=lambda _: None)
    resumed = dpsgd.train(config, tmp_path / "killed", log=lambda _: None)
    assert resumed["noise_multiplier"] == whole["noise_multiplier"], "the resume recalibrated z"
    assert resumed["params_sha256"] == whole["params_sha256"], (
        "a killed and resumed run must end with the uninterrupted run's parameters")
    ledgers = [json.loads((tmp_path / d / "ledger.json").read_text()) for d in ("whole", "killed")]
    assert ledgers[0]["events"] == ledgers[1]["events"], "and with the same ledger"


def test_nodp_poisson_step_is_the_unclipped_mean_over_the_realised_batch():
    # The non-private baseline: no clip, no noise, the mean over the examples drawn (its
    # padding slots, index 0, must weigh nothing).
    config = dpsgd.DpSgdConfig(batch_size=10, optimizer="sgd", learning_rate=0.1, nodp=True,
                               noise_multiplier=None)
    _poisson_step(config, None, 1e9, float, lambda count: (
        f"a --nodp step must be the plain mean gradient of the {count} examples drawn"))


def test_nodp_run_writes_no_ledger_and_claims_no_privacy(tmp_path):
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=2, batch_size=16,
                               nodp=True, noise_multiplier=None, eval_every=1)
    summary = dpsgd.train(config, tmp_path, log=lambda _: None)
    claims = {k: summary[k] for k in ("epsilon_rdp", "epsilon_pld", "delta", "noise_multiplier")}
    assert claims == dict.fromkeys(claims), f"a non-private run must claim no DP: {claims}"
    assert not (tmp_path / "ledger.json").exists(), "a non-private run has no ledger"
    records = Workdir(tmp_path).read_metrics()
    assert [r["epsilon_rdp"] for r in records] == [None, None], records
    assert "no privacy guarantee" in (tmp_path / "report.md").read_text()


def test_a_kill_after_a_logged_step_leaves_a_ledger_json_that_counts_it(tmp_path, monkeypatch):
    # Before, ledger.json was written at the run's end only: a killed run's logged steps
    # had no ledger.json (or, extended from a finished run, that run's smaller one).
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=4, batch_size=16,
                               noise_multiplier=1.0, eval_every=1, checkpoint_every=2)
    kill_after_metrics_record(monkeypatch, "step", 3)
    with pytest.raises(KilledAtRelease):
        dpsgd.train(config, tmp_path, log=lambda _: None)
    assert_ledger_json_covers_metrics(tmp_path, "epsilon_rdp")


def test_a_resume_on_other_training_data_is_refused_naming_the_flag(tmp_path, monkeypatch):
    # config.json pins --data_dir (resumable: the data may move), not the data in it:
    # another copy (here one example short) continued the checkpoint and its ledger.
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=2, batch_size=16,
                               noise_multiplier=1.0, eval_every=2, checkpoint_every=2)
    dpsgd.train(config, tmp_path, log=lambda _: None)
    other_data.assert_resume_on_other_data_is_refused(  # digits is embedded: --dataset
        monkeypatch, lambda: dpsgd.train(dataclasses.replace(config, steps=4), tmp_path,
                                         log=lambda _: None), tmp_path, "dataset")


@pytest.mark.parametrize("first, then", [
    # slow: ~8 s; the same pinned-field check, the fast suite keeps poisson -> fixed
    pytest.param("fixed", "poisson", marks=pytest.mark.slow),
    ("poisson", "fixed")])
def test_a_changed_sampling_over_a_calibrated_checkpoint_is_refused_naming_it(
        tmp_path, first, then):
    # The target's calibration composed the checkpoint's events under the NEW sampling's
    # relation before the config check ran: a ValueError from the accountant (a traceback
    # from the binary, exit 1) instead of the refusal naming --sampling (exit 2).
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=2, batch_size=16,
                               target_epsilon=2.0, sampling=first, eval_every=2,
                               checkpoint_every=2)
    dpsgd.train(config, tmp_path, log=lambda _: None)
    with pytest.raises(ConfigError) as error:
        dpsgd.train(dataclasses.replace(config, steps=4, sampling=then), tmp_path,
                    log=lambda _: None)
    assert error.value.field == "sampling", f"must name --sampling: {error.value}"


@pytest.mark.parametrize("flag", ["clipping", "l2_clip", "delta"])
def test_unused_flags_are_those_the_mode_ignores(flag):
    # The table the binary refuses given flags by (cli.refuse_unused): each was ignored by
    # a --nodp run, which clips, noises and accounts nothing (no mechanism, no ledger).
    nodp = dpsgd.unused_flags(dpsgd.DpSgdConfig(nodp=True))
    private = dpsgd.unused_flags(dpsgd.DpSgdConfig(noise_multiplier=1.0))
    assert nodp[flag][0], f"--{flag} has no effect with --nodp: {nodp}"
    assert not private[flag][0], f"--{flag} takes effect in a private run: {private}"


@pytest.mark.parametrize("mode", [{"nodp": True}, {"clipping": "fast", "noise_multiplier": 1.0}],
                         ids=["nodp", "fast_clipping"])
def test_microbatch_is_refused_where_no_per_example_gradients_are_taken(mode):
    # It was silently ignored: only vmap clipping of a private run materialises them.
    with pytest.raises(dpsgd.ConfigError) as info:
        dpsgd.DpSgdConfig(microbatch=8, **mode)
    assert info.value.field == "microbatch", f"{mode} must name --microbatch: {info.value}"
    dpsgd.DpSgdConfig(microbatch=8, noise_multiplier=1.0)  # Must not raise: vmap, private.


def _audit_run(z, k, seed, n=8, batch_size=8):
    """An audit run's pieces on n uniform 100x100 images, a logreg of 100,010 parameters,
    k canary examples and k held out: (model, params, images, labels, (inserted,
    held_out), config, optimizer, mechanism: C = 0.5, multiplier z)."""
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(size=(n, 100, 100, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=n), jnp.int32)
    model = models.get_classifier("logreg", 10)
    params = model.init(jax.random.key(seed), images[:1])
    canaries = audit.draw_pair(jax.random.key(seed + 1), params, k)
    config = dpsgd.DpSgdConfig(batch_size=batch_size, optimizer="sgd", learning_rate=1.0)
    return (model, params, images, labels, canaries, config, dpsgd.make_optimizer("sgd", 1.0),
            privacy.GaussianSumMechanism(0.5, z))


def _audit_step(z, k=1_000, seed=0):
    """One DP-SGD step on 8 examples, all sampled (rate 1), with k canary examples and k
    held out, on a logreg of 100,010 parameters: `audit.estimate` of the scores."""
    model, params, images, labels, canaries, config, opt, mechanism = _audit_run(z, k, seed)
    inserted, held_out = canaries
    step = dpsgd.make_train_step(model, opt, config, 8, mechanism, inserted)
    new = step(_state(params, opt), images, labels, jax.random.key(seed + 2))["params"]
    return audit.estimate(audit.scores(inserted, params, new),
                          audit.scores(held_out, params, new), 1e-5)


def test_a_canary_example_moves_the_model_along_its_direction():
    result = _audit_step(z=0.0, k=50)
    # Without noise the step is -lr (real gradients - C sum(u_c)) / B: each inserted
    # canary's score is ~ C / B over the change's norm, the held-out ones ~ 0.
    assert result.mean_inserted > 10 * abs(result.mean_held_out), (
        f"the canaries' gradients must be -C u_c, so descent moves along u_c: {result}")


def test_one_step_audit_finds_the_noise_multiplier_the_ledger_records():
    result = _audit_step(z=1.0)
    # About 1,000 + 1,000 scores: mu's standard error ~0.05; k/d = 0.01 of overlaps.
    assert abs(result.mu - 1.0) < 0.2, (
        f"the canaries stand {result.mu:.3f} noise stds out, not 1/z = 1: the step's noise "
        "or sensitivity is not the one the ledger records")


_AUDIT_RUN = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=3, batch_size=64,
                               noise_multiplier=1.1, eval_every=1, checkpoint_every=1,
                               audit_canaries=30)


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    """`_AUDIT_RUN` trained to its end, uninterrupted: (its workdir, its summary). Shared:
    copy the workdir before writing to it."""
    workdir = tmp_path_factory.mktemp("audit_run")
    return workdir, dpsgd.train(_AUDIT_RUN, workdir, log=lambda _: None)


def test_an_audit_run_writes_its_canary_figures_and_a_rerun_keeps_them(tmp_path, audit_run):
    config = _AUDIT_RUN
    shutil.copytree(audit_run[0], tmp_path, dirs_exist_ok=True)
    summary = audit_run[1]
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written == summary["audit"], "audit.json is not the summary's audit"
    assert written["ledger_epsilon_rdp"] == summary["epsilon_rdp"], "audit.json's ledger eps"
    assert 0 <= written["epsilon_lower_bound"] <= summary["epsilon_rdp"], written
    assert "canary audit" in (tmp_path / "report.md").read_text(), "report.md omits the audit"
    every_step = written["all_rounds"]
    assert (every_step["rounds"], every_step["noise_multiplier"]) == (3, 1.1), every_step
    examples = json.loads((tmp_path / "ledger.json").read_text())["metadata"]["dataset_size"]
    assert every_step["rate"] == pytest.approx(64 / examples), every_step
    assert 0 <= every_step["epsilon_lower_bound"] <= summary["epsilon_rdp"], every_step
    assert "all rounds' releases (3 rounds)" in (tmp_path / "report.md").read_text(), (
        "report.md omits the all-steps figures")
    again = dpsgd.train(config, tmp_path, log=lambda _: None)  # a finished run
    assert again["audit"] == written, "rerunning a finished audit run changed its figures"


def _all_steps(z, steps, n, batch_size, k=1_000, seed=0):
    """`steps` steps of an all-rounds audit run (`_audit_run`; examples and canaries
    Poisson at batch_size / n): (`dpsgd.all_steps_audit`'s figures at delta 1e-5, the
    ledger's PLD eps, the final state)."""
    model, params, images, labels, canaries, config, opt, mechanism = _audit_run(
        z, k, seed, n, batch_size)
    step = dpsgd.make_train_step(model, opt, config, n, mechanism, *canaries)
    state = dpsgd.initial_state(params, opt, canaries)
    for t in range(steps):
        state = step(state, images, labels, jax.random.fold_in(jax.random.key(seed + 2), t))
    figures = dpsgd.all_steps_audit(state, canaries, batch_size / n, z)(1e-5)
    ledger_eps = privacy.epsilon(
        dp_event.SelfComposedDpEvent(dpsgd.step_event(config, z, n), steps), 1e-5,
        accountant="pld")
    return figures, ledger_eps, state


def test_all_steps_audit_of_one_step_of_every_example_reads_the_ledgers_mechanism():
    figures, ledger_eps, _ = _all_steps(z=1.0, steps=1, n=8, batch_size=8)
    # ~1,000 scores a set: shift's standard error ~0.045 (0.888 here, seeds 1-3: 0.996,
    # 1.085, 1.036), noise_std's ~0.022. The 8 real examples' clipped sum projects on the
    # directions too, but barely: its norm is 1.0 (C = 0.5), a variance of 4e-5 in s.
    assert abs(figures["shift"] - 1) < 0.15, (
        f"a canary example moved s by {figures['shift']:.3f}, not +1: the release observed "
        "is not minus the noised sum / B, in units of C / B")
    assert abs(figures["noise_std"] - 1) < 0.1, f"noise std {figures['noise_std']:.3f}, not 1"
    assert abs(ledger_eps - 4.377) < 0.01, ledger_eps  # one Gaussian mechanism, z = 1
    assert abs(figures["epsilon_estimate"] - ledger_eps) < 0.6, figures
    assert 0 <= figures["epsilon_lower_bound"] <= ledger_eps, figures
    assert (figures["rounds"], figures["rate"], figures["noise_multiplier"]) == (1, 1.0, 1.0)


def test_all_steps_audit_of_ten_sampled_steps_estimates_the_ledgers_eps():
    figures, ledger_eps, _ = _all_steps(z=1.0, steps=10, n=50, batch_size=10)
    # q = 0.2: a canary's sum over 10 steps has variance ~10 + 1.6; / (T q) = 2: ~0.08.
    assert abs(figures["shift"] - 1) < 0.25, (
        f"shift {figures['shift']:.3f} per expected participation, not 1: {figures}")
    assert abs(figures["noise_std"] - 1) < 0.05, figures  # 10,000 held-out values
    assert abs(figures["epsilon_estimate"] - ledger_eps) < 0.25 * ledger_eps, (
        f"estimate {figures['epsilon_estimate']:.3f} against the ledger's {ledger_eps:.3f}")
    assert 0 <= figures["epsilon_lower_bound"] <= ledger_eps, figures


@pytest.mark.parametrize("weight", [
    # slow: ~4 s; the fast suite keeps wrong_sign (-1) and test_dp_fedavg_canaries' C/2 test
    pytest.param(0.5, id="half", marks=pytest.mark.slow),
    pytest.param(-1.0, id="wrong_sign")])
def test_all_steps_audit_reads_the_weight_canaries_were_inserted_with(monkeypatch, weight):
    insert = audit.insert
    monkeypatch.setattr(audit, "insert", lambda canaries, total, clip, rate, key: insert(
        canaries, total, weight * clip, rate, key))
    figures, _, _ = _all_steps(z=1.0, steps=1, n=8, batch_size=8)
    assert abs(figures["shift"] - weight) < 0.15, (
        f"canaries inserted at {weight} x -C u_c moved s by {figures['shift']:.3f}")
    assert abs(figures["noise_std"] - 1) < 0.1, figures


@pytest.mark.parametrize("z", [0.0, 1.0])
def test_the_all_steps_accumulators_leave_the_released_params_as_they_were(z):
    model, params, images, labels, canaries, config, opt, mechanism = _audit_run(z, 50, 0)
    key = jax.random.key(2)
    before = dpsgd.make_train_step(model, opt, config, 8, mechanism, canaries[0])(
        _state(params, opt), images, labels, key)
    after = dpsgd.make_train_step(model, opt, config, 8, mechanism, *canaries)(
        dpsgd.initial_state(params, opt, canaries), images, labels, key)
    # Bitwise without noise. With noise, the tests' XLA flags (conftest.py: LLVM's
    # optimisations off) compile the Gaussian sampling inside a different fusion once the
    # release has a second reader: ~5% of the kernel's coordinates move by ~3e-8 (1 ulp of
    # the largest, ~0.3). The binary's default flags give identical params (the same
    # sha256 with and without).
    for new, old in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"]),
                        strict=True):
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-7 if z else 0)
    assert set(after) - set(before) == {"audit"}, "only an audit run's state gains a key"
    assert set(dpsgd.initial_state(params, opt)) == {"params", "opt_state", "step"}, (
        "a run without canaries keeps its checkpoint's keys")


def test_an_audit_run_resumed_after_a_step_writes_the_uninterrupted_runs_audit(
        tmp_path, audit_run):
    config, whole = _AUDIT_RUN, audit_run[1]
    # Stopped after step 1 (its checkpoint), then resumed to step 3.
    dpsgd.train(dataclasses.replace(config, steps=1), tmp_path / "resumed", log=lambda _: None)
    resumed = dpsgd.train(config, tmp_path / "resumed", log=lambda _: None)
    assert resumed["audit"]["all_rounds"]["rounds"] == 3, resumed["audit"]
    assert resumed["audit"] == whole["audit"], (
        "a resumed audit run lost or repeated steps of its all-rounds scores")



def test_a_resume_that_draws_other_noise_for_a_logged_step_is_refused(tmp_path, monkeypatch):
    # The killed run logged step 3 past its checkpoint of step 2; the resume flips
    # jax_threefry_partitionable (another JAX version or environment), so its replay of
    # step 3 adds other noise: a second release of the step, counted once. Refused before
    # it is logged (a crash-safety review of stop 66).
    config = dpsgd.DpSgdConfig(dataset="digits", model="logreg", steps=4, batch_size=16,
                               noise_multiplier=1.0, eval_every=1, checkpoint_every=2)
    with monkeypatch.context() as patch:
        kill_after_metrics_record(patch, "step", 3)
        with pytest.raises(KilledAtRelease):
            dpsgd.train(config, tmp_path, log=lambda _: None)
    partitionable = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", not partitionable)
        with pytest.raises(ConfigError, match="replay of step 3 differs") as error:
            dpsgd.train(config, tmp_path, log=lambda _: None)
    finally:
        jax.config.update("jax_threefry_partitionable", partitionable)
    assert error.value.field == "workdir", error.value
    assert [r["step"] for r in Workdir(tmp_path).read_released()] == [1, 2, 3], (
        "the killed run's releases must stay on record")
    dpsgd.train(config, tmp_path, log=lambda _: None)  # where the killed run ran: resumes
    assert [r["step"] for r in Workdir(tmp_path).read_metrics()] == [1, 2, 3, 4]
