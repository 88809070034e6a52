"""Tests for dpfed.eval.tables: row flagfiles, quoted rows, the markdown table."""

import json
import pathlib

import pytest

from dpfed.eval import tables

_TABLES = pathlib.Path(__file__).resolve().parents[2] / "launch" / "tables"


def _row_file(tmp_path, text, name="01_row.flags"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_parse_row_reads_the_header(tmp_path):
    path = _row_file(
        tmp_path, "# row: My row\n# binary: experiments.x\n# smoke: --steps=2 --a=b\n--seed=1\n"
    )
    row = tables.parse_row(path)
    assert (row.label, row.binary) == ("My row", "experiments.x"), row
    assert row.flags("smoke") == [f"--flagfile={path}", "--steps=2", "--a=b"], row.flags("smoke")
    assert row.flags("full") == [f"--flagfile={path}"], "smoke flags leaked into the full run"


def test_row_without_binary_is_an_error(tmp_path):
    with pytest.raises(tables.TableError, match="binary"):
        tables.parse_row(_row_file(tmp_path, "# row: x\n--seed=1\n"))


def test_unknown_table_lists_the_known_ones():
    with pytest.raises(tables.TableError, match="dpsgd_mnist5k"):
        tables.load_table(_TABLES, "no_such_table")


def test_shipped_table_has_ceiling_and_dpsgd_rows():
    spec = tables.load_table(_TABLES, "dpsgd_mnist5k")
    binaries = [row.binary for row in spec.rows]
    assert binaries == ["experiments.evaluate", *["experiments.dpsgd_classifier"] * 2], binaries


def test_ci_smoke_table_runs_an_evaluation_and_a_trainer():
    spec = tables.load_table(_TABLES, "smoke_digits")
    binaries = [row.binary for row in spec.rows]
    assert binaries == ["experiments.evaluate", "experiments.dpsgd_classifier"], binaries


def test_every_reference_row_cites_a_source():
    references = json.loads((_TABLES / tables.REFERENCE_FILE).read_text())
    cited = {row["source"] for row in references["rows"]}
    assert cited <= set(references["sources"]), f"undefined sources: {cited}"
    assert all("citation" in s for s in references["sources"].values()), "a source lacks citation"


def test_load_references_filters_by_dataset():
    refs = tables.load_references(_TABLES / tables.REFERENCE_FILE, {"dataset": "MNIST"})
    assert refs.rows and all(r["dataset"] == "MNIST" for r in refs.rows), "filter failed"


def test_load_references_keeps_the_rows_that_match_every_quote_key():
    # A table at eps 1 on MNIST must not quote the eps-10 rows, nor Fashion-MNIST's.
    quote = {"dataset": "MNIST", "epsilon": 1}
    refs = tables.load_references(_TABLES / tables.REFERENCE_FILE, quote)
    assert refs.rows, "the file quotes MNIST rows at eps 1"
    wrong = [(r["method"], r["dataset"], r["epsilon"]) for r in refs.rows
             if (r["dataset"], r["epsilon"]) != ("MNIST", 1)]
    assert not wrong, f"quoted rows that match only some of {quote}: {wrong}"


def _result(cnn=0.9, eps=1.0):
    return {
        "privacy": {"epsilon_rdp": eps, "epsilon_pld": 0.8, "delta": 1e-5, "unit": "example"},
        "source": {"kind": "classifier", "path": "w"},
        "fid_domain": 12.5,
        "downstream": {"cnn": {"test_accuracy": cnn}},
        "train_wall_seconds": 30.0,
        "eval_wall_seconds": 4.0,
    }


def test_render_puts_our_rows_beside_marked_quoted_rows(tmp_path):
    spec = tables.TableSpec(
        "t", "Title", "", "mnist5k", {},
        (tables.parse_row(_row_file(tmp_path, "# row: DP row\n# binary: b\n")),),
    )
    refs = tables.References(
        [{"method": "Paper", "dataset": "MNIST", "epsilon": 10, "delta": 1e-5,
          "fid_inception": 5.0, "cnn_accuracy": 98.1, "source": "s"}],
        {"s": {"short": "Paper T1", "citation": "A paper.", "data": "60k", "note": ""}},
        "quoted, different data size/metric",
    )
    markdown = tables.render_table(spec, {"01_row": _result()}, {"01_row": "w"}, refs, "smoke")
    ours = "| ours | DP row | mnist5k | 1 (PLD 0.8), example | 1e-05 | 12.5 | — | 90.0 |"
    assert ours in markdown, markdown
    assert "*quoted, different data size/metric: Paper T1* | Paper |" in markdown, markdown
    assert "scale: smoke" in markdown, "a smoke table must say so"


def test_source_without_ledger_is_not_called_private():
    result = {**_result(), "privacy": None, "source": {"kind": "synthetic_file", "path": "s"}}
    row = tables.RowSpec("r", "npz row", "b", pathlib.Path("r.flags"), ())
    eps = tables.our_row(row, result, "mnist5k")[3]
    assert eps == "∞ (no ledger: non-private)", f"no ledger must read as no guarantee: {eps}"


def test_render_marks_rows_that_did_not_run(tmp_path):
    spec = tables.TableSpec(
        "t", "Title", "", "mnist5k", {},
        (tables.parse_row(_row_file(tmp_path, "# binary: b\n")),),
    )
    refs = tables.References([], {}, "quoted")
    markdown = tables.render_table(spec, {"01_row": None}, {"01_row": "w"}, refs, "full")
    assert "not run / failed" in markdown, markdown


def test_each_accuracy_column_holds_its_own_model():
    downstream = {name: {"test_accuracy": a} for name, a in
                  (("cnn", 0.9), ("mlp", 0.8), ("logreg", 0.7))}
    row = tables.RowSpec("r", "row", "b", pathlib.Path("r.flags"), ())
    line = dict(zip(tables._COLUMNS, tables.our_row(row, {**_result(), "downstream": downstream},
                                                   "mnist5k"), strict=True))
    assert (line["CNN %"], line["MLP %"], line["LogReg %"]) == ("90.0", "80.0", "70.0"), line


def test_eps_keeps_four_significant_digits():
    row = tables.RowSpec("r", "row", "b", pathlib.Path("r.flags"), ())
    eps = tables.our_row(row, _result(eps=10.049), "mnist5k")[3]
    assert eps.startswith("10.05 "), f"10.049 must not read as a target of 10 met: {eps}"


def test_eps_is_rounded_up_never_down():
    row = tables.RowSpec("r", "row", "b", pathlib.Path("r.flags"), ())
    eps = tables.our_row(row, _result(eps=10.00049), "mnist5k")[3]
    assert eps.startswith("10.01 "), f"eps 10.00049 must not read as 10 (a target met): {eps}"


def test_delta_is_rounded_up_never_down():
    row = tables.RowSpec("r", "row", "b", pathlib.Path("r.flags"), ())
    result = _result()
    result["privacy"] = {**result["privacy"], "delta": 1.0049e-5}
    delta = tables.our_row(row, result, "mnist5k")[4]
    assert delta == "1.01e-05", f"delta 1.0049e-5 must not read as 1e-05: {delta}"


def test_eps_carries_its_unit_in_our_rows_and_the_quoted_ones():
    row = tables.RowSpec("r", "row", "b", pathlib.Path("r.flags"), ())
    result = _result()
    result["privacy"] = {**result["privacy"], "unit": "user"}
    assert tables.our_row(row, result, "mnist5k")[3].endswith(", user"), (
        "a user-level eps must not read like the example-level ones beside it")
    refs = tables.load_references(_TABLES / tables.REFERENCE_FILE, {"dataset": "MNIST"})
    assert all(tables.quoted_row(r, refs)[3].endswith(", example") for r in refs.rows), (
        "every quoted row must state its unit")


def test_data_column_shows_the_dataset_evaluated_when_not_the_tables():
    row = tables.RowSpec("r", "row", "b", pathlib.Path("r.flags"), ())
    line = tables.our_row(row, {**_result(), "dataset": "digits"}, "mnist5k")
    assert line[2] == "digits (table: mnist5k)", f"a row of other data must say so: {line[2]}"


def test_a_quote_that_matches_no_reference_row_is_an_error():
    # {"dataset": "Mnist"} in a table.json dropped every quoted row without a word.
    with pytest.raises(tables.TableError, match="no reference row matches"):
        tables.load_references(_TABLES / tables.REFERENCE_FILE, {"dataset": "Mnist"})
    with pytest.raises(tables.TableError, match="no reference row matches"):
        tables.load_references(_TABLES / tables.REFERENCE_FILE, {"datset": "MNIST"})


def test_malformed_table_json_is_a_table_error(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "01_row.flags").write_text("# binary: b\n")
    (tmp_path / "t" / tables.TABLE_FILE).write_text('{"title": "T", "dataset": "digits",}')
    with pytest.raises(tables.TableError, match="not valid JSON"):
        tables.load_table(tmp_path, "t")
    (tmp_path / "t" / tables.TABLE_FILE).write_text('{"title": "T"}')
    with pytest.raises(tables.TableError, match="'dataset'"):
        tables.load_table(tmp_path, "t")
