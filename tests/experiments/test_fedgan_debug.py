"""experiments/fedgan_debug.py and dpfed.generative.fedgan_debug: outputs, flags, resume."""

import dataclasses
import json
import shutil
import types

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from dpfed.data import emnist_federated
from dpfed.generative import fedgan, fedgan_debug, group_sizes, polarity, selection
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir
from tests.binary import cpu_devices_env, run_binary, with_fusion_emitters
from tests.experiments import debug_checks

# Figures computed from raw client data: diagnostics.json only, never a release file.
RAW_GROUP_KEYS = ("buggy_client_fraction", "real_inverted_fraction", "client_accuracy_mean")
RAW_KEYS = (*RAW_GROUP_KEYS, "num_buggy_clients")

TINY = {
    "num_clients": 24,
    "classifier_epochs": 1,
    "rounds": 2,
    "clients_per_round": 2,
    "sampling": "fixed",
    "noise_multiplier": 0.5,
    "d_conv_features": (4, 8),
    "d_dense_features": 16,
    "g_dense_features": 16,
    "g_base_features": 8,
    "g_convt_features": (8, 4),
    "noise_dim": 8,
    "batch_size": 4,
    "client_d_steps": 1,
    "server_g_steps": 1,
    "num_samples": 16,
    "eval_every": 1,
    "checkpoint_every": 1,
}


# What the tiny run printed on the terminal.
TINY_LOG: list[str] = []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fedgan_debug")
    config = fedgan_debug.DebugConfig(**TINY)
    return workdir, config, fedgan_debug.run(config, str(workdir), log=TINY_LOG.append)


def test_summary_has_the_acceptance_keys_and_user_level_eps(tiny_run):
    _, _, summary = tiny_run
    for key in ("inverted_fraction_low", "inverted_fraction_high"):
        assert 0.0 <= summary[key] <= 1.0, f"{key} must be a fraction, got {summary[key]}"
    for group in ("gan_low", "gan_high"):
        assert summary[group]["epsilon_rdp"] > 0, f"{group} trained with noise must report eps"
        others = summary[group]["epsilon_rdp_same_noise_if_users"]
        assert others["1000000"] < others["3400"], "more users, same noise: smaller eps"
    assert summary["unit"] == "user", "the guarantee protects users"
    assert summary["epsilon_rdp"] == max(
        summary["gan_low"]["epsilon_rdp"], summary["gan_high"]["epsilon_rdp"]
    ), "disjoint groups: the release costs the larger eps"


def test_the_two_gans_draw_independent_noise(tiny_run):
    # One seed for both made round r of each GAN add the same Gaussian draw, so the
    # difference of the two models held the clipped sums with no noise at all.
    _, _, summary = tiny_run
    seeds = {summary[g]["seed"] for g in ("gan_low", "gan_high")}
    assert len(seeds) == 2, f"both GANs trained with seed {seeds}: their noise cancels"


def test_grids_report_and_per_gan_ledgers_are_written(tiny_run):
    workdir, _, _ = tiny_run
    for name in ("samples_low.png", "samples_high.png", "report.md", "summary.json"):
        assert (workdir / name).exists(), f"{name} missing from the workdir"
    report = (workdir / "report.md").read_text()
    assert "samples_low.png" in report and "samples_high.png" in report, "grids side by side"
    for group in ("gan_low", "gan_high"):
        ledger = json.loads((workdir / group / "ledger.json").read_text())
        assert ledger["unit"] == "user", f"{group} ledger unit {ledger['unit']}"


def test_groups_are_disjoint_and_follow_the_bug(tiny_run):
    workdir, config, summary = tiny_run
    low, high = summary["gan_low"], summary["gan_high"]
    assert low["num_clients"] + high["num_clients"] <= config.num_clients, "groups overlap"
    truth = Workdir(workdir).read_json(selection.DIAGNOSTICS_JSON)["groups"]
    assert truth["low"]["buggy_client_fraction"] > truth["high"]["buggy_client_fraction"], (
        "the low-accuracy group must hold more inverted clients than the high one"
    )


def test_release_files_hold_no_raw_data_figures(tiny_run):
    workdir, _, _ = tiny_run
    debug_checks.assert_releases_hold_none_of(workdir, ("gan_low", "gan_high"), RAW_KEYS)


