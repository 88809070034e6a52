"""Tests of the client selection by accuracy (dpfed.generative.selection)."""

import dataclasses
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from dpfed.generative import fedgan_debug, group_sizes, selection
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir, params_sha256


def test_quantile_defaults_take_bottom_and_top_quarters():
    accuracies = np.linspace(0.0, 1.0, 9)  # quantiles 0.25 -> 0.25, 0.75 -> 0.75
    groups = selection.split_clients(accuracies)
    np.testing.assert_array_equal(np.flatnonzero(groups.low), [0, 1, 2], err_msg="low group")
    np.testing.assert_array_equal(np.flatnonzero(groups.high), [6, 7, 8], err_msg="high group")


def test_thresholds_as_in_the_paper():
    accuracies = np.array([0.5, 0.882, 0.9, 0.939, 0.99])
    groups = selection.split_clients(accuracies, low_threshold=0.882, high_threshold=0.939)
    np.testing.assert_array_equal(groups.low, [1, 1, 0, 0, 0], err_msg="low: acc <= 0.882")
    np.testing.assert_array_equal(groups.high, [0, 0, 0, 1, 1], err_msg="high: acc >= 0.939")
    assert not np.any(groups.low & groups.high), "groups must be disjoint"


def test_ineligible_clients_join_no_group():
    accuracies = np.array([0.1, 0.2, 0.8, 0.9])
    eligible = np.array([False, True, True, False])
    groups = selection.split_clients(
        accuracies, low_quantile=0.0, high_quantile=1.0, eligible=eligible
    )
    np.testing.assert_array_equal(groups.low, [0, 1, 0, 0], err_msg="low among eligible")
    np.testing.assert_array_equal(groups.high, [0, 0, 1, 0], err_msg="high among eligible")


def test_identical_accuracies_cannot_be_split():
    with pytest.raises(ValueError, match="threshold"):
        selection.split_clients(np.full(10, 0.9))


def test_given_thresholds_in_the_wrong_order_are_named_as_given():
    with pytest.raises(ValueError, match="low threshold 0.9 must be below") as raised:
        selection.split_clients(np.linspace(0, 1, 5), low_threshold=0.9, high_threshold=0.5)
    message = str(raised.value)
    assert "too alike" not in message and "given" in message, (
        f"both thresholds were given: the values being too alike is not the cause: {message!r}"
    )


def test_empty_group_is_an_error():
    with pytest.raises(ValueError, match="high group is empty"):
        selection.split_clients(np.array([0.1, 0.2]), low_threshold=0.5, high_threshold=0.9)


@pytest.mark.parametrize(
    "low, high, want",
    [
        (0.5, 0.9, "high_threshold"),  # the high group is empty: the given high threshold
        (None, 0.9, "high_threshold"),
        (0.05, None, "low_threshold"),  # the low group is empty
        (None, None, "low_quantile"),  # values too alike for the default quantiles
    ],
)
def test_a_split_error_names_the_setting_to_change(low, high, want):
    # Before, the demos named --low_threshold whatever failed (found by a CLI audit).
    values = np.array([0.1, 0.2]) if (low, high) != (None, None) else np.full(4, 0.3)
    with pytest.raises(ConfigError) as raised:
        selection.split_clients(values, low_threshold=low, high_threshold=high)
    assert raised.value.field == want, f"{raised.value}: names {raised.value.field}, want {want}"


def test_quantiles_in_the_wrong_order_name_low_quantile_even_beside_a_given_threshold():
    with pytest.raises(ConfigError) as raised:
        selection.split_clients(np.linspace(0, 1, 5), low_threshold=0.1,
                                low_quantile=0.8, high_quantile=0.2)
    assert raised.value.field == "low_quantile", (
        f"the quantiles are wrong, not the given threshold: {raised.value}")


def test_client_accuracies_count_only_real_examples():
    # A "classifier" whose logits are the first 3 pixels: it predicts argmax of them.
    apply_fn = lambda params, x: x[:, :3]
    images = jnp.array(
        [
            [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]],  # predicts 0, 1, 2
            [[0, 1.0, 0], [1.0, 0, 0], [1.0, 0, 0]],  # predicts 1, 0, (0 padding)
        ]
    )
    labels = jnp.array([[0, 1, 1], [1, 1, 0]])
    counts = jnp.array([3, 2])
    accuracies = selection.client_accuracies(apply_fn, None, images, labels, counts)
    np.testing.assert_allclose(accuracies, [2 / 3, 1 / 2], err_msg="padding must not count")


