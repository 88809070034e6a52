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


def kill_after_metrics_record(monkeypatch, key: str, at: int) -> None:
    """Makes `Workdir.append_metrics` raise KilledAtRelease right after it appends the
    record whose `key` ("step" or "round") is `at`: a kill between two releases."""
    append = Workdir.append_metrics

    def append_then_kill(self, record):
        append(self, record)
        if record.get(key) == at:
            raise KilledAtRelease(f"{key} {at}")

    monkeypatch.setattr(Workdir, "append_metrics", append_then_kill)


def assert_ledger_json_covers_metrics(
    workdir: str | pathlib.Path, eps_field: str, rel: float = 0.0
) -> None:
    """ledger.json's RDP eps is the last metrics record's `eps_field` (to `rel`): a killed
    run's workdir holds no logged release that its ledger.json does not count."""
    path = pathlib.Path(workdir)
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert (path / LEDGER_FILE).exists(), (
        f"no ledger.json beside {len(records)} logged releases of the killed run")
    ledger = json.loads((path / LEDGER_FILE).read_text())
    assert abs(ledger["epsilon_rdp"] - records[-1][eps_field]) <= rel * ledger["epsilon_rdp"], (
        f"ledger.json says eps {ledger['epsilon_rdp']}, the last logged release "
        f"{records[-1][eps_field]}: the ledger on disk under-counts the workdir's releases")
