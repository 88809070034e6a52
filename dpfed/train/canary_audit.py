"""A trainer's audit run: its canaries drawn from the run's seed, and its audit.json.

The five trainers that take `audit_canaries` in their parameters (`dpfed.train.dpsgd`,
`dpfed.federated.classifier`, `dpfed.generative.fedgan`, `fedlm` and `dpd_fvae`) draw their
canaries and write their figures here, and DataLens (its canaries in vote space,
`dpfed.generative.datalens.canaries`) its all-rounds figures, so that the seed stream,
the refusals and the write's order after ledger.json are one rule (`dpfed.privacy.audit`;
WORKSPACE.md, "Auditing a training run with canaries").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

from dpfed.privacy import audit
from dpfed.train import seeds
from dpfed.train.workdir import AUDIT_FILE, Workdir

PyTree = Any


def draw_canaries(config: Any, params: PyTree) -> tuple[audit.Canaries, audit.Canaries] | None:
    """(inserted, held-out) canaries of an audit run in the space of `params`, drawn from
    the seed of `config` (a trainer's config with `seed` and `audit_canaries`); None
    without an audit."""
    if not config.audit_canaries:
        return None
    return audit.draw_pair(seeds.stream_key(config.seed, seeds.AUDIT_STREAM), params,
                           config.audit_canaries)


class EngineCanaries(TypedDict):
    """`DpFedAvg`'s audit arguments: the inserted and the held-out directions."""

    canaries: audit.Canaries | None
    held_out: audit.Canaries | None


def engine_canaries(
    canaries: tuple[audit.Canaries, audit.Canaries] | None,
) -> EngineCanaries:
    """The DP-FedAvg engine's audit arguments for (inserted, held-out) `canaries` (None
    without an audit): `DpFedAvg(..., **engine_canaries(canaries))` inserts the first and
    observes both every round (the all-rounds audit)."""
    inserted, held_out = (None, None) if canaries is None else canaries
    return EngineCanaries(canaries=inserted, held_out=held_out)


def write_audit(
    wd: Workdir,
    canaries: tuple[audit.Canaries, audit.Canaries] | None,
    initial: PyTree,
    final: PyTree,
    ledger: dict[str, Any] | None,
    trained: bool,
    all_rounds: Callable[[float], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """Writes audit.json (`audit.audit_run` of the model's change from `initial` to
    `final`) and returns its figures, for an audit run (`canaries`) that `trained` under a
    ledger (`ledger`: its `PrivacyLedger.to_json`, or a trainer's privacy fields with
    `epsilon_rdp`); writes nothing and returns None otherwise. Call it after ledger.json
    is written: the ledger covers the figures, which are post-processing of the run.
    `all_rounds(delta)`, where given: the all-rounds figures at the ledger's delta
    (`DpFedAvg.all_rounds_audit`), added as `all_rounds` with the final model's f-DP
    bound in their family (`audit.audit_run`'s `family`)."""
    if canaries is None or not _audits(ledger, trained):
        return None
    assert ledger is not None  # `_audits`
    family = None if all_rounds is None else all_rounds(ledger["delta"])
    return _write(wd, audit.audit_run(canaries, initial, final, ledger, family))


def write_all_rounds_audit(
    wd: Workdir,
    counts: tuple[int, int],
    ledger: dict[str, Any] | None,
    trained: bool,
    all_rounds: Callable[[float], dict[str, Any]],
) -> dict[str, Any] | None:
    """`write_audit` of an audit run whose canaries are not in the model's parameters
    (DataLens's, in its vote space: `dpfed.generative.datalens.canaries`), so there is no
    final-model attack: audit.json holds the all-rounds figures `all_rounds(delta)` alone
    (`audit.all_rounds_run`) of `counts` = (inserted, held-out) candidates."""
    if not _audits(ledger, trained):
        return None
    assert ledger is not None  # `_audits`
    return _write(wd, audit.all_rounds_run(*counts, ledger, all_rounds(ledger["delta"])))


def _audits(ledger: dict[str, Any] | None, trained: bool) -> bool:
    """Whether an audit run's figures are written: it trained, under a ledger."""
    return trained and ledger is not None and ledger["epsilon_rdp"] is not None


def _write(wd: Workdir, figures: dict[str, Any]) -> dict[str, Any]:
    wd.write_json(AUDIT_FILE, figures)
    return figures