def test_a_client_without_examples_has_no_accuracy():
    # NaN, not 0: a client with nothing to classify is neither low nor high accuracy.
    apply_fn = lambda params, x: x[:, :3]
    images = jnp.array([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 1.0, 0], [1.0, 0, 0]]])
    labels = jnp.array([[0, 1], [1, 1]])
    accuracies = selection.client_accuracies(apply_fn, None, images, labels, jnp.array([2, 0]))
    assert accuracies[0] == 1.0 and np.isnan(accuracies[1]), (
        f"the empty client must get NaN, the other its accuracy: {accuracies}")


def test_group_seeds_are_distinct_and_reproducible():
    seeds = {selection.group_seed(seed, group) for seed in range(5) for group in ("low", "high")}
    assert len(seeds) == 10, "every (seed, group) pair needs its own seed: shared seeds share noise"
    assert selection.group_seed(3, "low") == selection.group_seed(3, "low"), "not reproducible"
    assert all(0 <= s < 2**31 for s in seeds), "seeds must fit jax.random.key's int32 range"


@pytest.mark.parametrize(
    "low, high, sampling", [(0.88, 0.94, "poisson"), (None, None, "poisson"), (0.88, 0.94, "fixed")]
)
def test_guarantee_caveat_always_states_the_unnoised_group_sizes(low, high, sampling):
    caveat = selection.guarantee_caveat(low, high, sampling, "accuracies")
    assert caveat is not None and "released without noise" in caveat, (
        "a group's size counts users whose raw accuracy passes a threshold and is released "
        f"without noise, even with given thresholds and Poisson cohorts: caveat {caveat!r}"
    )
    assert "given the group sizes" in caveat, f"eps holds given the group sizes: {caveat!r}"


def test_guarantee_caveat_of_group_mode_names_the_end_to_end_mode():
    caveat = selection.guarantee_caveat(0.88, 0.94, "poisson", "accuracies")
    assert "--group_sampling=population" in caveat, (
        f"a caveat about unnoised sizes should name the mode that noises them: {caveat!r}")


def test_guarantee_caveat_with_given_thresholds_and_poisson_names_no_other_reason():
    caveat = selection.guarantee_caveat(0.88, 0.94, "poisson", "accuracies")
    assert "quantiles" not in caveat and "replace-one" not in caveat, (
        f"given thresholds and Poisson cohorts: one user changes one group: {caveat!r}"
    )


@pytest.mark.parametrize("low, high", [(None, None), (0.88, None), (None, 0.94)])
def test_guarantee_caveat_names_quantile_thresholds(low, high):
    caveat = selection.guarantee_caveat(low, high, "poisson", "accuracies")
    assert caveat is not None and "quantiles" in caveat, (
        f"a quantile threshold lets one user move others across groups: caveat {caveat!r}"
    )


def test_guarantee_caveat_names_fixed_size_cohorts():
    caveat = selection.guarantee_caveat(0.88, 0.94, "fixed", "accuracies")
    assert caveat is not None and "replace-one" in caveat, (
        f"under replace-one a user and its replacement can sit in different groups: {caveat!r}"
    )


def test_threshold_rule_names_a_given_value_or_the_quantile_not_its_value():
    given = selection.threshold_rule("low", 0.882, 0.25, "accuracy", "accuracies")
    assert given == "accuracy <= 0.882", f"a given threshold is a setting: {given!r}"
    quantile = selection.threshold_rule("high", None, 0.75, "OOV rate", "OOV rates")
    assert quantile == "OOV rate >= the 0.75 quantile of all clients' OOV rates", (
        f"a quantile threshold's value is raw data: the rule names only the quantile, {quantile!r}")


@dataclasses.dataclass
class _DemoConfig:
    bug_fraction: float = 0.5
    rounds: int = 2


def test_pin_demo_config_checks_only_once_a_group_has_trained(tmp_path):
    wd = Workdir(tmp_path)
    selection.pin_demo_config(wd, _DemoConfig(), ["gan_low"], frozenset({"rounds"}))
    # No group sub-workdir yet (a run stopped before training): a corrected rerun is fine.
    selection.pin_demo_config(wd, _DemoConfig(bug_fraction=0.2), ["gan_low"], frozenset())
    (tmp_path / "gan_low").mkdir()
    selection.pin_demo_config(wd, _DemoConfig(0.2, rounds=4), ["gan_low"], frozenset({"rounds"}))
    with pytest.raises(ConfigError) as error:
        selection.pin_demo_config(wd, _DemoConfig(0.5, 4), ["gan_low"], frozenset({"rounds"}))
    assert error.value.field == "bug_fraction", "a trained group pins the data settings"


