"""tests/crash_points.py: its checks, and the binaries killed at their riskiest writes."""

import collections
import json
import math
import pathlib
import re
import time

import pytest

from dpfed.eval import inception
from tests import crash_points
from tests.binary import run_binary

_GAN = crash_points.BINARIES["fedgan_debug"]["group"]


def _write(path: pathlib.Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _ledger(events: int, eps: float) -> dict:
    return {"epsilon_rdp": eps, "num_releases": events, "events": [{"e": i} for i in range(events)]}


def _finished_model(workdir: pathlib.Path, name: str) -> None:
    _write(workdir / name / "ledger.json", _ledger(2, 2.0))
    _write(workdir / name / "metrics.jsonl", '{"round": 1, "epsilon_rdp": 1.0}\n'
           '{"round": 2, "epsilon_rdp": 2.0}\n')
    _write(workdir / name / "summary.json", {"wall_seconds": 3.0, "epsilon_rdp": 2.0})


@pytest.fixture
def whole(tmp_path) -> pathlib.Path:
    """A finished fedgan_debug-like workdir: two models, a summary and a report."""
    workdir = tmp_path / "whole"
    for name in _GAN.models:
        _finished_model(workdir, name)
    _write(workdir / "summary.json", {"epsilon_rdp": 2.0, "wall_seconds": 7.0})
    _write(workdir / "report.md", "# Report\n\neps 2.0\n\nwall time 7 s\n")
    return workdir


def test_a_killed_workdir_with_every_release_counted_passes(whole, tmp_path):
    killed = tmp_path / "killed"
    _finished_model(killed, "gan_low")
    _write(killed / "gan_high" / "ledger.json", _ledger(1, 1.0))
    _write(killed / "gan_high" / "metrics.jsonl", '{"round": 1, "epsilon_rdp": 1.0}\n')
    crash_points.check_crashed(_GAN, killed, whole)


@pytest.mark.parametrize("record", [
    '{"round": 2, "epsilon_rdp": 2.0}',
    # Local DP logs no central eps (None) but the worst client's, which ledger.json states.
    '{"round": 2, "epsilon_rdp": null, "epsilon_rdp_worst_client": 2.0}',
])
def test_a_metrics_record_past_its_ledger_fails(whole, tmp_path, record):
    killed = tmp_path / "killed"
    _write(killed / "gan_low" / "ledger.json", _ledger(1, 1.0))
    _write(killed / "gan_low" / "metrics.jsonl", '{"round": 1, "epsilon_rdp": 1.0}\n'
           f"{record}\n")
    with pytest.raises(AssertionError, match="at eps 2.0 that no ledger.json counts"):
        crash_points.check_crashed(_GAN, killed, whole)


def test_a_summary_beside_a_short_ledger_fails(whole, tmp_path):
    killed = tmp_path / "killed"
    _finished_model(killed, "gan_low")
    _write(killed / "gan_high" / "ledger.json", _ledger(1, 1.0))
    _write(killed / "report.md", "# Report\n")
    with pytest.raises(AssertionError, match="gan_high/ledger.json"):
        crash_points.check_crashed(_GAN, killed, whole)


def test_group_sizes_without_their_ledger_fail(whole, tmp_path):
    killed = tmp_path / "killed"
    _write(killed / "group_sizes.json", {"noised_sizes": {"low": 3}})
    with pytest.raises(AssertionError, match="without group_sizes_ledger.json"):
        crash_points.check_crashed(_GAN, killed, whole)


_NODP = crash_points.BINARIES["dpsgd_classifier"]["nodp"]


@pytest.fixture
def nodp_whole(tmp_path) -> pathlib.Path:
    """A finished --nodp workdir: records, summary and report, no ledger."""
    workdir = tmp_path / "nodp_whole"
    _write(workdir / "metrics.jsonl", '{"step": 1, "epsilon_rdp": null}\n'
           '{"step": 2, "epsilon_rdp": null}\n')
    _write(workdir / "summary.json", {"epsilon_rdp": None, "epsilon_pld": None})
    _write(workdir / "report.md", "# Report\n\nnon-private\n")
    return workdir


@pytest.mark.parametrize("name, content, message", [
    ("ledger.json", _ledger(1, 1.0), "./ledger.json written, but the uninterrupted run keeps"),
    ("metrics.jsonl", '{"step": 1, "epsilon_rdp": 0.5}\n', "at eps 0.5 that no ledger.json"),
    ("summary.json", {"epsilon_rdp": None, "epsilon_pld": 0.4}, "summary.json states "
     "{'epsilon_pld': 0.4} without a ledger.json"),
    ("eval.json", {"privacy": {"epsilon_rdp": 1.0}}, "eval.json states"),
])
def test_a_nodp_run_that_leaves_a_ledger_or_an_eps_fails(nodp_whole, tmp_path, name, content,
                                                         message):
    # A --nodp run spends nothing: its (a) is that nothing it leaves claims a guarantee.
    killed = tmp_path / "killed"
    _write(killed / "metrics.jsonl", '{"step": 1, "epsilon_rdp": null}\n')
    _write(killed / "summary.json", {"epsilon_rdp": None, "epsilon_pld": None})
    crash_points.check_crashed(_NODP, killed, nodp_whole)
    _write(killed / name, content)
    with pytest.raises(AssertionError, match=re.escape(message)):
        crash_points.check_crashed(_NODP, killed, nodp_whole)


def test_every_trainer_mode_passes_its_binarys_flag_checks():
    # A sweep of a mode whose flags its binary now refuses (`cli.refuse_unused`) would
    # only find out by hand; `experiments.evaluate` has no trainer to stop at: left out.
    commands = collections.defaultdict(dict)
    for name, modes in crash_points.BINARIES.items():
        for mode, binary in modes.items():
            for stage in (binary, binary.prepared):
                if stage is not None and stage.module != "experiments.evaluate":
                    commands[stage.module][f"{name} {mode}"] = list(stage.flags)
    refused = {}
    for module, modes in commands.items():
        result = run_binary("tests.flag_dry_run", module, json.dumps(list(modes.values())),
                            check=False)
        assert result.returncode == 0, f"{module}: the dry run failed:\n{result.stderr[-3000:]}"
        outcomes = json.loads(result.stdout.strip().splitlines()[-1])
        refused.update({m: o for m, o in zip(modes, outcomes, strict=True) if o != "ok"})
    assert not refused, f"crash-sweep modes their binary refuses: {refused}"


def test_a_check_reads_a_missing_model_folder_without_creating_it(whole, tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    crash_points.check_crashed(_GAN, killed, whole)
    assert not any(killed.iterdir()), "checking must leave the killed workdir as it was"


def test_same_workdir_ignores_wall_times_and_checkpoints(whole, tmp_path):
    resumed = tmp_path / "resumed"
    for name in _GAN.models:
        _finished_model(resumed, name)
        _write(resumed / name / "summary.json", {"wall_seconds": 9.0, "epsilon_rdp": 2.0})
        _write(resumed / name / "checkpoints" / "2" / "state", "x")
    _write(resumed / "summary.json", {"epsilon_rdp": 2.0, "wall_seconds": 99.0})
    _write(resumed / "report.md", "# Report\n\neps 2.0\n\nwall time 99 s\n")
    _write(resumed / "unreplayed.jsonl", '{"round": 2}\n')
    crash_points.assert_same_workdir(whole, resumed)


@pytest.mark.parametrize("name, content, message", [
    ("gan_high/metrics.jsonl", '{"round": 1, "epsilon_rdp": 1.0}\n', "metrics.jsonl differs"),
    ("samples_low.png", "png", "files: \\['samples_low.png'\\] extra"),
    ("report.md", "# Report\n\neps 3.0\n", "report.md differs"),
])
def test_same_workdir_finds_a_lost_record_an_extra_file_or_another_eps(
    whole, tmp_path, name, content, message
):
    resumed = tmp_path / "resumed"
    for model in _GAN.models:
        _finished_model(resumed, model)
    _write(resumed / "summary.json", {"epsilon_rdp": 2.0, "wall_seconds": 7.0})
    _write(resumed / "report.md", "# Report\n\neps 2.0\n\nwall time 7 s\n")
    _write(resumed / name, content)
    with pytest.raises(AssertionError, match=message):
        crash_points.assert_same_workdir(whole, resumed)


# The riskiest write points of each binary, named by (path, occurrence, kind): killed
# between a round's ledger and its metrics record, in a checkpoint written but not yet
# renamed into place, between the models, and before the whole run's summary or report.
_RISKY = {
    ("fedgan_debug", "group"): [
        ("gan_high/metrics.jsonl", 2, "append"),  # round 2's ledger written, not its record
        ("gan_high/checkpoints/1", 1, "checkpoint-rename"),  # a checkpoint half in place
        ("samples_low.png", 1, "file"),  # the first GAN released, its grid not yet
        ("report.md", 1, "file"),  # the summary written, the report not
    ],
    ("fedlm_debug", "population"): [
        ("group_sizes.json", 1, "file"),  # the sizes' ledger written, the sizes not drawn
        ("lm_low_oov/metrics.jsonl", 1, "append"),  # the second LM's first ledger only
        ("lm_low_oov/checkpoints/2", 1, "checkpoint-rename"),
        ("summary.json", 1, "file"),
    ],
    ("dpd_fvae", "local"): [
        ("metrics.jsonl", 2, "append"),
        ("checkpoints/1", 1, "checkpoint-rename"),
        ("decoder.msgpack", 1, "file"),  # the final ledger (with PLD) written, nothing else
    ],
    ("dpsgd_classifier", "default"): [
        ("metrics.jsonl", 2, "append"),  # step 2's ledger written, not its record
        ("summary.json", 1, "file"),  # the final ledger (with PLD) written, no summary
    ],
    ("dpsgd_classifier", "secret"): [
        ("summary.json", 1, "file"),  # released under the secret seed, not yet summarised
    ],
    ("fedavg_classifier", "adaptive"): [
        # round 1's record and diagnostics logged, its checkpoint (the clip norm) not in place
        ("checkpoints/1", 1, "checkpoint-rename"),
        ("diagnostics.jsonl", 2, "append"),  # round 2's record logged, not its diagnostics
    ],
    ("datalens", "default"): [
        ("checkpoints/2", 1, "checkpoint-rename"),
        ("synthetic.npz", 1, "file"),  # the generator released, its synthetic set not
    ],
    ("evaluate", "datalens"): [
        ("report.md", 1, "file"),  # eval.json written, the report's section not
    ],
    ("dpsgd_classifier", "target"): [
        # step 2's ledger written, not its record: the resume keeps checkpoint 1's calibrated z
        ("metrics.jsonl", 2, "append"),
        ("summary.json", 1, "file"),  # a finished run's rerun: the z its last step used
    ],
    ("dpsgd_classifier", "nodp"): [
        ("metrics.jsonl", 2, "append"),  # no ledger: resumed from checkpoint 1's state alone
    ],
    ("dpsgd_classifier", "audit"): [
        ("audit.json", 1, "file"),  # trained with canaries, their figures not yet written
    ],
    ("fedavg_classifier", "fixed"): [
        # round 1's record logged, its checkpoint not in place: round 1's cohort drawn again
        ("checkpoints/1", 1, "checkpoint-rename"),
    ],
    ("fedavg_classifier", "nodp"): [
        ("diagnostics.jsonl", 2, "append"),
    ],
    ("fedavg_classifier", "target"): [
        # round 2's ledger written, not its record: the resume keeps checkpoint 1's calibrated z
        ("metrics.jsonl", 2, "append"),
    ],
    ("fedavg_classifier", "secret"): [
        ("summary.json", 1, "file"),  # released under the secret seed, not yet summarised
    ],
    ("fedavg_classifier", "audit"): [
        ("audit.json", 1, "file"),  # trained with canaries, their figures not yet written
    ],
    ("fedlm_debug", "audit"): [
        ("lm_low_oov/audit.json", 1, "file"),  # the second LM released, its audit not written
        ("audit.json", 1, "file"),  # both LMs' audits written, the workdir's not
    ],
    ("dpd_fvae", "audit"): [
        ("audit.json", 1, "file"),  # trained with canaries, their figures not yet written
    ],
    ("datalens", "audit"): [
        ("checkpoints/1", 1, "checkpoint-rename"),  # step 1's sums of scores not in place
        ("audit.json", 1, "file"),  # trained with canaries, their figures not yet written
    ],
    ("evaluate", "synthetic"): [
        ("eval.json", 1, "file"),  # the figures written, eval.json not
    ],
    ("evaluate", "inception"): [
        ("eval.json", 1, "file"),  # fid_inception computed and the figures written, eval.json not
    ],
}
# The point `make test` runs (~15 s with its mode's reference run); the rest are slow.
# DP-SGD's target and nodp points at metrics.jsonl 2 were fast too (~21 s by the stop-64
# profile): the fast suite keeps DP-SGD's kills inside its writes (tests/test_crash_writes.py)
# and the library's calibrated kill (tests/train/test_dpsgd.py).
_FAST = {
    (("fedavg_classifier", "fixed"), "checkpoints/1", 1),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each binary's mode, made once (the point's reference)."""
    runs: dict[tuple[str, str], tuple[pathlib.Path, crash_points.Run]] = {}

    def get(key: tuple[str, str]) -> tuple[pathlib.Path, crash_points.Run]:
        if key not in runs:
            whole = tmp_path_factory.mktemp(f"{key[0]}_{key[1]}") / "whole"
            runs[key] = whole, crash_points.uninterrupted(crash_points.BINARIES[key[0]][key[1]],
                                                          whole)
        return runs[key]

    return get


# Slow but the `_FAST` ones: ~25 s a point on 2 cores, ~25 s more for each binary's
# reference run (a few seconds each for the classifiers at their tiny flags).
@pytest.mark.parametrize("key, path, occurrence, kind", [
    pytest.param(key, *point, id=f"{key[0]}-{key[1]}-{point[2]}-{point[0]}-{point[1]}",
                 marks=() if (key, *point[:2]) in _FAST else pytest.mark.slow)
    for key, points in _RISKY.items() for point in points])
def test_killed_at_a_risky_write_resumes_like_uninterrupted(
    uninterrupted, tmp_path, key, path, occurrence, kind
):
    whole, reference = uninterrupted(key)
    point = crash_points.point_number(reference, path, occurrence, kind)
    crash_points.crash_and_rerun(
        crash_points.BINARIES[key[0]][key[1]], whole, tmp_path / "killed", point)


def test_a_groups_samples_need_only_that_groups_whole_ledger(whole, tmp_path):
    # fedgan_debug writes samples_low.png once the low GAN is done, before the high one.
    killed = tmp_path / "killed"
    _finished_model(killed, "gan_low")
    _write(killed / "samples_low.png", "png")
    crash_points.check_crashed(_GAN, killed, whole)
    _write(killed / "samples_high.png", "png")
    with pytest.raises(AssertionError, match="samples_high.png"):
        crash_points.check_crashed(_GAN, killed, whole)


def test_a_flag_names_the_workdir_where_it_says_so(tmp_path):
    # evaluate's --cache_dir={workdir}/extractor_cache: the extractor cache's writes are
    # points of the run, and compared with the uninterrupted run's.
    binary = crash_points.Binary("m", ("--a=1", "--cache_dir={workdir}/cache"), ("",))
    assert binary.args(tmp_path / "w") == [
        "--a=1", f"--cache_dir={tmp_path / 'w'}/cache", f"--workdir={tmp_path / 'w'}"]


def test_a_flag_names_the_inception_weights_a_file_made_once_outside_the_workdir(
    tmp_path, monkeypatch
):
    # evaluate's --inception_weights={inception_weights}: a user's input, in the real file's
    # format (the loader accepts it), made only where a flag names it, once per process.
    monkeypatch.setattr(crash_points, "_INPUTS", {})
    crash_points.Binary("m", ("--a=1",), ("",)).args(tmp_path / "w")
    assert not crash_points._INPUTS, "a binary not naming the weights made them"  # noqa: SLF001
    binary = crash_points.Binary("m", ("--inception_weights={inception_weights}",), ("",))
    flag = binary.args(tmp_path / "w")[0]
    path = pathlib.Path(flag.removeprefix("--inception_weights="))
    assert not path.is_relative_to(tmp_path), f"the weights are in the workdir: {path}"
    inception.load_weights(path)
    assert binary.args(tmp_path / "w2")[0] == flag, "made again for another workdir"


def test_a_binary_with_a_prepared_one_starts_from_a_copy_of_its_workdir(tmp_path, monkeypatch):
    # The evaluation binary reads another binary's finished workdir: each run starts from a
    # copy; a rerun's workdir (there already) is left as the killed run left it.
    trainer = crash_points.Binary("experiments.trainer", (), ("",))
    evaluator = crash_points.Binary("experiments.evaluate", (), ("",), prepared=trainer)
    prepared = tmp_path / "prepared"
    _finished_model(prepared, "")
    monkeypatch.setitem(crash_points._PREPARED, trainer, prepared)  # noqa: SLF001
    crash_points._start_from(evaluator, tmp_path / "k1")  # noqa: SLF001
    assert (tmp_path / "k1" / "summary.json").exists(), "the prepared workdir, copied"
    (tmp_path / "k1" / "eval.json").write_text("{}")
    crash_points._start_from(evaluator, tmp_path / "k1")  # noqa: SLF001
    assert (tmp_path / "k1" / "eval.json").exists(), "a rerun's workdir is not replaced"
    crash_points._start_from(trainer, tmp_path / "k2")  # noqa: SLF001
    assert not (tmp_path / "k2").exists(), "a binary without a prepared one starts empty"


@pytest.mark.parametrize("name", ["synthetic.npz", "eval.json", "audit.json"])
def test_a_synthetic_set_or_an_evaluation_beside_a_short_ledger_fails(whole, tmp_path, name):
    # DataLens releases synthetic.npz; evaluate's eval.json states the ledger's eps, and an
    # audit run's audit.json too (fedgan_debug's: one entry per GAN, each its ledger's).
    killed = tmp_path / "killed"
    _finished_model(killed, "gan_low")
    _write(killed / "gan_high" / "ledger.json", _ledger(1, 1.0))
    _write(killed / name, "x")
    with pytest.raises(AssertionError, match=f"{name}.*gan_high/ledger.json"):
        crash_points.check_crashed(_GAN, killed, whole)


@pytest.mark.parametrize("key", ["eval_wall_seconds", "train_wall_seconds"])
def test_same_workdir_ignores_the_evaluations_wall_times(tmp_path, key):
    # eval.json states the evaluation's wall time and the training's (summary.json's).
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _write(whole / "eval.json", {"fid_domain": 1.5, key: 3.0})
    _write(resumed / "eval.json", {"fid_domain": 1.5, key: 30.0})
    crash_points.assert_same_workdir(whole, resumed)
    _write(resumed / "eval.json", {"fid_domain": 1.6, key: 3.0})
    with pytest.raises(AssertionError, match="eval.json differs"):
        crash_points.assert_same_workdir(whole, resumed)


def test_same_workdir_reads_each_workdirs_own_path_as_the_same(tmp_path):
    # eval.json names the workdir it evaluated (its source): each run's own.
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for workdir in (whole, resumed):
        _write(workdir / "eval.json", {"source": {"kind": "generator", "path": str(workdir)}})
    crash_points.assert_same_workdir(whole, resumed)
    _write(resumed / "eval.json", {"source": {"kind": "generator", "path": str(whole)}})
    with pytest.raises(AssertionError, match="eval.json differs"):
        crash_points.assert_same_workdir(whole, resumed)


def test_sigkill_draws_its_times_within_the_binarys_run_not_its_preparation(
    tmp_path, monkeypatch
):
    # evaluate's first run copies a DataLens workdir it first trains: the kills were drawn
    # within both runs' time, most after evaluate had ended.
    kill_times: list[float] = []

    def prepare(binary, workdir):
        if not workdir.exists():
            time.sleep(0.5)  # the prepared binary's run
            workdir.mkdir(parents=True)

    def kill_after(binary, workdir, seconds):
        prepare(binary, workdir)
        if seconds != math.inf:
            kill_times.append(seconds)
        return seconds != math.inf

    monkeypatch.setattr(crash_points, "_start_from", prepare)
    monkeypatch.setattr(crash_points, "_kill_after", kill_after)
    monkeypatch.setattr(crash_points, "check_crashed", lambda *args: None)
    monkeypatch.setattr(crash_points, "run", lambda *args: crash_points.Run(0, [], "", 0.0))
    monkeypatch.setattr(crash_points, "assert_same_workdir", lambda *args: None)
    crash_points.sigkill(_GAN, tmp_path, count=5, report=lambda _: None)
    assert len(kill_times) == 5 and max(kill_times) < 0.25, kill_times


def test_a_secret_mode_starts_each_new_workdir_with_its_secret_seed(tmp_path):
    binary = crash_points.BINARIES["dpsgd_classifier"]["secret"]
    crash_points._start_from(binary, tmp_path / "new")  # noqa: SLF001
    stored = json.loads((tmp_path / "new" / "secret_seed.json").read_text())
    assert stored["seed"] == binary.secret == crash_points.SECRET, (
        f"each run of a secret mode must draw from the one secret seed: {stored}")
    (tmp_path / "rerun").mkdir()
    crash_points._start_from(binary, tmp_path / "rerun")  # noqa: SLF001
    assert not (tmp_path / "rerun" / "secret_seed.json").exists(), (
        "a rerun's workdir is left as the killed run left it")


def test_a_secret_seed_written_anywhere_else_fails_d(tmp_path):
    binary = crash_points.BINARIES["dpsgd_classifier"]["secret"]
    crash_points._start_from(binary, tmp_path / "w")  # noqa: SLF001
    _write(tmp_path / "w" / "summary.json", {"seed": "secret"})
    crash_points.assert_secret_kept(binary, tmp_path / "w")  # the seed's own file only
    _write(tmp_path / "w" / "checkpoints" / "1" / "extra.json", {"seed": binary.secret})
    with pytest.raises(AssertionError, match="checkpoints/1/extra.json"):
        crash_points.assert_secret_kept(binary, tmp_path / "w")
