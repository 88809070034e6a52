r"""Reproduces a paper table: runs its rows, evaluates them, writes tables/NAME.md.

A table is ``launch/tables/NAME/`` (see `dpfed.eval.tables`): one flagfile per row,
naming the binary that runs it. For each row this runs
``python -m <binary> --flagfile=<row> --workdir=<root>/NAME/<scale>/<row>`` and then
``python -m experiments.evaluate --workdir=...`` (unless the row is an evaluation
itself), and writes our rows beside the papers' quoted rows
(``launch/tables/reference_rows.json``) into ``<out_dir>/NAME.md``.

Examples (2 CPU cores):

  .venv/bin/python -m launch.reproduce --table=dpsgd_mnist5k --scale=smoke  # ~2 min
  .venv/bin/python -m launch.reproduce --table=dpsgd_mnist5k                # ~15 min
  .venv/bin/python -m launch.reproduce --table=dpsgd_mnist5k --collect      # only reads

Rerunning skips the rows whose eval.json is newer than their flagfile (--rerun runs them
again; the binaries resume from their workdirs). A row's eval.json is deleted before its
run starts, and --collect leaves out an eval.json older than its flagfile (stale). Logs of
each row's commands are in its workdir (``reproduce.log``). Exits 1 if a row failed (its
line says so).
"""

import pathlib
import subprocess
import sys
import time

from absl import flags

from dpfed.eval import evaluation, tables
from dpfed.train import cli
from dpfed.train.workdir import Workdir, atomic_write_text

_REPO = pathlib.Path(__file__).resolve().parent.parent
EVALUATE = "experiments.evaluate"
SMOKE_EVAL_FLAGS = ("--num_samples=300", "--max_epochs=1", "--extractor_steps=10")

_TABLE = flags.DEFINE_string("table", None, "Table name (a folder of --tables_dir).", required=True)
_SCALE = flags.DEFINE_enum("scale", "full", list(tables.SCALES), "full, or smoke: tiny runs.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only read existing eval.json files.")
_RERUN = flags.DEFINE_bool("rerun", False, "Run rows again even if their eval.json is current.")
_TABLES_DIR = flags.DEFINE_string("tables_dir", str(_REPO / "launch" / "tables"), "Table specs.")
_OUT_DIR = flags.DEFINE_string("out_dir", "tables", "Where NAME.md is written.")
_ROOT = flags.DEFINE_string("workdir_root", "workdirs/tables", "Root of the rows' workdirs.")
_CACHE = flags.DEFINE_string("cache_dir", None, "fid_domain extractor cache for evaluate.")


def _run_logged(command: list[str], log: pathlib.Path) -> bool:
    """Runs ``command`` from the repo root, appending its output to ``log``."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, cwd=_REPO, stdout=out, stderr=subprocess.STDOUT)
    return done.returncode == 0


def _eval_flags(scale: str) -> list[str]:
    cache = [f"--cache_dir={_CACHE.value}"] if _CACHE.value else []
    return [*(SMOKE_EVAL_FLAGS if scale == "smoke" else ()), *cache]


def run_row(row: tables.RowSpec, workdir: Workdir, scale: str) -> bool:
    """Runs a row's binary, then evaluates its workdir; True when both succeeded."""
    log = workdir.file("reproduce.log")
    python = [sys.executable, "-m"]
    command = [*python, row.binary, *row.flags(scale), f"--workdir={workdir.path}"]
    if row.binary == EVALUATE:
        return _run_logged([*command, *_eval_flags(scale)], log)
    evaluate = [*python, EVALUATE, f"--workdir={workdir.path}", *_eval_flags(scale)]
    return _run_logged(command, log) and _run_logged(evaluate, log)


def is_current(row: tables.RowSpec, workdir: Workdir) -> bool:
    """Whether the row's eval.json exists and is newer than its flagfile."""
    path = workdir.file(evaluation.EVAL_FILE)
    return path.exists() and path.stat().st_mtime >= row.flagfile.stat().st_mtime


def _read_result(workdir: Workdir) -> dict | None:
    path = workdir.file(evaluation.EVAL_FILE)
    return workdir.read_json(evaluation.EVAL_FILE) if path.exists() else None


def main(argv: list[str]) -> None:
    cli.check(len(argv) == 1, "table", f"unexpected arguments {argv[1:]}")
    tables_dir = pathlib.Path(_TABLES_DIR.value)
    try:
        spec = tables.load_table(tables_dir, _TABLE.value)
        references = tables.load_references(
            tables_dir / tables.REFERENCE_FILE, spec.quote
        )
    except (tables.TableError, OSError, KeyError) as error:
        raise cli.FlagError("table", str(error)) from error
    root = pathlib.Path(_ROOT.value).absolute() / spec.name / _SCALE.value
    results, workdirs, failed = {}, {}, []
    for i, row in enumerate(spec.rows, 1):
        workdir = Workdir(root / row.name)
        workdirs[row.name] = str(workdir.path)
        if not _COLLECT.value and not _RERUN.value and is_current(row, workdir):
            print(f"[{i}/{len(spec.rows)}] {row.label}: current eval.json, skipped", flush=True)
        elif not _COLLECT.value:
            print(f"[{i}/{len(spec.rows)}] {row.label}: {row.binary} ...", flush=True)
            # Gone until this run writes it: a failed or killed run leaves no stale result.
            workdir.file(evaluation.EVAL_FILE).unlink(missing_ok=True)
            start = time.time()
            ok = run_row(row, workdir, _SCALE.value)
            status = "done" if ok else f"FAILED (see {workdir.file('reproduce.log')})"
            print(f"    {status} in {time.time() - start:.0f} s", flush=True)
            if not ok:
                failed.append(row.label)
        elif workdir.file(evaluation.EVAL_FILE).exists() and not is_current(row, workdir):
            print(f"[{i}/{len(spec.rows)}] {row.label}: eval.json is older than the flagfile, "
                  "not shown (run the row again)", flush=True)
            results[row.name] = None
            continue
        results[row.name] = _read_result(workdir)
    out = pathlib.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    markdown = tables.render_table(spec, results, workdirs, references, _SCALE.value)
    atomic_write_text(out / f"{spec.name}.md", markdown)
    print(f"wrote {out / f'{spec.name}.md'}")
    if failed:
        sys.exit(f"rows failed: {', '.join(failed)}")


if __name__ == "__main__":
    cli.run(main)