def test_pin_demo_config_and_pin_groups_check_once_either_group_has_trained(tmp_path):
    # A demo killed while training its second group leaves only the first's sub-workdir:
    # a rerun resumes that group, so its settings and data are pinned already.
    wd = Workdir(tmp_path)
    dirs = ["gan_low", "gan_high"]
    selection.pin_demo_config(wd, _DemoConfig(), dirs, frozenset({"rounds"}))
    selection.pin_groups(wd, {"low": "a", "high": "b"}, dirs, "dataset")
    (tmp_path / "gan_low").mkdir()  # the first group trained; the second never started
    with pytest.raises(ConfigError) as error:
        selection.pin_demo_config(wd, _DemoConfig(bug_fraction=0.2), dirs, frozenset({"rounds"}))
    assert error.value.field == "bug_fraction", (
        "one trained group pins the settings, not only both")
    with pytest.raises(ConfigError, match="low group"):
        selection.pin_groups(wd, {"low": "other", "high": "b"}, dirs, "dataset")


def test_pin_demo_config_checks_once_the_group_sizes_are_released(tmp_path):
    # --group_sampling=population releases the noised sizes before any group trains; a
    # rerun reuses them, so the settings they were drawn with may no longer change.
    wd = Workdir(tmp_path)
    selection.pin_demo_config(wd, _DemoConfig(), ["gan_low"], frozenset({"rounds"}))
    wd.write_json(group_sizes.GROUP_SIZES_FILE, {"noised_sizes": {"low": 3}, "noise_stddev": 1})
    with pytest.raises(ConfigError) as error:
        selection.pin_demo_config(wd, _DemoConfig(bug_fraction=0.2), ["gan_low"], frozenset())
    assert error.value.field == "bug_fraction", (
        "released group sizes pin the settings that chose the groups")


@dataclasses.dataclass
class _TrainedConfig:
    bug_fraction: float = 0.5
    noise_multiplier: float = 1.0
    clients_per_round: float = 10


def test_released_sizes_without_a_trained_group_let_the_training_settings_change(tmp_path):
    # A run refused after the sizes' release (fedgan_debug's adaptive noise split at the
    # noised sizes' divisor) asks for a lower --noise_multiplier or a larger
    # --clients_per_round; that rerun must reuse the sizes in this workdir, since a new
    # workdir would release them a second time.
    wd = Workdir(tmp_path)
    selection.pin_demo_config(wd, _TrainedConfig(), ["gan_low"], frozenset())
    wd.write_json(group_sizes.GROUP_SIZES_FILE, {"noised_sizes": {"low": 3}, "noise_stddev": 1})
    changed = _TrainedConfig(noise_multiplier=0.5, clients_per_round=12)
    selection.pin_demo_config(wd, changed, ["gan_low"], frozenset())
    assert wd.read_json("config.json")["noise_multiplier"] == 0.5, (
        "the rerun's settings are what config.json pins from now on")
    (tmp_path / "gan_low").mkdir()  # a group trained: its rounds used the pinned z
    with pytest.raises(ConfigError) as error:
        selection.pin_demo_config(wd, dataclasses.replace(changed, noise_multiplier=0.4),
                                  ["gan_low"], frozenset())
    assert error.value.field == "noise_multiplier", (
        "once a group trained, its training settings are pinned too")


def test_group_digest_tells_groups_data_apart():
    # pin_groups is given params_sha256 of each group's data: arrays or texts.
    images = np.zeros((2, 3, 4), np.float32)
    changed = images.copy()
    changed[1, 2, 3] = 1.0
    assert params_sha256(images) == params_sha256(images.copy())
    assert params_sha256(images) != params_sha256(changed), "one pixel changed"
    assert params_sha256(["a", "bc"]) != params_sha256(["ab", "c"]), (
        "texts must be delimited: other clients, same concatenation")


