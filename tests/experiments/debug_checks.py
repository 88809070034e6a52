"""Checks shared by the two debug pipelines' tests (GAN and LM): what their releases hold."""

import pathlib

from dpfed.generative import group_sizes, selection
from dpfed.train.workdir import Workdir
from tests.binary import assert_resumed_like_uninterrupted, kill_after_checkpoint, run_binary

GROUND_TRUTH_HEADING = "## Simulation ground truth and diagnostics (not a DP release)"


def json_keys(obj) -> set[str]:
    """Every dict key at any depth of parsed JSON."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in json_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in json_keys(v)}
    return set()


def assert_releases_hold_none_of(workdir: pathlib.Path, groups, raw_keys) -> None:
    """summary.json and each group's metrics.jsonl hold none of `raw_keys`, at any depth."""
    releases = {"summary.json": Workdir(workdir).read_json("summary.json")}
    for name in groups:
        releases[f"{name}/metrics.jsonl"] = Workdir(workdir / name).read_metrics()
    for name, content in releases.items():
        leaked = json_keys(content) & set(raw_keys)
        assert not leaked, f"{name} is a release but holds raw-data figures {sorted(leaked)}"


def assert_summary_keeps_quantile_thresholds_out(summary: dict) -> None:
    """A run with quantile thresholds: summary.json holds None for both, not their values."""
    assert summary["thresholds_from_quantiles"], "TINY gives no thresholds: quantiles are used"
    assert summary["low_threshold"] is None and summary["high_threshold"] is None, (
        "a quantile threshold is a function of all clients' raw values: summary.json must "
        f"not hold it, got {summary['low_threshold']}, {summary['high_threshold']}"
    )


def read_labelled_diagnostics(workdir: pathlib.Path, groups, raw_group_keys) -> dict:
    """diagnostics.json of a run with quantile thresholds, after checking that it says it
    is not a DP release and holds each group's `raw_group_keys` and the thresholds used."""
    diagnostics = Workdir(workdir).read_json(selection.DIAGNOSTICS_JSON)
    assert "not a dp release" in diagnostics["note"].lower(), (
        f"diagnostics.json must say it is not a DP release: {diagnostics['note']!r}"
    )
    for group in groups:
        missing = set(raw_group_keys) - set(diagnostics["groups"][group])
        assert not missing, f"diagnostics.json group {group} lacks {sorted(missing)}"
    assert diagnostics["low_threshold"] < diagnostics["high_threshold"], (
        "diagnostics.json must hold the quantile thresholds the split used"
    )
    return diagnostics


def assert_ground_truth_only_after_releases(report: str, release_marker: str, labels) -> None:
    """The report shows `labels` only in its last section, ground truth, after `release_marker`."""
    assert GROUND_TRUTH_HEADING in report, "report.md needs a labelled ground-truth section"
    releases, _, truth = report.partition(GROUND_TRUTH_HEADING)
    assert release_marker in releases, "the ground truth must come after the release figures"
    for label in labels:
        assert label not in releases, f"ground truth {label!r} shown among the releases"
        assert label in truth, f"ground truth {label!r} missing from its section"
    assert "diagnostics.json" in truth, "the section must say where the figures are"
    assert "\n## " not in truth, (
        "the ground-truth section must be the report's last, so cutting it off before "
        "publishing keeps every release section")


def assert_caveat_of_quantiles_and_fixed_cohorts(workdir: pathlib.Path, summary: dict) -> None:
    """The summary's caveat names both reasons and the report's privacy section states it."""
    caveat = summary["guarantee_caveat"]
    assert caveat is not None and "quantiles" in caveat and "replace-one" in caveat, (
        f"TINY uses quantile thresholds and fixed cohorts: both must be named, got {caveat!r}"
    )
    privacy = (workdir / "report.md").read_text().partition("## Privacy")[2]
    assert caveat in " ".join(privacy.split()), "the report's privacy section must state it"


def assert_caveat_names_unnoised_group_sizes(summary: dict) -> None:
    """The summary's caveat says the group sizes are released without noise."""
    caveat = summary["guarantee_caveat"]
    assert caveat is not None and "released without noise" in caveat, (
        "each group's size counts users whose raw figure passes a threshold and is released "
        f"without noise (summary, report, ledger): the caveat must say so, got {caveat!r}"
    )
    assert "given the group sizes" in caveat, (
        f"the caveat must say that eps holds given the group sizes, got {caveat!r}"
    )


def assert_raw_log_lines_labelled(lines: list[str]) -> None:
    """Terminal lines showing the selection thresholds (raw data) carry the raw-data label."""
    raw = [line for line in lines if "threshold" in line]
    assert raw, "the run must log its selection thresholds (the check needs that line)"
    for line in raw:
        assert line.startswith(selection.RAW_LOG_PREFIX), (
            f"a terminal line shows raw-data thresholds without the label: {line!r}"
        )


