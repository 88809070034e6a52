"""Where a profiled device's time went: a summary of a `jax.profiler.trace` (an XSpace).

`jax.profiler.trace(dir)` writes `dir/plugins/profile/<run>/<host>.xplane.pb`, a
serialized `XSpace` (tsl/profiler/protobuf/xplane.proto). The usual readers (TensorBoard's
profile plugin, xprof) are not installed on the device machine, so this reads the few
fields a summary needs straight from protobuf's wire format:

  XSpace.planes (1) -> XPlane {name (2), lines (3), event_metadata (4): map id -> meta}
  XLine {name (2), events (4)};  XEvent {metadata_id (1), offset_ps (2), duration_ps (3)}
  XEventMetadata {id (1), name (2), display_name (4)}

On a GPU the device plane ("/device:GPU:0") has one line per CUDA stream whose events are
the kernels and copies XLA launched; their summed durations per name say which kernels
the time went to, and their count how many launches a round makes.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
from collections.abc import Iterator


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of a serialized message, in order.

    Varints come as ints, length-delimited fields as memoryviews, fixed-width fields as
    their raw bytes.
    """
    buf = memoryview(buf)
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = buf[i : i + width], i + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        yield number, value


@dataclasses.dataclass
class LineSummary:
    """One line (a CUDA stream, a host thread) of a plane: its events' count and time."""

    name: str
    events: int = 0
    busy_ps: int = 0
    first_ps: int | None = None
    last_ps: int = 0


@dataclasses.dataclass
class PlaneSummary:
    """Per line and per event name (kernel), the count and summed duration of the events."""

    name: str
    lines: list[LineSummary]
    by_name: dict[str, tuple[int, int]]  # name -> (count, summed duration in ps)


def _int(value: int | memoryview) -> int:
    """A varint field's value (a field of another wire type here is not an XSpace's)."""
    if not isinstance(value, int):
        raise ValueError("expected a varint field, got a length-delimited or fixed one")
    return value


def _bytes(value: int | memoryview) -> memoryview:
    """A length-delimited field's bytes (a varint here is not an XSpace's)."""
    if not isinstance(value, memoryview):
        raise ValueError("expected a length-delimited field, got a varint")
    return value


def _text(value: int | memoryview) -> str:
    return bytes(_bytes(value)).decode(errors="replace")


def _metadata_entry(entry: memoryview) -> tuple[int, str]:
    """(id, name) of one `event_metadata` map entry (its display name if it has no name)."""
    key, name, display = 0, "", ""
    for number, value in fields(entry):
        if number == 1:
            key = _int(value)
        elif number == 2:
            for meta_field, meta_value in fields(_bytes(value)):
                if meta_field == 2:
                    name = _text(meta_value)
                elif meta_field == 4:
                    display = _text(meta_value)
    return key, name or display


def _event(event: memoryview) -> tuple[int, int, int]:
    """(metadata id, offset in ps, duration in ps) of one XEvent."""
    got = {1: 0, 2: 0, 3: 0}
    for number, value in fields(event):
        if number in got:
            got[number] = _int(value)
    return got[1], got[2], got[3]


def _line(line: memoryview, by_id: dict[int, list[int]]) -> LineSummary:
    """One XLine's summary; adds each event's count and duration to `by_id`."""
    summary = LineSummary(name="")
    for number, value in fields(line):
        if number == 2:
            summary.name = _text(value)
        elif number == 4:
            meta_id, offset, duration = _event(_bytes(value))
            summary.events += 1
            summary.busy_ps += duration
            summary.first_ps = offset if summary.first_ps is None else min(summary.first_ps,
                                                                           offset)
            summary.last_ps = max(summary.last_ps, offset + duration)
            by_id[meta_id][0] += 1
            by_id[meta_id][1] += duration
    return summary


def summarize_plane(plane: bytes | memoryview) -> PlaneSummary:
    """The `PlaneSummary` of one serialized XPlane, in one pass over its fields."""
    plane_name, lines, names = "", [], {}
    by_id: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for number, value in fields(plane):
        if number == 2:
            plane_name = _text(value)
        elif number == 3:
            lines.append(_line(_bytes(value), by_id))
        elif number == 4:
            meta_id, name = _metadata_entry(_bytes(value))
            names[meta_id] = name
    by_name: dict[str, tuple[int, int]] = {}
    for meta_id, (count, total) in by_id.items():
        name = names.get(meta_id, f"#{meta_id}")
        old_count, old_total = by_name.get(name, (0, 0))
        by_name[name] = (old_count + count, old_total + total)
    return PlaneSummary(plane_name, lines, by_name)


def summarize_space(space: bytes) -> list[PlaneSummary]:
    """A `PlaneSummary` for each plane of a serialized XSpace."""
    return [summarize_plane(_bytes(value)) for number, value in fields(space) if number == 1]


def find_trace(trace_dir: str) -> str:
    """The newest `*.xplane.pb` that `jax.profiler.trace(trace_dir)` wrote."""
    found = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
    if not found:
        raise FileNotFoundError(f"no plugins/profile/*/*.xplane.pb under {trace_dir}")
    return max(found, key=os.path.getmtime)


def report(trace_dir: str, per: int = 1, plane_prefix: str = "/device:", top: int = 15) -> str:
    """A text table of the planes named `plane_prefix*`: lines, then the `top` event names.

    Times (microseconds) and counts are divided by `per` (e.g. the rounds traced), so they
    read per round.
    """
    with open(find_trace(trace_dir), "rb") as f:
        planes = [p for p in summarize_space(f.read()) if p.name.startswith(plane_prefix)]
    if not planes:
        return f"no plane named {plane_prefix}* in the trace"
    out = []
    for plane in planes:
        out.append(f"plane {plane.name} (per {per}):")
        for line in plane.lines:
            span = 0 if line.first_ps is None else line.last_ps - line.first_ps
            out.append(f"  line {line.name!r}: {line.events / per:.0f} events, busy "
                       f"{line.busy_ps / per / 1e6:.1f} us over a span of "
                       f"{span / per / 1e6:.1f} us")
        ranked = sorted(plane.by_name.items(), key=lambda kv: -kv[1][1])[:top]
        for name, (count, total) in ranked:
            out.append(f"  {total / per / 1e6:10.1f} us {count / per:7.1f} x  {name[:110]}")
    return "\n".join(out)