def test_pin_groups_refuses_a_resume_on_other_data_naming_the_flag(tmp_path):
    wd = Workdir(tmp_path)
    selection.pin_groups(wd, {"low": "a", "high": "b"}, ["gan_low"], "emnist_dir")
    (tmp_path / "gan_low").mkdir()  # a group has trained: a rerun resumes it
    selection.pin_groups(wd, {"low": "a", "high": "b"}, ["gan_low"], "emnist_dir")
    with pytest.raises(ConfigError) as info:
        selection.pin_groups(wd, {"low": "a", "high": "c"}, ["gan_low"], "emnist_dir")
    assert info.value.field == "emnist_dir" and "high" in str(info.value), (
        f"a resume whose high group's data changed must be refused naming it: {info.value}")


def test_pin_groups_checks_only_once_a_group_has_trained(tmp_path):
    wd = Workdir(tmp_path)
    selection.pin_groups(wd, {"low": "a"}, ["gan_low"], "emnist_dir")
    selection.pin_groups(wd, {"low": "other"}, ["gan_low"], "emnist_dir")  # nothing trained
    assert wd.read_json(selection.GROUPS_FILE) == {"low": "other"}, "a fresh run re-pins"


@pytest.mark.parametrize("text", ['{"low": "a', "[1, 2]"])
def test_pin_groups_refuses_an_unreadable_groups_json_naming_the_workdir(tmp_path, text):
    # Before, a torn groups.json was a JSONDecodeError traceback and a list one an
    # AttributeError; config.json and data.json were already refused so (`read_pin`).
    wd = Workdir(tmp_path)
    (tmp_path / "gan_low").mkdir()  # a group has trained: a rerun resumes it
    wd.file(selection.GROUPS_FILE).write_text(text)  # cut short / overwritten from outside
    with pytest.raises(ConfigError, match="unreadable") as info:
        selection.pin_groups(wd, {"low": "a"}, ["gan_low"], "emnist_dir")
    assert info.value.field == "workdir", (
        f"an unreadable groups.json must be refused naming the workdir: {info.value}")
    assert wd.file(selection.GROUPS_FILE).read_text() == text, "and left as it was"


@pytest.mark.parametrize("group_sampling, allow_empty", [("group", False),
                                                         ("population", True)])
def test_split_settings_are_the_configs_split_fields(group_sampling, allow_empty):
    config = SimpleNamespace(low_threshold=0.1, high_threshold=None, low_quantile=0.2,
                             high_quantile=0.8, seed=3, group_sampling=group_sampling)
    assert selection.split_settings(config) == {
        "low_threshold": 0.1, "high_threshold": None, "low_quantile": 0.2, "high_quantile": 0.8,
        "allow_empty": allow_empty,
    }, "the keywords of split_clients, read from the config; empty groups in population mode"


def test_an_empty_group_is_returned_when_allowed():
    # Population sampling: refusing would tell apart populations that differ by one user.
    groups = selection.split_clients(np.array([0.5, 0.95]), low_threshold=0.3,
                                     high_threshold=0.9, allow_empty=True)
    assert not groups.low.any() and groups.high.tolist() == [False, True], groups


def test_demo_fields_say_diverged_if_either_model_did_and_add_their_earlier_seconds():
    results = {"low": {"diverged": False, "wall_seconds_earlier": 3.0},
               "high": {"diverged": True, "wall_seconds_earlier": 4.5}}
    fields = selection.demo_fields(results, started=time.time() - 1.0)
    assert fields["diverged"] is True, "one diverged model makes the demo's verdict void"
    assert fields["wall_seconds_earlier"] == 7.5, f"both models' earlier seconds: {fields}"
    assert 8.5 <= fields["wall_seconds"] < 60, f"this invocation's second and theirs: {fields}"


def test_max_epsilon_is_the_larger_groups_eps_with_its_noised_sizes_release():
    # The groups are disjoint: releasing both costs the larger eps, and with population
    # sampling each group's eps must include the noised sizes' release (end to end).
    population = {"low": {"epsilon_rdp": 2.0, "epsilon_rdp_with_group_sizes": 2.5},
                  "high": {"epsilon_rdp": 3.0, "epsilon_rdp_with_group_sizes": 3.25}}
    assert selection.max_epsilon(population) == 3.25, (
        "the max over the groups of their eps with the group sizes' release")
    group = {"low": {"epsilon_rdp": 2.0}, "high": {"epsilon_rdp": 1.5}}
    assert selection.max_epsilon(group) == 2.0, "without noised sizes: the max of the groups' eps"
    nonprivate = {"low": {"epsilon_rdp": None}, "high": {"epsilon_rdp": None}}
    assert selection.max_epsilon(nonprivate) is None, "non-private groups: no eps"