def assert_killed_in_second_model_resumes(
    module: str,
    args: list[str],
    tmp_path: pathlib.Path,
    group_dirs: tuple[str, str],
    summary_keys: tuple[str, ...],
    params_key: str = "params_sha256",
    whole: pathlib.Path | None = None,
    step: int = 3,
) -> None:
    """SIGKILLs `module` once the second model (`group_dirs[1]`, trained second) has
    checkpointed round `step`, reruns it, and checks both sub-workdirs and `summary_keys`
    end as an uninterrupted run's: the groups are found again (pinned), the finished first
    model is left as it was, the second continues without losing or repeating a round.
    The uninterrupted run is `whole` (a finished workdir of the same settings, e.g. a
    module fixture's), or a run of `module args` made here when None."""
    if whole is None:
        whole = tmp_path / "whole"
        run_binary(module, *args, f"--workdir={whole}")
    killed = tmp_path / "killed"
    kill_after_checkpoint(
        module, *args, workdir=killed, step=step, checkpoints=f"{group_dirs[1]}/checkpoints")
    assert (killed / group_dirs[0] / "summary.json").exists(), "killed after the first model"
    run_binary(module, *args, f"--workdir={killed}")
    for name in group_dirs:
        assert_resumed_like_uninterrupted(
            whole / name, killed / name, step_key="round", params_key=params_key)
    finished, resumed = (Workdir(d).read_json("summary.json") for d in (whole, killed))
    for key in summary_keys:
        assert resumed[key] == finished[key], f"{key}: {resumed[key]} resumed vs {finished[key]}"
    models = sum(Workdir(killed / d).read_json("summary.json")["wall_seconds_earlier"]
                 for d in group_dirs)
    assert resumed["wall_seconds_earlier"] == models > 0, (
        "the demo's wall time must count what the models' checkpoints kept of the killed "
        f"invocation: {resumed['wall_seconds_earlier']} s vs {models} s")


def assert_population_sampled_end_to_end(
    workdir: pathlib.Path, summary: dict, groups: dict[str, str], population: int,
    clients_per_round: float,
) -> None:
    """A run with --group_sampling=population and given thresholds: its groups' sizes are
    released only noised (`group_sizes.json`, with their ledger), each group's rounds are
    accounted at q = m / the population, the max eps composes the sizes' release, and no
    caveat is left. `groups` maps a summary key (e.g. "gan_low") to its group's name."""
    wd = Workdir(workdir)
    noised = wd.read_json(group_sizes.GROUP_SIZES_FILE)["noised_sizes"]
    sizes_ledger = wd.read_json(group_sizes.GROUP_SIZES_LEDGER)
    assert sizes_ledger["unit"] == "user" and len(sizes_ledger["events"]) == 1, (
        f"the noised sizes are one release with its ledger: {sizes_ledger}")
    truth = wd.read_json(selection.DIAGNOSTICS_JSON)["groups"]
    for key, name in groups.items():
        result = summary[key]
        assert "num_clients" not in result, (
            f"{key}: the true group size is raw data, not a release: {sorted(result)}")
        assert result["num_clients_noised"] == noised[name], "the summary's size is the noised one"
        assert isinstance(truth[name]["num_clients"], int), "diagnostics.json keeps the true size"
        assert result["sampling_rate"] == clients_per_round / population, (
            f"{key}: rounds sample the population at q = m / N, got {result['sampling_rate']}")
        model = Workdir(workdir / key).read_json("ledger.json")
        assert model["metadata"]["num_users"] == population, (
            f"{key}'s ledger must name the population, not the group: {model['metadata']}")
        assert model["metadata"]["members_estimate"] == noised[name], (
            f"{key}'s mean must divide by q x the noised size: {model['metadata']}")
        assert result["epsilon_rdp_with_group_sizes"] > result["epsilon_rdp"], (
            f"{key}: composing the sizes' release must cost something")
        assert result["epsilon_pld_with_group_sizes"] > result["epsilon_pld"], (
            f"{key}: the PLD accountant composes the sizes' release too")
    assert summary["epsilon_rdp"] == max(
        summary[key]["epsilon_rdp_with_group_sizes"] for key in groups), (
        "the demo's eps is the max over the groups of each one's eps with the sizes' release")
    assert summary["guarantee_caveat"] is None, (
        f"given thresholds, Poisson, noised sizes: no caveat, got {summary['guarantee_caveat']}")
    assert "**End to end**" in (workdir / "report.md").read_text(), "the report must say so"

