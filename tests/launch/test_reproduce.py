"""End-to-end tests of launch/reproduce.py (subprocesses)."""

import json
import os
import shutil

import pytest

from tests.binary import ROOT, run_binary, with_fusion_emitters, workdir_locked_by_another_process


def _run(tmp_path, *args, env=None):
    # 1,800 s: the DPD-fVAE smoke table took 776 s on 2 cores beside one other slow test
    # (stop 69) and passed 900 s under more load; the limit only stops a hung table.
    return run_binary(
        "launch.reproduce", f"--out_dir={tmp_path / 'tables'}",
        f"--workdir_root={tmp_path / 'workdirs'}", f"--cache_dir={tmp_path / 'cache'}", *args,
        check=False, timeout=1800, env=env,
    )


def _smoke_table(tmp_path, table, env=None):
    proc = _run(tmp_path, f"--table={table}", "--scale=smoke", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return (tmp_path / "tables" / f"{table}.md").read_text()


def _check_rows(markdown, count):
    lines = markdown.splitlines()
    ours = [line for line in lines if line.startswith("| ours |")]
    assert len(ours) == count and not any("not run" in line for line in ours), markdown
    quoted = [line for line in lines if "*quoted, different data size/metric" in line]
    assert any("| DataLens |" in line for line in quoted), "quoted DataLens row missing"
    assert "scale: smoke" in markdown, "the smoke table must say it is one"
    return ours


def _check_smoke_digits(markdown):
    """Checks the smoke_digits table's two rows; returns them."""
    ours = _check_rows(markdown, 2)
    assert "| ∞ (non-private) |" in ours[0], f"ceiling row: {ours[0]}"
    cells = [cell.strip() for cell in ours[1].split("|")]
    assert cells[2:4] == ["DP-SGD LogReg (direct), eps 1", "digits"], f"DP-SGD row: {ours[1]}"
    assert 0.99 <= float(cells[4].split()[0]) <= 1.0, f"eps of the eps-1 row: {ours[1]}"
    return ours


def test_smoke_table_has_our_rows_and_quoted_rows(tmp_path):
    _check_smoke_digits(_smoke_table(tmp_path, "smoke_digits"))


# slow: ~20 s (two more row runs); the fast suite keeps the table's first run above and
# test_dpsgd's rerun of a finished calibrated run (the budget guard's crash, at the library)
@pytest.mark.slow
def test_a_rerun_of_a_finished_smoke_table_gives_the_same_figures(tmp_path):
    ours = _check_smoke_digits(_smoke_table(tmp_path, "smoke_digits"))
    # --rerun resumes each finished row from its workdir: the eps-1 row's rerun crashed
    # in the budget guard (0 steps left under a target; found by a docs audit).
    rerun = _run(tmp_path, "--table=smoke_digits", "--scale=smoke", "--rerun")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
    again = _check_rows((tmp_path / "tables" / "smoke_digits.md").read_text(), 2)

    def figures(row):  # all cells but the wall time
        return row.split("|")[:-2]

    assert [figures(r) for r in again] == [figures(r) for r in ours], (
        f"a rerun of finished rows must give the same figures: {again} vs {ours}")


@pytest.mark.slow
def test_dpsgd_mnist5k_smoke_table(tmp_path):
    ours = _check_rows(_smoke_table(tmp_path, "dpsgd_mnist5k", with_fusion_emitters()), 3)
    assert 9.9 <= float(ours[2].split("|")[4].split()[0]) <= 10.0, f"eps 10 row: {ours[2]}"


def test_collect_without_runs_marks_rows_not_run(tmp_path):
    proc = _run(tmp_path, "--table=dpsgd_mnist5k", "--collect")
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown = (tmp_path / "tables" / "dpsgd_mnist5k.md").read_text()
    assert markdown.count("not run / failed") == 3, markdown
    assert not (tmp_path / "workdirs" / "dpsgd_mnist5k" / "full" / "01_real_data" / "eval.json")\
        .exists(), "--collect ran a row"


def test_unknown_table_is_a_flag_error(tmp_path):
    proc = _run(tmp_path, "--table=no_such_table", "--collect")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --table:"), proc.stderr


def _one_row_table_with_an_eval_json(tmp_path):
    """A table "t" whose one row (binary: no_such_module) has an eval.json; its paths."""
    tables_dir = tmp_path / "specs"
    (tables_dir / "t").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "tables" / "reference_rows.json", tables_dir)
    (tables_dir / "t" / "table.json").write_text(
        json.dumps({"title": "T", "dataset": "digits", "quote": {"dataset": "MNIST"}})
    )
    flagfile = tables_dir / "t" / "01_row.flags"
    flagfile.write_text("# row: done row\n# binary: no_such_module\n")
    workdir = tmp_path / "workdirs" / "t" / "full" / "01_row"
    workdir.mkdir(parents=True)
    record = {"privacy": None, "source": {"kind": "real_data"}, "fid_domain": 1.5,
              "downstream": {"cnn": {"test_accuracy": 0.5}}, "eval_wall_seconds": 1.0}
    (workdir / "eval.json").write_text(json.dumps(record))
    return tables_dir, flagfile, workdir / "eval.json"