def _summary(monkeypatch, **fields):
    """`summary_fields` of fedgan_debug's config, private and with both thresholds given
    unless `fields` say otherwise (no environment: not under test)."""
    monkeypatch.setattr(selection, "environment_info", dict)
    config = fedgan_debug.DebugConfig(
        **{"noise_multiplier": 1.0, "low_threshold": 0.3, "high_threshold": 0.9, **fields})
    eps = 2.0 if config.noise_multiplier > 0 else None
    results = {group: {"epsilon_rdp": eps, "diverged": False, "wall_seconds_earlier": 0.0}
               for group in ("low", "high")}
    return selection.summary_fields(config, results, time.time(), "accuracies", 10)


def test_summary_fields_show_delta_only_for_a_private_demo(monkeypatch):
    assert _summary(monkeypatch, delta=1e-6)["delta"] == 1e-6, (
        "a private demo's eps holds at its delta")
    nonprivate = _summary(monkeypatch, noise_multiplier=0.0)
    assert nonprivate["delta"] is None, (
        f"a non-private demo has no eps, so no delta: its summary shows {nonprivate['delta']}")


@pytest.mark.parametrize("low, high, from_quantiles", [
    (0.3, 0.9, False), (None, 0.9, True), (0.3, None, True), (None, None, True)])
def test_summary_fields_say_whether_a_threshold_came_from_a_quantile(
        monkeypatch, low, high, from_quantiles):
    summary = _summary(monkeypatch, low_threshold=low, high_threshold=high)
    assert summary["thresholds_from_quantiles"] is from_quantiles, (
        f"thresholds {low}, {high}: a missing one is a quantile of the clients' raw values "
        f"(the summary shows None for it), got {summary['thresholds_from_quantiles']}")


def test_model_fields_keep_each_models_privacy_rounds_and_time():
    summary = {key: i for i, key in enumerate(selection.MODEL_SUMMARY_KEYS)} | {"other": 1}
    assert selection.model_fields(summary) == {
        key: i for i, key in enumerate(selection.MODEL_SUMMARY_KEYS)}, "only those keys"


def test_a_client_without_a_value_joins_no_group_with_quantile_thresholds():
    # client_accuracies gives NaN to a client without examples; before, a NaN made every
    # quantile NaN and the split failed saying the values were "too alike".
    accuracies = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9, np.nan])
    groups = selection.split_clients(accuracies, low_quantile=0.0, high_quantile=1.0)
    np.testing.assert_array_equal(np.flatnonzero(groups.low), [0], err_msg="low group")
    np.testing.assert_array_equal(np.flatnonzero(groups.high), [5], err_msg="high group")
    assert (groups.low_threshold, groups.high_threshold) == (0.1, 0.9), groups


def test_guarantee_caveat_is_none_end_to_end_with_population_sampling_and_given_thresholds():
    assert selection.guarantee_caveat(0.88, 0.94, "poisson", "accuracies", "population") is None, (
        "noised sizes, given thresholds, Poisson cohorts: the max of the groups' eps is end to end")
    caveat = selection.guarantee_caveat(None, 0.94, "poisson", "accuracies", "population")
    assert "quantiles" in caveat and "without noise" not in caveat, (
        f"with population sampling only the quantile threshold is left to caveat: {caveat!r}")


_TRAINING = {"clients_per_round": 4.0, "l2_clip": 1.0, "noise_multiplier": 0.5, "delta": 1e-5,
             "sampling": "poisson", "group_sampling": "group", "group_size_noise": 10.0}


@pytest.mark.parametrize("field, value", [
    ("clients_per_round", 0.0), ("l2_clip", 0.0), ("noise_multiplier", -0.1), ("delta", 1.0),
    ("sampling", "uniform"), ("group_sampling", "all")])
def test_check_training_settings_names_the_setting_out_of_range(field, value):
    selection.check_training_settings(SimpleNamespace(**_TRAINING))  # all in range
    with pytest.raises(ConfigError) as raised:
        selection.check_training_settings(SimpleNamespace(**{**_TRAINING, field: value}))
    assert raised.value.field == field, f"{field}={value!r} refused naming {raised.value.field}"


