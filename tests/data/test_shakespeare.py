"""Tests of the Shakespeare play parser and the (play, role) clients."""

import collections

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


@pytest.fixture(scope="module")
def held_out():
    # min_lines=2: every role with a train and a test line is a candidate client.
    return data.load_shakespeare(min_lines=2, num_held_out=4)


def test_held_out_plays_are_the_last_in_name_order(held_out):
    expected = shakespeare.play_names()[-4:]
    assert held_out.held_out_plays == expected, (
        f"the held-out plays must be the last 4 in sorted name order, a fixed and "
        f"documented set: got {held_out.held_out_plays}, expected {expected}"
    )


def test_held_out_plays_contribute_no_client_and_other_plays_keep_theirs(held_out):
    everyone = data.load_shakespeare(min_lines=2)
    expected = [c for c in everyone.client_ids if c[0] not in held_out.held_out_plays]
    assert held_out.client_ids == expected, (
        "holding out plays must drop exactly their roles from the clients: "
        f"{sorted(set(held_out.client_ids) ^ set(expected))[:5]} differ"
    )


def test_clients_hold_no_line_of_a_held_out_play(held_out):
    # Short lines ("Ay, my lord.") recur across plays: check the held-out plays' own lines.
    lines_of = collections.defaultdict(set)
    for path in shakespeare.plays_dir().glob("**/*.md"):
        lines_of[path.stem] |= {line for _, line in shakespeare.parse_play(path.read_text())}
    others = set().union(*(v for k, v in lines_of.items() if k not in held_out.held_out_plays))
    own = set().union(*(lines_of[p] for p in held_out.held_out_plays)) - others
    assert len(own) > 1000, f"only {len(own)} lines are the held-out plays' own: check is weak"
    client_lines = {
        line for text in held_out.train + held_out.test for line in text.split("\n")
    }
    leaked = own & client_lines
    assert not leaked, (
        f"{len(leaked)} lines of held-out plays are client text, e.g. {sorted(leaked)[:3]}: "
        "a vocabulary built from them would depend on clients' data"
    )
    held_out_lines = {line for text in held_out.held_out_text for line in text.split("\n")}
    assert own <= held_out_lines, "held_out_text must hold all the held-out plays' lines"


@pytest.mark.parametrize("num_held_out", [-1, 38])
def test_num_held_out_must_leave_a_play_for_the_clients(num_held_out):
    with pytest.raises(ValueError, match="num_held_out"):
        data.load_shakespeare(num_held_out=num_held_out)


def test_split_lines_floors_the_train_share():
    assert shakespeare.split_lines(["a", "b"], 0.8) == ("a", "b"), (
        "2 lines: floor(1.6) = 1 train line, so the test split keeps one")


def test_min_lines_keeps_roles_with_exactly_that_many_lines():
    sizes = {client: len(lines) for client, lines in shakespeare._all_role_lines().items()}
    assert 20 in sizes.values(), "the boundary must be exercised"
    expected = sorted(client for client, n in sizes.items() if n >= 20)
    assert data.load_shakespeare(min_lines=20).client_ids == expected, "min_lines is inclusive"


def test_spellings_of_one_speaker_name_are_one_role():
    play = "**Nurse**\nAy.\n\n**NURSE**  \nNo.\n\n**ROSENCRANTZ: & GUILDENSTERN:**\nWe will.\n"
    roles = [role for role, _ in shakespeare.parse_play(play)]
    assert roles == ["NURSE", "NURSE", "ROSENCRANTZ & GUILDENSTERN"], (
        f"spellings of one name became the roles {roles}: one role would be two clients"
    )


def test_a_name_broken_over_two_lines_is_joined_and_is_not_speech():
    play = (
        "**GLOUCESTER**\nWho speaks?\nBISHOP\n\n**OF WINCHESTER**  \nI do.\nGhost\n\n"
        "**of BUCKINGHAM**\nDespair.\n\n**ANTIPHOLUS**\nLet us in.\nOF EPHESUS\n\n**LUCE**\nNo.\n"
    )
    lines = list(shakespeare.parse_play(play))
    assert lines == [
        ("GLOUCESTER", "Who speaks?"),
        ("BISHOP OF WINCHESTER", "I do."),
        ("GHOST OF BUCKINGHAM", "Despair."),
        ("ANTIPHOLUS OF EPHESUS", "Let us in."),
        ("LUCE", "No."),
    ], f"parsed {lines}: a name's first or last part was taken as the speech of another role"


def test_no_play_has_two_clients_of_one_speaker_name(plays):
    roles = collections.Counter(
        (play, shakespeare.role_name(role)) for play, role in plays.client_ids
    )
    twice = [client for client, count in roles.items() if count > 1]
    assert not twice, f"{twice} are two clients each: one user's lines in two clients"
    assert ("cymbeline", "POSTHUMUS LEONATUS") in plays.client_ids, "Posthumus is missing"


def test_misspelt_speaker_names_are_mended():
    roles = {role for _, role in shakespeare._all_role_lines()}
    for wrong in ("SU FFOLK", "POMPHEY", "KATARINA", "FIRST MURDER"):
        assert wrong not in roles, f"{wrong!r} is a role of its own beside its right spelling"
