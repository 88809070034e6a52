"""A run killed while it writes its released model file, for the tests of write order."""

import json
import pathlib

from dpfed.train.workdir import LEDGER_FILE, Workdir


class KilledAtRelease(Exception):  # noqa: N818  (it stands in for a kill, not an error)
    """Raised where the run would write a released model file (`Workdir.write_bytes`)."""


def kill_at_release_write(monkeypatch) -> None:
    """Makes every `Workdir.write_bytes` (released params, generator) raise KilledAtRelease."""

    def killed(self, name, payload):
        raise KilledAtRelease(name)

    monkeypatch.setattr(Workdir, "write_bytes", killed)


def releases_in_ledger_json(workdir: str | pathlib.Path) -> int:
    """The `num_releases` of the workdir's ledger.json (0 when there is none)."""
    path = pathlib.Path(workdir) / LEDGER_FILE
    return json.loads(path.read_text())["num_releases"] if path.exists() else 0