def _make_stale(flagfile, eval_json):
    """The flagfile changed after the row's eval.json was written."""
    stamp = eval_json.stat().st_mtime
    os.utime(flagfile, (stamp + 60, stamp + 60))


def test_rows_with_a_current_eval_json_are_skipped(tmp_path):
    tables_dir, _, _ = _one_row_table_with_an_eval_json(tmp_path)
    proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}")
    assert proc.returncode == 0, f"the finished row was run again:\n{proc.stdout}{proc.stderr}"
    assert "| ours | done row | digits | ∞ (non-private) |" in (
        tmp_path / "tables" / "t.md"
    ).read_text(), "the skipped row's results are missing"


def test_collect_leaves_out_a_stale_eval_json(tmp_path):
    tables_dir, flagfile, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    _make_stale(flagfile, eval_json)
    proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}", "--collect")
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown = (tmp_path / "tables" / "t.md").read_text()
    assert "not run / failed" in markdown and "| 50.0 |" not in markdown, (
        f"an eval.json older than its flagfile must not be shown as the row's result:\n{markdown}")
    assert "older than the flagfile" in proc.stdout, "--collect must say why the row is left out"


def test_a_row_that_runs_again_loses_its_old_eval_json_first(tmp_path):
    tables_dir, flagfile, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    _make_stale(flagfile, eval_json)
    proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}")
    assert proc.returncode == 1, "the row's binary does not exist: the run must fail"
    assert not eval_json.exists(), "a failed run must not leave the old run's eval.json"


@pytest.mark.slow
def test_datalens_smoke_table(tmp_path):
    ours = _check_rows(_smoke_table(tmp_path, "datalens", with_fusion_emitters()), 3)
    for row, target in ((ours[1], 1.0), (ours[2], 10.0)):
        eps = float(row.split("|")[4].split()[0])
        assert 0 < eps <= target, f"a DataLens row must stay within its target eps: {row}"


@pytest.mark.slow
def test_dpd_fvae_smoke_table(tmp_path):
    ours = _check_rows(_smoke_table(tmp_path, "dpd_fvae", with_fusion_emitters()), 11)
    for row in ours[3:]:  # the DP rows
        eps = float(row.split("|")[4].split()[0])
        assert 0 < eps <= 10.0, f"a DP row must stay within its target eps: {row}"


def test_rerun_runs_a_row_whose_eval_json_is_current(tmp_path):
    tables_dir, _, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}", "--rerun")
    assert proc.returncode == 1, (
        "--rerun must run the current row again (its binary does not exist, so the run fails): "
        f"{proc.stdout}{proc.stderr[-2000:]}")
    assert not eval_json.exists(), "the rerun row's old eval.json must be gone"