def test_summary_keeps_quantile_thresholds_out(tiny_run):
    _, _, summary = tiny_run
    debug_checks.assert_summary_keeps_quantile_thresholds_out(summary)


def test_diagnostics_json_holds_the_ground_truth_labelled_as_not_a_release(tiny_run):
    workdir, config, _ = tiny_run
    diagnostics = debug_checks.read_labelled_diagnostics(
        workdir, fedgan_debug.GROUPS, RAW_GROUP_KEYS)
    assert diagnostics["num_buggy_clients"] == round(config.bug_fraction * config.num_clients), (
        "diagnostics.json must hold the number of truly buggy clients"
    )


def test_report_shows_ground_truth_only_in_its_own_section_after_the_releases(tiny_run):
    workdir, _, _ = tiny_run
    report = (workdir / "report.md").read_text()
    debug_checks.assert_ground_truth_only_after_releases(
        report, "## Numbers", ("truly buggy", "mean client accuracy", "real images"))


def test_summary_and_report_state_the_caveat_of_a_quantile_fixed_cohort_run(tiny_run):
    workdir, _, summary = tiny_run
    debug_checks.assert_caveat_of_quantiles_and_fixed_cohorts(workdir, summary)


def test_summary_caveat_states_the_unnoised_group_sizes(tiny_run):
    _, _, summary = tiny_run
    debug_checks.assert_caveat_names_unnoised_group_sizes(summary)


def test_rerun_resumes_to_the_same_result(tiny_run):
    workdir, config, summary = tiny_run
    again = fedgan_debug.run(config, str(workdir), log=lambda _: None)
    assert again["gan_low"]["epsilon_rdp"] == summary["gan_low"]["epsilon_rdp"], (
        "a rerun on a finished workdir must not spend more privacy"
    )
    assert again["inverted_fraction_low"] == summary["inverted_fraction_low"], "G changed"


def _flags(settings: dict) -> list[str]:
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in settings.items()]


def test_demo_killed_in_its_second_gan_resumes_like_an_uninterrupted_run(tiny_run, tmp_path):
    # make demo's job, SIGKILLed after round 1 of 2 of the high group's GAN; the
    # uninterrupted run is the module's (in this process, the same settings as the flags).
    debug_checks.assert_killed_in_second_model_resumes(
        "experiments.fedgan_debug", _flags(TINY), tmp_path, ("gan_low", "gan_high"),
        ("epsilon_rdp", "inverted_fraction_low", "inverted_fraction_high"),
        params_key="generator_sha256", whole=tiny_run[0], step=1)


def test_rerun_with_a_changed_data_setting_is_refused_naming_it(tiny_run, tmp_path):
    # The GANs' own configs hold no data settings: without the top-level pin, a rerun with
    # another bug fraction resumed GANs trained on another population.
    workdir, config, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    changed = dataclasses.replace(config, bug_fraction=0.0)
    with pytest.raises(fedgan_debug.ConfigError) as raised:
        fedgan_debug.run(changed, str(copy), log=lambda _: None)
    assert raised.value.field == "bug_fraction", (
        f"a rerun with a changed --bug_fraction must be refused naming it: {raised.value}"
    )


def test_rerun_on_other_group_data_is_refused(tiny_run, tmp_path):
    # What the config pin cannot see (other files under --emnist_dir, a regrouping): the
    # pinned digest of a group's data no longer matches, so its GAN must not resume.
    workdir, config, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    pinned = json.loads((copy / selection.GROUPS_FILE).read_text())
    assert set(pinned) == {"low", "high"}, f"both groups' data must be pinned: {pinned}"
    (copy / selection.GROUPS_FILE).write_text(json.dumps({**pinned, "low": "0" * 64}))
    with pytest.raises(fedgan_debug.ConfigError) as raised:
        fedgan_debug.run(config, str(copy), log=lambda _: None)
    assert config.dataset == "mnist5k", "the embedded dataset: no --emnist_dir to blame"
    assert raised.value.field == "dataset" and "low" in str(raised.value), (
        f"a rerun whose low group's data differ must be refused naming --dataset: {raised.value}")


