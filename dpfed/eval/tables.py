"""Paper tables: row specs from flagfiles, quoted reference rows, and the markdown table.

A table is a folder ``launch/tables/NAME/`` with a ``table.json`` (title, dataset,
which reference rows to quote) and one absl flagfile per row. A row's flagfile starts
with header comments that absl ignores::

    # row: DP-SGD CNN, eps 1
    # binary: experiments.dpsgd_classifier
    # smoke: --steps=10 --batch_size=64
    --dataset=mnist5k
    ...

``binary`` is the module run with ``--flagfile=<this file> --workdir=<row workdir>``;
``smoke`` holds the flags appended at ``--scale=smoke`` (tiny runs that test the path).
Each row's results are its workdir's ``eval.json`` (`dpfed.eval.evaluation`). Quoted
rows come from ``launch/tables/reference_rows.json``, where every number cites its
source; they are marked *quoted* with how their data and metric differ from ours.
"""

import dataclasses
import json
import pathlib
import shlex
from typing import NamedTuple

from dpfed.privacy import format_upper
from dpfed.train.progress import format_duration

TABLE_FILE = "table.json"
REFERENCE_FILE = "reference_rows.json"
SCALES = ("full", "smoke")
_HEADER_KEYS = ("row", "binary", "smoke")


class TableError(ValueError):
    """A table folder, flagfile or reference file is malformed."""


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row: a label, a binary module and its flagfile (+ smoke-scale flags)."""

    name: str
    label: str
    binary: str
    flagfile: pathlib.Path
    smoke_flags: tuple[str, ...]

    def flags(self, scale: str) -> list[str]:
        """The binary's flags at ``scale`` (without ``--workdir``)."""
        extra = list(self.smoke_flags) if scale == "smoke" else []
        return [f"--flagfile={self.flagfile}", *extra]


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A table: its name, title, description, real dataset, which reference rows it
    quotes (keys and values a reference row must match), and its rows."""

    name: str
    title: str
    description: str
    dataset: str
    quote: dict
    rows: tuple[RowSpec, ...]


class References(NamedTuple):
    """Quoted rows, the sources they cite (by key) and how quoted rows are marked."""

    rows: list[dict]
    sources: dict
    marking: str


def parse_row(path: pathlib.Path) -> RowSpec:
    """Reads a row flagfile's ``# key: value`` header.

    Raises:
      TableError: if ``binary`` is missing.
    """
    header = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, colon, value = line.lstrip("# ").partition(":")
        if line.startswith("#") and colon and key.strip() in _HEADER_KEYS:
            header[key.strip()] = value.strip()
    if "binary" not in header:
        raise TableError(f"{path}: no '# binary: <module>' header line")
    return RowSpec(
        name=path.stem,
        label=header.get("row", path.stem),
        binary=header["binary"],
        flagfile=path.absolute(),
        smoke_flags=tuple(shlex.split(header.get("smoke", ""))),
    )


def _read_json_object(path: pathlib.Path, keys: tuple[str, ...]) -> dict:
    """The JSON object in ``path``, which must hold ``keys``.

    Raises:
      TableError: the file is not JSON, not an object, or lacks one of ``keys``.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise TableError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise TableError(f"{path} must hold a JSON object")
    missing = [key for key in keys if key not in value]
    if missing:
        raise TableError(f"{path} lacks {', '.join(repr(k) for k in missing)}")
    return value


def load_table(tables_dir: pathlib.Path, name: str) -> TableSpec:
    """The table ``name`` defined in ``tables_dir/name/`` (rows in file-name order).

    Raises:
      TableError: if the folder, its table.json or its rows are missing or malformed.
    """
    folder = tables_dir / name
    if not (folder / TABLE_FILE).exists():
        known = sorted(p.parent.name for p in tables_dir.glob(f"*/{TABLE_FILE}"))
        raise TableError(f"no table {name!r} in {tables_dir} (known: {', '.join(known)})")
    spec = _read_json_object(folder / TABLE_FILE, ("title", "dataset"))
    rows = tuple(parse_row(path) for path in sorted(folder.glob("*.flags")))
    if not rows:
        raise TableError(f"{folder} has no row flagfiles (*.flags)")
    return TableSpec(
        name, spec["title"], spec.get("description", ""), spec["dataset"],
        spec.get("quote", {}), rows,
    )


def load_references(path: pathlib.Path, quote: dict) -> References:
    """The reference rows matching every ``quote`` key, and the sources they cite.

    Raises:
      TableError: if the file is malformed, a row cites a source that the file does not
        define, or a non-empty ``quote`` matches no row (a typo would drop every quoted
        row from the table, unseen).
    """
    references = _read_json_object(path, ("sources", "rows", "marking"))
    sources = references["sources"]
    rows = [
        row for row in references["rows"] if all(row.get(k) == v for k, v in quote.items())
    ]
    if quote and not rows:
        seen = {k: sorted({str(row.get(k)) for row in references["rows"]}) for k in quote}
        raise TableError(f"{path}: no reference row matches the table's quote {quote} "
                         f"(values there: {seen})")
    for row in rows:
        if row["source"] not in sources:
            raise TableError(f"{path}: row {row['method']!r} cites unknown {row['source']!r}")
    return References(rows, sources, references["marking"])


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _accuracy(result: dict | None, model: str) -> str:
    entry = (result.get("downstream") or {}).get(model) if result else None
    return "—" if entry is None else f"{100 * entry['test_accuracy']:.1f}"


