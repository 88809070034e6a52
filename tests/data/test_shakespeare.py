"""Tests of the Shakespeare play parser and the (play, role) clients."""

import pytest

from dpfed import data
from dpfed.data import shakespeare

PLAY = """# A Play

## ACT I

### SCENE I. A street.

_Enter ROMEO and
JULIET_

**ROMEO**\x20\x20
But soft, what light\x20\x20
_[Aside]_ through yonder \\[window] breaks?

**JULIET**\x20\x20
[Aside]_\x20\x20
Ay me.
*[Sighs.]*

More words.

_Exit_

# Epilogue

Not spoken by anyone.
"""


def test_parse_play_keeps_speech_and_drops_directions():
    lines = list(shakespeare.parse_play(PLAY))
    assert lines == [
        ("ROMEO", "But soft, what light"),
        ("ROMEO", "through yonder [window] breaks?"),
        ("JULIET", "Ay me."),
        ("JULIET", "More words."),
    ], f"parsed {lines}"


def test_split_lines_keeps_order_and_puts_the_tail_in_test():
    train, test = shakespeare.split_lines([f"l{i}" for i in range(5)], 0.8)
    assert (train, test) == ("l0\nl1\nl2\nl3", "l4"), f"split {train!r} / {test!r}"


@pytest.fixture(scope="module")
def plays():
    return data.load_shakespeare(min_lines=20)


def test_all_38_plays_are_read(plays):
    assert len({play for play, _ in plays.client_ids}) == 38, "not every play has a client"


def test_clients_are_play_role_pairs_with_both_splits(plays):
    assert ("hamlet", "HAMLET") in plays.client_ids, "Hamlet is not a client of his play"
    assert len(plays.train) == len(plays.test) == plays.num_clients, "splits misaligned"
    assert all(plays.train) and all(plays.test), "a client has an empty split"


def test_min_lines_filters_small_roles(plays):
    pairs = zip(plays.train, plays.test, strict=True)
    fewest = min(train.count("\n") + test.count("\n") + 2 for train, test in pairs)
    assert fewest >= 20, f"a client has only {fewest} lines"
    assert data.load_shakespeare(min_lines=100).num_clients < plays.num_clients, "no filtering"


def test_no_markup_is_left_in_text(plays):
    text = "\n".join(plays.train + plays.test)
    for markup in ("**", "_Enter", "#", "[Aside]"):
        assert markup not in text, f"markup {markup!r} leaked into the client text"


def test_min_lines_below_two_is_rejected():
    with pytest.raises(ValueError, match="min_lines"):
        data.load_shakespeare(min_lines=1)
