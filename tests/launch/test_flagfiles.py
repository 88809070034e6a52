"""Every flagfile in launch/ builds a config its binary accepts, at both table scales.

A check that refuses a combination of flags (e.g. `cli.refuse_unused`) must not refuse a
table row or the demo: `launch/reproduce.py` would find out hours into a table. Each
binary's rows run in one process up to its trainer (`tests.flag_dry_run`); the rows of
`experiments.evaluate` (the real-data rows) have no trainer and are left out.
"""

import collections
import json

from dpfed.eval import tables
from tests.binary import ROOT, run_binary

_DEMO = ("experiments.fedgan_debug", ["--flagfile=launch/demo.flags"])
# Refused by every binary: shows that a dry run reports a refusal, not "ok" for anything.
_REFUSED = ["--seed=-1"]


def _commands_by_binary() -> dict[str, dict[str, list[str]]]:
    """{binary: {what: its flags}}: each table row at both scales, and the demo."""
    commands: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for path in sorted((ROOT / "launch" / "tables").glob("*/*.flags")):
        row = tables.parse_row(path)
        if row.binary == "experiments.evaluate":
            continue
        for scale in ("full", "smoke"):
            commands[row.binary][f"{path.relative_to(ROOT)} ({scale})"] = row.flags(scale)
    binary, demo_flags = _DEMO
    commands[binary]["launch/demo.flags"] = demo_flags
    return commands


def test_every_flagfile_builds_a_config_its_binary_accepts():
    commands = _commands_by_binary()
    assert len(commands) >= 4, f"expected rows of 4 trainer binaries, found {sorted(commands)}"
    refused = {}
    for binary, rows in commands.items():
        result = run_binary("tests.flag_dry_run", binary,
                            json.dumps([*rows.values(), _REFUSED]), check=False)
        assert result.returncode == 0, f"{binary}: the dry run failed:\n{result.stderr[-3000:]}"
        *outcomes, sentinel = json.loads(result.stdout.strip().splitlines()[-1])
        assert "--seed" in sentinel, (
            f"{binary}: the dry run must report a refused flag, got {sentinel!r}")
        refused.update({what: outcome for what, outcome in zip(rows, outcomes, strict=True)
                        if outcome != "ok"})
    assert not refused, f"flagfiles their binary now refuses: {refused}"