def test_adaptive_clipping_with_too_much_noise_exits_2_naming_a_flag_it_has(tmp_path):
    # 2 sb = 0.1 * 5 clients = 0.5 is not above z = 0.5: the noise cannot be split.
    proc = run_binary(
        "experiments.fedgan_debug",
        "--adaptive_clipping",
        "--noise_multiplier=0.5",
        "--clients_per_round=5",
        f"--workdir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 2, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert "--noise_multiplier" in proc.stderr and "Traceback" not in proc.stderr, (
        f"the error must name --noise_multiplier without a traceback: {proc.stderr[-2000:]}"
    )
    assert "clipped_count_stddev" not in proc.stderr, (
        f"the error names a flag fedgan_debug does not have: {proc.stderr[-2000:]}"
    )


@pytest.mark.parametrize(
    "flag, value, others",
    [("bug_fraction", "1.5", ()), ("d_conv_features", "4,x", ()),
     ("group_size_noise", "0", ("--group_sampling=population",)),
     ("emnist_classifier_writers", "5", ()),  # ignored by mnist5k (the default) before
     # An audit needs 20 canaries or more, noise (z 0 is the default) and Poisson cohorts.
     ("audit_canaries", "19", ("--noise_multiplier=1",)), ("audit_canaries", "20", ()),
     ("audit_canaries", "20", ("--noise_multiplier=1", "--sampling=fixed"))],
)
def test_bad_flags_exit_2_naming_the_flag(tmp_path, flag, value, others):
    proc = run_binary(
        "experiments.fedgan_debug", f"--{flag}={value}", *others, f"--workdir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 2, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(("field", "value"), [("emnist_dir", "/data/emnist"),
                                              ("emnist_max_clients", 5)])
def test_an_emnist_setting_with_mnist5k_is_refused(field, value):
    # It was silently ignored: mnist5k's clients come from its IID split.
    with pytest.raises(ConfigError) as raised:
        fedgan_debug.DebugConfig(**{**TINY, field: value})
    assert raised.value.field == field and "mnist5k" in raised.value.message, raised.value
    fedgan_debug.DebugConfig(**{**TINY, "dataset": "emnist", field: value})  # Must not raise.


@pytest.mark.parametrize(
    "settings, ignored, applied",
    [
        ({}, "emnist_classifier_writers", {"dataset": "emnist"}),
        ({"dataset": "emnist"}, "num_clients", {}),
        ({"low_threshold": 0.5}, "low_quantile", {}),  # the demos' shared table
    ],
)
def test_unused_flags_are_those_the_mode_ignores(settings, ignored, applied):
    # The table the binary refuses given flags by (cli.refuse_unused): each was ignored.
    def table(**fields):
        return fedgan_debug.unused_flags(fedgan_debug.DebugConfig(**{**TINY, **fields}))

    assert table(**settings)[ignored][0], f"--{ignored} has no effect with {settings}"
    assert not table(**applied)[ignored][0], f"--{ignored} takes effect with {applied}"


def _skip_the_app_classifier(monkeypatch) -> None:
    """`run` without training or evaluating the app's classifier (for a test that needs
    neither: it sets the clients' accuracies itself, `selection.client_accuracies`)."""
    model = types.SimpleNamespace(apply=None)  # client_accuracies gets model.apply
    monkeypatch.setattr(fedgan_debug, "train_app_classifier", lambda *args: (model, None))
    monkeypatch.setattr(fedgan_debug.classifier_fit, "accuracy", lambda *args: 1.0)


def test_cohort_larger_than_a_group_is_a_config_error(tmp_path, monkeypatch):
    # Quantile groups of 24 clients hold 6 each (the accuracies here are distinct).
    _skip_the_app_classifier(monkeypatch)
    monkeypatch.setattr(selection, "client_accuracies",
                        lambda *args: np.linspace(0.0, 1.0, TINY["num_clients"]))
    config = fedgan_debug.DebugConfig(**{**TINY, "clients_per_round": 20})
    with pytest.raises(fedgan_debug.ConfigError, match="clients of the low-accuracy group"):
        fedgan_debug.run(config, str(tmp_path), log=lambda _: None)


def test_terminal_lines_with_raw_figures_are_labelled(tiny_run):
    debug_checks.assert_raw_log_lines_labelled(TINY_LOG)


def test_fractional_fixed_cohort_names_clients_per_round():
    # TINY samples fixed cohorts: m must be a whole number of clients.
    with pytest.raises(fedgan_debug.ConfigError) as error:
        fedgan_debug.DebugConfig(**{**TINY, "clients_per_round": 2.5})
    assert error.value.field == "clients_per_round", error.value.field