def _edit_flags(flagfile, eval_json):
    """A flag line of the row changed (not a comment) after its eval.json was written."""
    flagfile.write_text(flagfile.read_text() + "--steps=8\n")
    _make_stale(flagfile, eval_json)


def test_a_row_whose_flags_changed_starts_afresh_not_from_the_old_run(tmp_path):
    # Resumed, the old run would be shown as the edited row: a finished DP-SGD run asked
    # for more steps trained on with noise recalibrated to its spent budget (smoke_digits,
    # steps 4 -> 8: LogReg 15.9%; the 8-step row run afresh: 25.9%).
    tables_dir, flagfile, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    workdir = eval_json.parent
    (workdir / "checkpoints").mkdir()  # the old run's state, which a resume would load
    _edit_flags(flagfile, eval_json)
    proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}")
    assert proc.returncode == 1, "the row's binary does not exist: the run must fail"
    assert not (workdir / "checkpoints").exists(), (
        f"the edited row would resume the old flags' run:\n{proc.stdout}")
    asides = list(workdir.parent.glob("01_row.superseded-*"))
    assert len(asides) == 1 and (asides[0] / "checkpoints").is_dir(), (
        "the old run must be kept, moved aside")
    assert "moved to" in proc.stdout, proc.stdout


def test_a_rerun_of_unchanged_flags_resumes_its_workdir(tmp_path):
    tables_dir, _, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    (eval_json.parent / "checkpoints").mkdir()
    proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}", "--rerun")
    assert proc.returncode == 1, proc.stdout
    assert (eval_json.parent / "checkpoints").is_dir(), "--rerun must resume, not move aside"
    assert not list(eval_json.parent.parent.glob("01_row.superseded-*"))


def test_an_eval_json_of_other_flags_is_stale_even_when_newer(tmp_path):
    # The flagfile edited while its row ran: the eval.json written after the edit is
    # still the old flags' (a time comparison called it current).
    from dpfed.eval import tables as tables_lib
    from dpfed.train.workdir import Workdir
    from launch import reproduce

    tables_dir, flagfile, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    row = tables_lib.parse_row(flagfile)
    workdir = Workdir(eval_json.parent)
    workdir.write_json(reproduce.ROW_FILE, {"fingerprint": reproduce.fingerprint(row, "full")})
    flagfile.write_text(flagfile.read_text() + "--steps=8\n")
    stamp = flagfile.stat().st_mtime
    os.utime(eval_json, (stamp + 60, stamp + 60))
    assert not reproduce.is_current(row, workdir, "full")
    assert reproduce.superseded(row, workdir, "full")
    # A comment (the row's label) is no flag: editing it reruns nothing.
    workdir.write_json(reproduce.ROW_FILE, {"fingerprint": reproduce.fingerprint(row, "full")})
    flagfile.write_text(flagfile.read_text().replace("# row: done row", "# row: renamed"))
    assert reproduce.is_current(row, workdir, "full")


def test_the_fingerprint_of_a_smoke_row_holds_its_smoke_flags(tmp_path):
    # The smoke flags are a header comment: an edit of them must still make the row's
    # smoke-scale eval.json stale (it was run with the old ones).
    from dpfed.eval import tables as tables_lib
    from launch import reproduce

    flagfile = tmp_path / "01_row.flags"
    flagfile.write_text("# binary: b\n# smoke: --steps=2\n--lr=0.1\n")
    before = reproduce.fingerprint(tables_lib.parse_row(flagfile), "smoke")
    flagfile.write_text("# binary: b\n# smoke: --steps=4\n--lr=0.1\n")
    row = tables_lib.parse_row(flagfile)
    assert reproduce.fingerprint(row, "smoke") != before, (
        "a smoke row run with --steps=2 would be shown as the row with --steps=4")
    assert reproduce.fingerprint(row, "full") == reproduce.fingerprint(
        tables_lib.parse_row(flagfile), "full"), "the full scale ignores the smoke flags"