def _eps(result: dict) -> tuple[str, str]:
    privacy = result["privacy"]
    if privacy is None and result["source"]["kind"] == "real_data":
        return "∞ (non-private)", "—"
    if privacy is None:
        # No ledger, no guarantee: a bare "none recorded" read like missing accounting.
        return "∞ (no ledger: non-private)", "—"
    # 4 significant digits, rounded up: 10.049 must not read as a target of 10 met.
    rdp, pld = (format_upper(privacy[k], 4, "—") for k in ("epsilon_rdp", "epsilon_pld"))
    # The unit beside eps: a user-level and an example-level eps are not comparable.
    unit = privacy.get("unit") or "unit not stated"
    return f"{rdp} (PLD {pld}), {unit}", format_upper(privacy["delta"], 3, "—")


def _wall(result: dict) -> str:
    train = result.get("train_wall_seconds")
    evaluation = format_duration(result["eval_wall_seconds"])
    return f"eval {evaluation}" if train is None else f"{format_duration(train)} + {evaluation}"


_COLUMNS = (
    "source", "method", "data", "eps RDP (PLD), unit", "delta", "fid_domain", "FID (Inception)",
    "CNN %", "MLP %", "LogReg %", "wall time (train + eval)",
)


def our_row(row: RowSpec, result: dict | None, dataset: str) -> list[str]:
    """A table line of our run; ``result`` is its eval.json (None: not run or failed)."""
    if result is None:
        return ["ours", row.label, dataset, "not run / failed", *["—"] * 7]
    eps, delta = _eps(result)
    evaluated = result.get("dataset", dataset)  # what the figures are of, said if not the table's
    data = evaluated if evaluated == dataset else f"{evaluated} (table: {dataset})"
    return [
        "ours", row.label, data, eps, delta,
        _number(result.get("fid_domain"), 4), _number(result.get("fid_inception"), 4),
        _accuracy(result, "cnn"), _accuracy(result, "mlp"), _accuracy(result, "logreg"),
        _wall(result),
    ]


def quoted_row(row: dict, references: References) -> list[str]:
    """A table line of a quoted reference row, marked as quoted with its data size."""
    source = references.sources[row["source"]]
    return [
        f"*{references.marking}: {source['short']}*", row["method"],
        f"*{row['dataset']}, {source['data']}*",
        f"{_number(row['epsilon'])}, {row.get('unit', 'unit not stated')}",
        _number(row["delta"]), "—",
        _number(row.get("fid_inception"), 4),
        "—" if row.get("cnn_accuracy") is None else f"{row['cnn_accuracy']:g}",
        "—", "—", "—",
    ]


def _markdown_table(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def render_table(
    spec: TableSpec,
    results: dict[str, dict | None],
    workdirs: dict[str, str],
    references: References,
    scale: str,
) -> str:
    """The markdown of a table: our rows, then the quoted rows, then notes and sources."""
    lines = [our_row(row, results.get(row.name), spec.dataset) for row in spec.rows]
    lines += [quoted_row(row, references) for row in references.rows]
    scale_note = (
        "**scale: smoke** — every run is tiny; the numbers test the pipeline, not the methods."
        if scale == "smoke"
        else "scale: full."
    )
    parts = [
        f"# {spec.title}",
        "",
        spec.description,
        "",
        f"Table `{spec.name}`, {scale_note} Written by `launch/reproduce.py --table={spec.name} "
        f"--scale={scale}`.",
        "",
        _markdown_table(lines),
        "",
        f"Rows marked *{references.marking}* are copied from the papers: they train on "
        "the full dataset, and their FID uses ImageNet Inception-v3 features, so it "
        "is **not comparable** with our `fid_domain` (Fréchet distance in the features of a "
        f"small CNN trained on the {spec.dataset} train split; see WORKSPACE.md, Evaluation). "
        "Accuracies: classifiers trained on synthetic data, tested on the real test split; "
        "for the DP-SGD rows, the private classifier itself. eps is the RDP accountant's, "
        "PLD's in parentheses.",
        "",
        "## Sources of the quoted rows",
        "",
        *[
            f"- *{source['short']}*: {source['citation']} Data: {source['data']}. {source['note']}"
            for key, source in references.sources.items()
            if any(row["source"] == key for row in references.rows)
        ],
        "",
        "## Our runs",
        "",
        *[f"- {row.label}: `{row.binary}` with `{row.flagfile.name}`, workdir "
          f"`{workdirs[row.name]}`" for row in spec.rows],
    ]
    return "\n".join(parts) + "\n"