def test_check_training_settings_refuses_a_fractional_fixed_cohort():
    # A fixed cohort draws exactly clients_per_round users: 2.5 is no cohort size (a
    # Poisson cohort's expected size may be fractional).
    selection.check_training_settings(SimpleNamespace(**{**_TRAINING, "clients_per_round": 2.5}))
    fixed = {**_TRAINING, "sampling": "fixed"}
    selection.check_training_settings(SimpleNamespace(**fixed))  # 4.0 is whole
    with pytest.raises(ConfigError) as raised:
        selection.check_training_settings(SimpleNamespace(**{**fixed, "clients_per_round": 2.5}))
    assert raised.value.field == "clients_per_round", (
        f"a fractional fixed cohort must be refused naming clients_per_round: {raised.value}")


def test_threshold_rules_take_a_given_threshold_or_that_sides_quantile():
    config = SimpleNamespace(low_quantile=0.2, high_quantile=0.8)
    low, high = selection.threshold_rules(
        config, {"low_threshold": 0.3, "high_threshold": None}, "accuracy", "accuracies")
    assert low == "accuracy <= 0.300", low
    assert high == "accuracy >= the 0.8 quantile of all clients' accuracies", (
        f"the high side's rule must name the high quantile: {high!r}")


def test_table_rows_put_each_groups_value_in_its_column_in_the_rows_format():
    rows = selection.table_rows([("clients", "n", "d"), ("rate", "r", ".3f")],
                                {"n": 6, "r": 0.25}, {"n": 7, "r": 0.5})
    assert rows == "| clients | 6 | 7 |\n| rate | 0.250 | 0.500 |", rows


@pytest.mark.parametrize(
    "settings, ignored",
    [
        ({"low_threshold": 0.5}, "low_quantile"),
        ({"high_threshold": 0.9}, "high_quantile"),
        ({"group_sampling": "group"}, "group_size_noise"),
        ({"group_sampling": "group", "noise_multiplier": 0.0}, "delta"),
    ],
)
def test_unused_flags_are_those_the_demo_settings_ignore(settings, ignored):
    # The debug demos' shared table for cli.refuse_unused: a given threshold made its
    # quantile, and group sampling the sizes' noise, silently ignored.
    base = {"low_threshold": None, "high_threshold": None, "group_sampling": "population",
            "noise_multiplier": 0.5}
    assert selection.unused_flags(SimpleNamespace(**{**base, **settings}))[ignored][0], (
        f"--{ignored} has no effect with {settings}")
    assert not selection.unused_flags(SimpleNamespace(**base))[ignored][0], (
        f"--{ignored} takes effect with {base}")


@pytest.mark.parametrize(
    "settings",
    [{"noise_multiplier": 0.5, "group_sampling": "group"},  # the models' ledgers
     {"noise_multiplier": 0.0, "group_sampling": "population"}],  # group_sizes_ledger.json
    ids=["noised", "population"],
)
def test_delta_is_used_where_anything_is_accounted(settings):
    # At z 0 the models keep no ledger, but population sampling still releases the group
    # sizes noised, accounted at --delta: the flag is refused only where neither is kept.
    base = {"low_threshold": None, "high_threshold": None}
    assert not selection.unused_flags(SimpleNamespace(**base, **settings))["delta"][0], (
        f"--delta takes effect with {settings}")


def test_a_population_where_no_client_has_a_value_gives_two_empty_groups_when_allowed():
    # Population sampling with given thresholds: a refusal would tell this population apart
    # from the same one with one more user holding data (a red-team finding of stop 66).
    groups = selection.split_clients(np.array([np.nan, np.nan]), eligible=np.array([True, False]),
                                     low_threshold=0.3, high_threshold=0.9, allow_empty=True)
    assert not (groups.low.any() or groups.high.any()), f"both groups empty: {groups}"


@pytest.mark.parametrize("settings", [{"allow_empty": False, "low_threshold": 0.3},
                                      {"allow_empty": True, "low_threshold": None}])
def test_no_client_with_a_value_is_refused_without_empty_groups_or_with_a_quantile(settings):
    # Without allow_empty the split must refuse an empty group anyway; a quantile of no
    # values has no value.
    with pytest.raises(ValueError, match="no eligible client"):
        selection.split_clients(np.array([np.nan, np.nan]), high_threshold=0.9, **settings)
