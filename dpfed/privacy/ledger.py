"""The privacy ledger: every release of a run, in order, as dp_accounting DpEvents.

A ledger states what is protected (the unit of privacy and the neighbouring
relation) and composes every recorded event. eps is always recomputed from the
stored events, never carried as a number, so a ledger read back from JSON gives the
same eps. Consecutive identical events are stored once with a count.
"""

import dataclasses
from typing import Any

import attr
from dp_accounting import dp_event
from dp_accounting.dp_event import DpEvent

from dpfed.privacy import accounting

UNITS = ("example", "user", "partition")
RELATIONS = {
    "add_or_remove_one": accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": accounting.NeighboringRelation.REPLACE_ONE,
}


class BudgetExceededError(RuntimeError):
    """A release would take the ledger above its target eps."""


def event_to_json(event: DpEvent) -> dict[str, Any]:
    """Serialises any dp_accounting DpEvent (attrs class) to a JSON-able dict."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for field in attr.fields(type(event)):
        out[field.name] = _value_to_json(getattr(event, field.name))
    return out


def _value_to_json(value: Any) -> Any:
    if isinstance(value, DpEvent):
        return event_to_json(value)
    if isinstance(value, (list, tuple)):
        return [_value_to_json(v) for v in value]
    return value


def event_from_json(data: dict[str, Any]) -> DpEvent:
    """Inverse of `event_to_json`."""
    cls = getattr(dp_event, data["type"], None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, DpEvent)):
        raise ValueError(f"unknown DpEvent type {data['type']!r}")
    kwargs = {k: _value_from_json(v) for k, v in data.items() if k != "type"}
    return cls(**kwargs)


def _value_from_json(value: Any) -> Any:
    if isinstance(value, dict) and "type" in value:
        return event_from_json(value)
    if isinstance(value, list):
        return [_value_from_json(v) for v in value]
    return value


@dataclasses.dataclass
class PrivacyLedger:
    """Ordered record of a run's DP releases.

    Attributes:
      unit: what one neighbouring dataset differs by: "example", "user" or "partition".
      neighboring_relation: "add_or_remove_one" or "replace_one".
      delta: the delta at which eps is reported.
      target_epsilon: optional budget; `check_budget` refuses releases beyond it.
      metadata: free-form description (dataset size, sampling, clip norm, ...).
    """

    unit: str
    neighboring_relation: str
    delta: float
    target_epsilon: float | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    entries: list[tuple[DpEvent, int]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.neighboring_relation not in RELATIONS:
            raise ValueError(
                f"neighboring_relation must be one of {tuple(RELATIONS)}, "
                f"got {self.neighboring_relation!r}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")

    @property
    def relation(self) -> accounting.NeighboringRelation:
        """The accountant's neighbouring relation of `neighboring_relation`."""
        return RELATIONS[self.neighboring_relation]

    def record(self, event: DpEvent, count: int = 1) -> None:
        """Appends `count` repetitions of `event` (merged with an identical last entry).

        Raises:
          ValueError: for a count that is not a whole number >= 1, an event with a NaN
            (`accounting.check_event`), or one the RDP accountant cannot account for.
        """
        if not (accounting.is_whole_number(count) and count >= 1):
            raise ValueError(f"count must be a whole number >= 1, got {count}")
        count = int(count)
        accounting.check_event(event)
        if not accounting.make_accountant("rdp", self.relation).supports(event):
            raise ValueError(
                f"{event} is not supported under {self.neighboring_relation}: "
                "it could not be accounted for"
            )
        if self.entries and self.entries[-1][0] == event:
            self.entries[-1] = (event, self.entries[-1][1] + count)
        else:
            self.entries.append((event, count))

    @property
    def num_releases(self) -> int:
        """How many events were recorded (counts summed)."""
        return sum(count for _, count in self.entries)

    def first(self, releases: int) -> "PrivacyLedger":
        """A copy holding only the first `releases` recorded events (what eps was then).

        Raises:
          ValueError: `releases` is negative or more than were recorded.
        """
        if not 0 <= releases <= self.num_releases:
            raise ValueError(f"releases must be in [0, {self.num_releases}], got {releases}")
        entries, left = [], releases
        for event, count in self.entries:
            if left == 0:
                break
            entries.append((event, min(count, left)))
            left -= entries[-1][1]
        return dataclasses.replace(self, metadata=dict(self.metadata), entries=entries)

    def composed_event(self) -> DpEvent:
        """All recorded events as one DpEvent."""
        events = [e if c == 1 else dp_event.SelfComposedDpEvent(e, c) for e, c in self.entries]
        return dp_event.ComposedDpEvent(events)

    def with_recorded(self, event: DpEvent, count: int = 1) -> "PrivacyLedger":
        """A copy that has also recorded `count` x `event` (none at 0).

        What-if eps (`epsilon_with`, calibration on resume) is computed on this copy, so
        it composes the entries as recording will merge them (k + n repetitions, not k
        and n) and equals, to the last bit, what the ledger reports afterwards.
        """
        after = dataclasses.replace(self, metadata=dict(self.metadata), entries=list(self.entries))
        if count != 0:
            after.record(event, count)
        return after

    def epsilon(self, accountant: str = "rdp") -> float | None:
        """eps at `self.delta` of everything recorded (None: accountant unsupported)."""
        return accounting.epsilon(self.composed_event(), self.delta, self.relation, accountant)

    def epsilon_with(self, event: DpEvent, count: int = 1) -> float:
        """RDP eps the ledger would have after recording `count` x `event`.

        Raises:
          ValueError: the RDP accountant cannot account for `event` (as `record`).
        """
        after = self.with_recorded(event, count)
        return accounting.rdp_epsilon(after.composed_event(), self.delta, self.relation)

    def check_budget(self, event: DpEvent, count: int = 1) -> None:
        """Raises BudgetExceededError if recording `event` would exceed target_epsilon."""
        if self.target_epsilon is None:
            return
        eps = self.epsilon_with(event, count)
        if eps > self.target_epsilon:
            raise BudgetExceededError(
                f"recording {count} more release(s) would bring eps to "
                f"{accounting.format_upper(eps, 5)} > "
                f"target {self.target_epsilon}"
            )

    def affordable_count(self, event: DpEvent, max_count: int) -> int:
        """Largest n <= max_count such that n more `event`s keep eps <= target (RDP)."""
        if max_count < 0:
            raise ValueError(f"max_count must be >= 0, got {max_count}")
        if self.target_epsilon is None:
            return max_count
        lo, hi = 0, max_count  # invariant: lo affordable
        if self.epsilon_with(event, hi) <= self.target_epsilon:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_with(event, mid) <= self.target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def to_json(self, with_pld: bool = True) -> dict[str, Any]:
        """The ledger.json contract: eps by both accountants, unit, relation, events."""
        eps_pld = self.epsilon("pld") if with_pld and self.entries else None
        return {
            "epsilon_rdp": self.epsilon("rdp") if self.entries else 0.0,
            "epsilon_pld": eps_pld if self.entries else 0.0,
            "delta": self.delta,
            "unit": self.unit,
            "neighboring_relation": self.neighboring_relation,
            "target_epsilon": self.target_epsilon,
            "num_releases": self.num_releases,
            "metadata": self.metadata,
            "events": [
                event_to_json(e if c == 1 else dp_event.SelfComposedDpEvent(e, c))
                for e, c in self.entries
            ],
            "pld_note": None
            if eps_pld is not None or not self.entries
            else "not computed in this copy (with_pld=False)"
            if not with_pld
            else "the PLD accountant does not support these events under this relation",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PrivacyLedger":
        """Rebuilds a ledger from `to_json` output; eps is recomputed from the events."""
        ledger = cls(
            unit=data["unit"],
            neighboring_relation=data["neighboring_relation"],
            delta=data["delta"],
            target_epsilon=data.get("target_epsilon"),
            metadata=dict(data.get("metadata", {})),
        )
        for item in data["events"]:  # through `record`: the same checks as a live release
            event = event_from_json(item)
            if isinstance(event, dp_event.SelfComposedDpEvent):
                ledger.record(event.event, event.count)
            else:
                ledger.record(event)
        return ledger