def test_the_fingerprint_of_a_row_holds_its_binary(tmp_path):
    # The binary is a header comment: a row moved to another binary with the same flags
    # is another run, and its old eval.json is stale.
    from dpfed.eval import tables as tables_lib
    from launch import reproduce

    flagfile = tmp_path / "01_row.flags"
    flagfile.write_text("# binary: experiments.dpsgd_classifier\n--steps=4\n")
    before = reproduce.fingerprint(tables_lib.parse_row(flagfile), "full")
    flagfile.write_text("# binary: experiments.datalens\n--steps=4\n")
    assert reproduce.fingerprint(tables_lib.parse_row(flagfile), "full") != before, (
        "a row run by another binary would be shown as the edited row")


def test_an_unreadable_fingerprint_matches_no_row_even_with_a_newer_eval_json(tmp_path):
    # A reproduce_row.json cut short (or edited by hand) tells nothing of the flags the
    # run had: it is not a workdir from before fingerprints (judged by the files' times).
    from dpfed.eval import tables as tables_lib
    from dpfed.train.workdir import Workdir
    from launch import reproduce

    _, flagfile, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    row, workdir = tables_lib.parse_row(flagfile), Workdir(eval_json.parent)
    workdir.file(reproduce.ROW_FILE).write_text('{"fingerprint": ')
    stamp = flagfile.stat().st_mtime
    os.utime(eval_json, (stamp + 60, stamp + 60))  # newer than the flagfile
    assert not reproduce.is_current(row, workdir, "full"), (
        "an eval.json under an unreadable fingerprint must not be shown as the row's")
    assert reproduce.superseded(row, workdir, "full"), "its run is moved aside"


def test_fresh_moves_every_workdir_aside_and_retrains(tmp_path):
    # --rerun resumes a finished run (nothing retrained); --fresh is how to retrain.
    tables_dir, _, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    (eval_json.parent / "checkpoints").mkdir()
    proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}", "--fresh")
    assert proc.returncode == 1, "the row's binary does not exist: the run must fail"
    assert not (eval_json.parent / "checkpoints").exists(), (
        f"--fresh must not resume the old run:\n{proc.stdout}")
    asides = list(eval_json.parent.parent.glob("01_row.superseded-*"))
    assert len(asides) == 1 and (asides[0] / "checkpoints").is_dir(), "kept, moved aside"
    assert "(--fresh)" in proc.stdout, proc.stdout


def test_a_workdir_in_use_by_a_live_run_is_not_moved_aside(tmp_path):
    # Moved, the live run would keep its lock (on the moved .lock) but write on by its
    # path into the fresh workdir, which the row's new run then locks: two runs in one.
    tables_dir, _, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    workdir = eval_json.parent
    (workdir / "checkpoints").mkdir()
    with workdir_locked_by_another_process(workdir):
        proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}", "--fresh")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --workdir_root:"), (
        proc.stdout + proc.stderr[-3000:])
    assert f"{workdir} is in use by another run" in proc.stderr, proc.stderr
    assert eval_json.exists() and (workdir / "checkpoints").is_dir(), "the live run was moved"
    assert not list(workdir.parent.glob("01_row.superseded-*")), "the live run was moved aside"


def test_a_rerun_leaves_a_live_runs_workdir_untouched(tmp_path):
    # --rerun of a row whose run is live deleted its eval.json and rewrote its fingerprint
    # before the row's binary met the lock (found by a crash-safety review).
    tables_dir, _, eval_json = _one_row_table_with_an_eval_json(tmp_path)
    workdir = eval_json.parent
    with workdir_locked_by_another_process(workdir):
        proc = _run(tmp_path, "--table=t", f"--tables_dir={tables_dir}", "--rerun")
    assert proc.returncode == 2 and f"{workdir} is in use by another run" in proc.stderr, (
        proc.stdout + proc.stderr[-3000:])
    assert eval_json.exists(), "the live run's eval.json was deleted"
    assert not (workdir / "reproduce_row.json").exists(), "a fingerprint was written into it"