# A fake federated EMNIST: 8 writers in TFF's layout, each in both files (as in TFF).
EMNIST_WRITERS = [f"f{i:04d}_00" for i in range(8)]
EMNIST_HELD_OUT = 3  # --emnist_classifier_writers of the tests: the last 3 writers.


def _write_fake_emnist(directory, changed_writer=None):
    """TFF's fed_emnist_{train,test}.h5 in `directory`; `changed_writer` gets other data."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 3), ("test", 2)):
        path = directory / emnist_federated.FILE_NAMES[(split, False)]
        with h5py.File(path, "w") as f:
            for i, writer in enumerate(EMNIST_WRITERS):
                seed = (i, int(split == "train"), int(writer == changed_writer))
                rng = np.random.default_rng(seed)
                pixels = rng.uniform(size=(n, 28, 28)).astype(np.float32)
                labels = rng.integers(0, 62, size=n).astype(np.int32)
                f.create_dataset(f"examples/{writer}/pixels", data=pixels)
                f.create_dataset(f"examples/{writer}/label", data=labels)
    return directory


def _emnist_config(directory, **kw):
    return fedgan_debug.DebugConfig(
        **{
            **TINY,
            "dataset": "emnist",
            "emnist_dir": str(directory),
            "emnist_classifier_writers": EMNIST_HELD_OUT,
            **kw,
        }
    )


def test_emnist_classifier_writers_are_held_out_of_the_client_population(tmp_path):
    directory = _write_fake_emnist(tmp_path / "emnist")
    fed = fedgan_debug.load_clients(_emnist_config(directory))
    clients, held_out = set(fed.client_ids), set(fed.classifier_writers)
    assert not clients & held_out, (
        f"writers {sorted(clients & held_out)} are clients and train the app's classifier: "
        "the classifier must not see the population's data"
    )
    assert clients | held_out == set(EMNIST_WRITERS), (
        f"clients and held-out writers must cover all writers: missing "
        f"{sorted(set(EMNIST_WRITERS) - clients - held_out)}"
    )
    assert list(fed.classifier_writers) == EMNIST_WRITERS[-EMNIST_HELD_OUT:], (
        f"the last {EMNIST_HELD_OUT} writers in id order must be held out: "
        f"{fed.classifier_writers}"
    )
    assert fed.clients.num_clients == len(fed.client_ids), "one client per population writer"


def test_emnist_max_clients_caps_the_population_not_the_held_out_writers(tmp_path):
    directory = _write_fake_emnist(tmp_path / "emnist")
    fed = fedgan_debug.load_clients(_emnist_config(directory, emnist_max_clients=2))
    assert list(fed.client_ids) == EMNIST_WRITERS[:2], f"the first 2 writers: {fed.client_ids}"
    assert list(fed.classifier_writers) == EMNIST_WRITERS[-EMNIST_HELD_OUT:], (
        f"--emnist_max_clients must not change the held-out writers: {fed.classifier_writers}"
    )


def test_one_client_writers_data_does_not_change_the_app_classifier(tmp_path):
    # The classifier trained on TFF's test file, which holds the clients' own writers: one
    # user's data moved the classifier, so other users' accuracies and groups.
    client = EMNIST_WRITERS[1]
    trained = []
    for name, changed in (("same", None), ("changed", client)):
        config = _emnist_config(_write_fake_emnist(tmp_path / name, changed_writer=changed))
        fed = fedgan_debug.load_clients(config)
        assert client in fed.client_ids, f"the test changes client {client}: {fed.client_ids}"
        _, params = fedgan_debug.train_app_classifier(
            fed.healthy_images, fed.healthy_labels, fed.num_classes, 1, config.seed
        )
        trained.append(params)
    same = jax.tree.leaves(jax.tree.map(np.array_equal, *trained))
    assert all(same), (
        f"changing client {client}'s images and labels changed the app's classifier: it "
        "must train only on writers outside the client population"
    )


@pytest.mark.parametrize("value", ["0", str(len(EMNIST_WRITERS) - 1)])
def test_bad_emnist_classifier_writers_exits_2_naming_the_flag(tmp_path, value):
    # 0 holds no writer out; 7 of 8 writers leaves a population of 1 client.
    directory = _write_fake_emnist(tmp_path / "emnist")
    proc = run_binary(
        "experiments.fedgan_debug",
        "--dataset=emnist",
        f"--emnist_dir={directory}",
        f"--emnist_classifier_writers={value}",
        f"--workdir={tmp_path / 'workdir'}",
        check=False,
    )
    assert proc.returncode == 2, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert "--emnist_classifier_writers" in proc.stderr and "Traceback" not in proc.stderr, (
        f"the error must name --emnist_classifier_writers in one line: {proc.stderr[-2000:]}"
    )


def test_a_missing_emnist_file_exits_2_naming_emnist_dir(tmp_path):
    # It named --dataset, though the folder given was at fault (found by a docs audit).
    proc = run_binary("experiments.fedgan_debug", "--dataset=emnist",
                      f"--emnist_dir={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'w'}",
                      check=False)
    assert proc.returncode == 2 and "error: --emnist_dir:" in proc.stderr, (
        f"exit {proc.returncode}: {proc.stderr[-1000:]}")


def test_held_out_and_capped_population_must_fit_in_the_writers():
    with pytest.raises(fedgan_debug.ConfigError) as raised:
        fedgan_debug.split_emnist_writers(EMNIST_WRITERS, 3, max_clients=6)
    assert raised.value.field == "emnist_classifier_writers", (
        f"6 clients + 3 held-out writers do not fit in 8: must name the flag, {raised.value}"
    )


def test_emnist_classifier_writers_is_pinned_for_resume():
    # It changes the population: a rerun with another value must not resume the GANs.
    assert "emnist_classifier_writers" not in fedgan_debug.RESUMABLE_FIELDS, (
        "--emnist_classifier_writers changes the client population: it must not be resumable"
    )


def test_summary_and_report_say_the_classifier_data_is_outside_the_population(tiny_run):
    workdir, _, summary = tiny_run
    source = summary["classifier_training_data"]
    assert "not the clients'" in source, f"summary must say what the classifier saw: {source}"
    report = " ".join((workdir / "report.md").read_text().split())
    assert source in report, "report.md must name the classifier's training data"
    assert "public" not in report, "the classifier's data is held out, not called public"


@pytest.mark.slow  # ~10 min on 2 cores beside another slow test (601 s, stop 69)
def test_demo_runs_through_on_two_cpu_devices(tmp_path):
    # Without a wait for each round, XLA:CPU deadlocked here at rounds 29-45 of the first
    # GAN, before its first evaluation (round 50) read a result: one device never joined
    # the round's all-reduce (`dpfed.federated.mesh.settle`). A deadlock never ends: the
    # limit is twice what the run takes beside another slow test (it passed 900 s at
    # load 4-10).
    run_binary("experiments.fedgan_debug", f"--workdir={tmp_path}",
               "--flagfile=launch/demo.flags", "--rounds=80",
               env=with_fusion_emitters(cpu_devices_env(2)), timeout=1800)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["environment"]["device_count"] == 2, "the run must use 2 CPU devices"


def test_the_buggy_clients_are_drawn_from_the_seed():
    buggy = [fedgan_debug.load_clients(fedgan_debug.DebugConfig(**{**TINY, "seed": seed})).buggy
             for seed in (0, 1)]
    assert not np.array_equal(*buggy), (
        "seeds 0 and 1 made the same clients buggy: the bug injection must use --seed")


def test_save_grid_puts_sample_i_in_row_i_div_side_and_column_i_mod_side(tmp_path):
    side, size, gap = 3, 4, 2
    shades = np.arange(side * side, dtype=np.float32) / (side * side - 1)
    images = np.broadcast_to(shades[:, None, None, None], (side * side, size, size, 1))
    fedgan_debug.save_grid(tmp_path / "grid.png", images, side=side)
    grid = np.asarray(Image.open(tmp_path / "grid.png"), np.float32)[::2, ::2] / 255.0  # 2x PNG
    for i, shade in enumerate(shades):
        row, col = divmod(i, side)
        top, left = gap + row * (size + gap), gap + col * (size + gap)
        np.testing.assert_allclose(
            grid[top : top + size, left : left + size], shade, atol=1 / 255,
            err_msg=f"tile ({row}, {col}) of the grid must show sample {i}")


def test_summary_inverted_fractions_are_the_polarity_of_the_released_gans_samples(tiny_run):
    workdir, config, summary = tiny_run
    key = jax.random.fold_in(jax.random.key(config.seed), 7)  # the demo's sampling key
    for name in fedgan_debug.GROUPS:
        gan_config, g_variables = fedgan.load_generator_variables(Workdir(workdir / f"gan_{name}"))
        samples = fedgan.sample_images(gan_config, g_variables, key, config.num_samples)
        assert summary[f"inverted_fraction_{name}"] == polarity.inverted_fraction(samples), (
            f"gan_{name}: the summary's inverted fraction must be the polarity check of the "
            "released G's samples, which are in [0, 1]")


def test_a_diverged_gan_gives_no_verdict_on_the_bug(tiny_run):
    # NaN samples have an inverted fraction of 0: the report said "Bug not found".
    workdir, config, summary = tiny_run
    diagnostics = Workdir(workdir).read_json(selection.DIAGNOSTICS_JSON)
    assert summary["diverged"] is False, "the tiny run's GANs stay finite"
    broken = {**summary, "gan_high": {**summary["gan_high"], "diverged": True}}
    report = fedgan_debug.render_report(config, broken, diagnostics)
    assert "**No verdict**: the high-accuracy GAN diverged" in report, report[:2000]
    assert "**Bug " not in report, "no bug verdict from a diverged GAN's samples"


def test_a_cohort_larger_than_the_second_group_is_refused_before_either_gan_trains(
    tmp_path, monkeypatch
):
    # Before, the low group's GAN trained (at the paper's settings, hours) before the
    # high group's size was checked, and the rerun with the lowered --clients_per_round
    # that the error asked for was then refused: gan_low/ pinned the old value.
    _skip_the_app_classifier(monkeypatch)
    monkeypatch.setattr(selection, "client_accuracies",
                        lambda *args: np.linspace(0.0, 1.0, TINY["num_clients"]))

    def train_gan(*args, group, **kwargs):
        raise AssertionError(f"the {group} GAN trained before both groups were checked")

    monkeypatch.setattr(fedgan, "train_gan", train_gan)
    config = fedgan_debug.DebugConfig(**{**TINY, "low_threshold": 0.5, "high_threshold": 0.99})
    with pytest.raises(fedgan_debug.ConfigError, match="1 clients of the high-accuracy group"):
        fedgan_debug.run(config, str(tmp_path), log=lambda _: None)
    assert not (tmp_path / "gan_low").exists(), "no GAN may train when a group is too small"


# --group_sampling=population: rounds sample all clients, group sizes are noised.

POPULATION = {**TINY, "rounds": 1, "clients_per_round": 4, "sampling": "poisson",
              "group_sampling": "population", "low_threshold": 0.3, "high_threshold": 0.7}


@pytest.fixture(scope="module")
def population_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fedgan_population")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # Accuracies 0.31 ... 1: the high group (>= 0.7) holds 11 clients, the low one
        # (<= 0.3) none, and trains all the same: refusing it would tell this population
        # apart from its neighbour with one low-accuracy user.
        _skip_the_app_classifier(monkeypatch)
        monkeypatch.setattr(selection, "client_accuracies",
                            lambda *args: np.linspace(0.31, 1.0, TINY["num_clients"]))
        # Under a secret seed: the run is also the secret-seed test's (the sizes' noise too).
        seed = Workdir(workdir).pin_seed(0, secret=True)
        config = fedgan_debug.DebugConfig(**{**POPULATION, "seed": seed, "secret_seed": True})
        summary = fedgan_debug.run(config, str(workdir), log=lambda _: None)
        return workdir, summary, fedgan_debug.run(config, str(workdir), log=lambda _: None)


def test_population_sampling_releases_noised_sizes_and_is_end_to_end(population_run):
    workdir, summary, _ = population_run
    debug_checks.assert_population_sampled_end_to_end(
        workdir, summary, {"gan_low": "low", "gan_high": "high"}, TINY["num_clients"],
        POPULATION["clients_per_round"])
    debug_checks.assert_releases_hold_none_of(workdir, ("gan_low", "gan_high"), RAW_KEYS)


def test_population_sampling_trains_an_empty_group_instead_of_refusing_it(population_run):
    workdir, summary, _ = population_run
    truth = Workdir(workdir).read_json(selection.DIAGNOSTICS_JSON)["groups"]
    assert (truth["low"]["num_clients"], truth["high"]["num_clients"]) == (0, 11), truth
    assert summary["gan_low"]["rounds"] == POPULATION["rounds"], (
        f"the empty group's GAN must train its rounds on noise: {summary['gan_low']}")
    assert summary["gan_low"]["epsilon_rdp"] == summary["gan_high"]["epsilon_rdp"], (
        "an empty group's rounds are accounted as any group's (q = m / N)")


def test_population_sampling_rerun_releases_nothing_new(population_run):
    _, summary, again = population_run
    assert again["epsilon_rdp"] == summary["epsilon_rdp"], "a rerun must not spend more"
    assert again["gan_low"]["num_clients_noised"] == summary["gan_low"]["num_clients_noised"], (
        "a rerun must divide by the same noised sizes: fresh draws would be a second release")


@pytest.mark.parametrize("settings, field", [
    ({"sampling": "fixed"}, "sampling"), ({"group_size_noise": 0.0}, "group_size_noise")])
def test_population_sampling_needs_poisson_cohorts_and_noise_on_the_sizes(settings, field):
    with pytest.raises(fedgan_debug.ConfigError) as error:
        fedgan_debug.DebugConfig(**{**POPULATION, **settings})
    assert error.value.field == field, f"the error must name --{field}: {error.value}"


def test_population_sampling_checks_each_groups_noise_split_before_either_gan_trains(
    tmp_path, monkeypatch
):
    # Adaptive clipping's count noise grows with the engine's divisor: with population
    # sampling a group's (q x its noised size) is below --clients_per_round, so a z that
    # the config's check of m = 20 lets through (2 x 20 / 20 = 2) cannot be split for the
    # smaller noised group (of 7 users in 24: 2 x q x its size / 20 < 1.5); the engine
    # would raise in that group's GAN, a traceback, after the other had trained.
    _skip_the_app_classifier(monkeypatch)
    monkeypatch.setattr(selection, "client_accuracies",
                        lambda *args: np.linspace(0.0, 1.0, TINY["num_clients"]))
    monkeypatch.setattr(fedgan, "train_gan", lambda *a, **k: pytest.fail("a GAN trained"))
    config = fedgan_debug.DebugConfig(**{**POPULATION, "clients_per_round": 20,
                                         "adaptive_clipping": True, "noise_multiplier": 1.5})
    with pytest.raises(fedgan_debug.ConfigError) as error:
        fedgan_debug.run(config, str(tmp_path), log=lambda _: None)
    noised = Workdir(tmp_path).read_json(group_sizes.GROUP_SIZES_FILE)["noised_sizes"]
    divisor = 20 / TINY["num_clients"] * min(noised.values())
    bound = 2 * fedgan_debug.ADAPTIVE_CLIPPING.count_stddev(divisor)
    assert bound < 1.5, f"the test needs a group whose split fails: {noised}"
    assert error.value.field == "noise_multiplier", error.value
    assert f"must be below {bound:.4g}" in str(error.value), (
        f"the bound must be the smaller group's, {bound:.4g}: {error.value}")

    # The rerun the message asks for, in this workdir: it reuses the released sizes
    # (`selection.TRAINING_FIELDS`) and gets as far as the first GAN.
    class FirstGanError(Exception):
        pass

    def first_gan(*args, **kwargs):
        raise FirstGanError

    monkeypatch.setattr(fedgan, "train_gan", first_gan)
    with pytest.raises(FirstGanError):
        fedgan_debug.run(dataclasses.replace(config, noise_multiplier=bound / 2),
                         str(tmp_path), log=lambda _: None)
    again = Workdir(tmp_path).read_json(group_sizes.GROUP_SIZES_FILE)["noised_sizes"]
    assert again == noised, f"the rerun must reuse the released sizes {noised}, not {again}"


def test_a_secret_seed_and_the_groups_seeds_are_in_no_file_but_secret_seed_json(
        population_run):
    # Both GANs' seeds derive from the secret one, and with population sampling the group
    # sizes' noise too: none may be guessable (31 bits) or written where it is released.
    # The population run's workdir, after its rerun (which reads the seed back).
    tmp_path, summary, _ = population_run
    seed = Workdir(tmp_path).read_json("secret_seed.json")["seed"]
    secrets = [seed, *(selection.group_seed(seed, name) for name in fedgan_debug.GROUPS)]
    assert all(s >= 2**32 for s in secrets), f"a seed derived from the secret is short: {secrets}"
    leaking = [str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")
               if path.is_file() and path.name != "secret_seed.json"
               and any(str(s).encode() in path.read_bytes() for s in secrets)]
    assert not leaking, f"a secret seed's digits are in {leaking}: anyone can undo the noise"
    assert summary["seed"] == "secret" and summary["flags"]["seed"] == "secret", summary["seed"]
    for name in ("gan_low", "gan_high"):
        group = Workdir(tmp_path / name)
        assert group.read_json("summary.json")["seed"] == "secret", f"{name}'s seed is shown"
        assert group.read_json("config.json")["secret_seed"], f"{name}'s config lost the flag"


# --audit_canaries: each group's GAN audited with its own canary users (Poisson cohorts).

AUDIT = {**TINY, "sampling": "poisson", "audit_canaries": 20}


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fedgan_audit")
    with pytest.MonkeyPatch.context() as monkeypatch:
        # The audit needs the GANs, not the app's classifier: quantile groups of 6 clients
        # from distinct accuracies (the tiny run trains and evaluates the classifier).
        _skip_the_app_classifier(monkeypatch)
        monkeypatch.setattr(selection, "client_accuracies",
                            lambda *args: np.linspace(0.0, 1.0, TINY["num_clients"]))
        config = fedgan_debug.DebugConfig(**AUDIT)
        summary = fedgan_debug.run(config, str(workdir), log=lambda _: None)
        return workdir, summary, fedgan_debug.run(config, str(workdir), log=lambda _: None)


# slow: ~25 s (its module run); the fast suite keeps fedlm_debug's audit test (the debug demos'
# shared audit.json per model, report lines and rerun) and test_fedgan's one-round audit
@pytest.mark.slow
def test_an_audit_run_writes_each_gans_canary_figures_beside_its_ledger(audit_run):
    workdir, summary, _ = audit_run
    written = Workdir(workdir).read_json("audit.json")
    assert written == summary["audit"] and set(written) == {"gan_low", "gan_high"}, written
    for name, figures in written.items():
        gan_dir = Workdir(workdir / name)
        assert gan_dir.read_json("audit.json") == figures, f"{name}/audit.json differs"
        ledger = gan_dir.read_json("ledger.json")
        assert figures["ledger_epsilon_rdp"] == ledger["epsilon_rdp"] == summary[name][
            "epsilon_rdp"], f"{name}'s audit is not beside its own ledger's eps: {figures}"
        assert figures["inserted"] + figures["held_out"] == 2 * AUDIT["audit_canaries"], (
            f"{name}: 2K candidates, each inserted by a coin: {figures}")
        assert figures["epsilon_lower_bound"] <= figures["ledger_epsilon_rdp"], (
            f"{name}'s audit proves more eps than its ledger records: {figures}")
    assert written["gan_low"] != written["gan_high"], "the two GANs' audits are one"
    report = (workdir / "report.md").read_text()
    privacy = report[report.index("## Privacy"):report.index("## Settings")]
    assert privacy.count("canary audit") == 2, f"one audit line per GAN: {privacy}"


@pytest.mark.slow  # shares audit_run with the test above
def test_a_rerun_of_an_audit_run_keeps_its_figures(audit_run):
    _, summary, again = audit_run
    assert again["audit"] == summary["audit"], "rerunning a finished audit run changed them"


def test_an_audit_on_a_non_private_demo_names_its_zero_noise():
    with pytest.raises(ConfigError) as raised:
        fedgan_debug.DebugConfig(**{**AUDIT, "noise_multiplier": 0.0})
    assert raised.value.field == "audit_canaries", raised.value
    assert "--noise_multiplier=0" in raised.value.message, (
        f"the demo has no --nodp: the error must name its own setting: {raised.value}")


def test_adaptive_clipping_without_noise_is_refused():
    # At z 0 the engine would release the raw fraction of unclipped updates under the name
    # `noised_unclipped_fraction` (a red-team finding of stop 66); fedavg refuses it too.
    with pytest.raises(ConfigError) as raised:
        fedgan_debug.DebugConfig(**{**TINY, "adaptive_clipping": True, "noise_multiplier": 0.0})
    assert raised.value.field == "adaptive_clipping", raised.value
    assert "--noise_multiplier=0" in raised.value.message, raised.value
    # z 0.1 is below the count query's multiplier 2 sb = 0.2 at 2 clients: it can be split.
    fedgan_debug.DebugConfig(**{**TINY, "adaptive_clipping": True, "noise_multiplier": 0.1})
