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

Each row's workdir records the fingerprint of the run it holds (``reproduce_row.json``:
the binary, the flag lines of the flagfile, the scale's extra flags). Rerunning skips the
rows whose eval.json is of the current fingerprint (--rerun runs them again; the binaries
resume from their workdirs; --fresh moves every row's workdir aside and retrains). A
workdir made with other flags is moved aside (``<row>.superseded-<time>``) and the row
starts afresh: resumed, a finished run would keep its old steps, or train on with noise
recalibrated to a spent budget, and be shown as the edited row. A row's eval.json is
deleted before its run starts, and --collect leaves out an eval.json of other flags
(stale). A workdir in use by a live run (its lock, `Workdir.lock`) is neither moved (that
run would write on into the fresh one) nor readied (its eval.json deleted); reproduce exits
2 naming it. Workdirs from before fingerprints use the flagfile's time instead. Logs of
each row's commands are in its workdir (``reproduce.log``). Exits 1 if a row failed (its
line says so).
"""

import contextlib
import hashlib
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

from absl import flags

from dpfed.eval import evaluation, tables
from dpfed.train import cli
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir, atomic_write_text

_REPO = pathlib.Path(__file__).resolve().parent.parent
EVALUATE = "experiments.evaluate"
SMOKE_EVAL_FLAGS = ("--num_samples=300", "--max_epochs=1", "--extractor_steps=10")
ROW_FILE = "reproduce_row.json"  # the fingerprint of the run a row's workdir holds

_TABLE = flags.DEFINE_string("table", None, "Table name (a folder of --tables_dir).", required=True)
_SCALE = flags.DEFINE_enum("scale", "full", list(tables.SCALES), "full, or smoke: tiny runs.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only read existing eval.json files.")
_RERUN = flags.DEFINE_bool(
    "rerun", False, "Run rows again even if their eval.json is current: each binary "
    "resumes its finished workdir (nothing retrained) and is evaluated again; delete the "
    "workdirs to retrain, or give --fresh.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Retrain every row from scratch (implies --rerun): each row's workdir "
    "is moved aside to <row>.superseded-<time> first (kept, not deleted).")
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


def _eval_flags(scale: str, workdir: Workdir | None = None) -> list[str]:
    """`experiments.evaluate`'s flags for `scale`, less those that evaluating `workdir`
    (a row's trained workdir) ignores and would refuse (`evaluation.unused_flags`: all of
    them for a classifier's)."""
    cache = [f"--cache_dir={_CACHE.value}"] if _CACHE.value else []
    given = [*(SMOKE_EVAL_FLAGS if scale == "smoke" else ()), *cache]
    if workdir is None:
        return given
    try:
        unused = evaluation.unused_flags(evaluation.detect_source(workdir))
    except evaluation.EvaluationError:
        return given  # nothing to evaluate: evaluate says so itself
    return [flag for flag in given
            if not unused.get(flag.removeprefix("--").partition("=")[0], (False, ""))[0]]


def run_row(row: tables.RowSpec, workdir: Workdir, scale: str) -> bool:
    """Runs a row's binary, then evaluates its workdir; True when both succeeded."""
    log = workdir.file("reproduce.log")
    python = [sys.executable, "-m"]
    command = [*python, row.binary, *row.flags(scale), f"--workdir={workdir.path}"]
    if row.binary == EVALUATE:
        return _run_logged([*command, *_eval_flags(scale)], log)
    if not _run_logged(command, log):
        return False
    evaluate = [*python, EVALUATE, f"--workdir={workdir.path}", *_eval_flags(scale, workdir)]
    return _run_logged(evaluate, log)


def fingerprint(row: tables.RowSpec, scale: str) -> str:
    """sha256 of what decides a row's run: its binary, its flagfile's flag lines (not the
    comments and blank lines absl skips, so editing a label reruns nothing) and the flags
    ``scale`` adds."""
    lines = (line.strip() for line in row.flagfile.read_text(encoding="utf-8").splitlines())
    flag_lines = [line for line in lines if line and not line.startswith(("#", "//"))]
    spec = json.dumps([row.binary, flag_lines, row.flags(scale)[1:]])
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


def _recorded(workdir: Workdir) -> str | None:
    """The fingerprint the workdir's run was started with; None for a workdir from
    before fingerprints, "" for an unreadable record (matches no row)."""
    if not workdir.file(ROW_FILE).exists():
        return None
    try:
        return str(workdir.read_json_object(ROW_FILE).get("fingerprint", ""))
    except ValueError:
        return ""


def _flagfile_newer(row: tables.RowSpec, workdir: Workdir) -> bool:
    path = workdir.file(evaluation.EVAL_FILE)
    return path.exists() and path.stat().st_mtime < row.flagfile.stat().st_mtime


def is_current(row: tables.RowSpec, workdir: Workdir, scale: str) -> bool:
    """Whether the row's eval.json exists and is of a run of the row's current flags
    (a workdir from before fingerprints: newer than the flagfile)."""
    if not workdir.file(evaluation.EVAL_FILE).exists():
        return False
    recorded = _recorded(workdir)
    if recorded is None:
        return not _flagfile_newer(row, workdir)
    return recorded == fingerprint(row, scale)


def superseded(row: tables.RowSpec, workdir: Workdir, scale: str) -> bool:
    """Whether the workdir holds a run of other flags than the row's current ones (a
    workdir from before fingerprints: a finished run whose flagfile changed since)."""
    recorded = _recorded(workdir)
    if recorded is None:
        return _flagfile_newer(row, workdir)
    return recorded != fingerprint(row, scale)


@contextlib.contextmanager
def _holding(workdir: Workdir) -> Iterator[None]:
    """Holds `workdir`'s lock while reproduce readies it, then releases it to the row's
    binary: a run still live in it is left untouched.

    Raises:
      cli.FlagError: naming "workdir_root", when another process holds the lock.
    """
    try:
        workdir.lock()
    except ConfigError as error:
        raise cli.FlagError("workdir_root", error.message) from None
    try:
        yield
    finally:
        workdir.unlock()


def _move_aside(workdir: Workdir) -> pathlib.Path:
    """Renames `workdir` (whose lock the caller holds, `_holding`) to
    ``<name>.superseded-<time>``; returns the new path. A run still live in it would go on
    writing by its path, into the fresh workdir made there, beside the row's new run: two
    runs in one workdir."""
    path = workdir.path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.superseded-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.superseded-{stamp}-{n}"), n + 1
    path.rename(aside)
    return aside


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
    scale = _SCALE.value
    for i, row in enumerate(spec.rows, 1):
        workdir = Workdir(root / row.name)
        workdirs[row.name] = str(workdir.path)
        rerun = _RERUN.value or _FRESH.value
        if not _COLLECT.value and not rerun and is_current(row, workdir, scale):
            print(f"[{i}/{len(spec.rows)}] {row.label}: current eval.json, skipped", flush=True)
        elif not _COLLECT.value:
            print(f"[{i}/{len(spec.rows)}] {row.label}: {row.binary} ...", flush=True)
            fresh = _FRESH.value and workdir.path.exists()
            if fresh or superseded(row, workdir, scale):
                # Resumed, it would be shown as this row but be another run (or a hybrid).
                with _holding(workdir):
                    aside = _move_aside(workdir)
                why = "--fresh" if fresh else "it holds a run of other flags"
                print(f"    {workdir.path} moved to {aside} ({why}): the row starts afresh",
                      flush=True)
                workdir = Workdir(root / row.name)
            with _holding(workdir):  # --rerun of a live run's row: its files untouched
                # Gone until this run writes it: a failed or killed run leaves no stale result.
                workdir.file(evaluation.EVAL_FILE).unlink(missing_ok=True)
                workdir.write_json(ROW_FILE, {"fingerprint": fingerprint(row, scale)})
            start = time.time()
            ok = run_row(row, workdir, scale)
            status = "done" if ok else f"FAILED (see {workdir.file('reproduce.log')})"
            print(f"    {status} in {time.time() - start:.0f} s", flush=True)
            if not ok:
                failed.append(row.label)
        elif workdir.file(evaluation.EVAL_FILE).exists() and not is_current(row, workdir, scale):
            print(f"[{i}/{len(spec.rows)}] {row.label}: eval.json is stale (of other flags, "
                  "or older than the flagfile), not shown (run the row again)", flush=True)
            results[row.name] = None
            continue
        results[row.name] = _read_result(workdir)
    out = pathlib.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    markdown = tables.render_table(spec, results, workdirs, references, scale)
    atomic_write_text(out / f"{spec.name}.md", markdown)
    print(f"wrote {out / f'{spec.name}.md'}")
    if failed:
        sys.exit(f"rows failed: {', '.join(failed)}")


if __name__ == "__main__":
    cli.run(main)
