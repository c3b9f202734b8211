"""The cluster directory: the newest registration wins, in any order of arrival."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from evserver.state.directory import Directory, Location
from evserver.state.hlc import Stamp
from evserver.wire.messages import EncoderState

OFF, ON, STREAMING = EncoderState.OFFLINE, EncoderState.ONLINE, EncoderState.STREAMING


def loc(server: str, wall: int, seq: int, state: int, encoder: str = "cam") -> Location:
    return Location(encoder, server, Stamp(wall, 0, server), seq, state)


def test_newer_registration_wins_and_old_server_cannot_take_it_back() -> None:
    d = Directory("s3")
    assert d.apply(loc("s1", 100, 0, ON))
    assert d.apply(loc("s2", 200, 0, ON))  # the encoder moved to s2
    # s1 notices its stale session closing, later in time: no effect.
    assert not d.apply(loc("s1", 100, 1, OFF))
    assert d.where("cam") == loc("s2", 200, 0, ON)
    assert d.apply(loc("s2", 200, 1, STREAMING))
    assert d.apply(loc("s2", 200, 2, OFF))
    assert d.where("cam") is None


def test_server_lost_takes_its_encoders_offline() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 0, ON, "a"))
    d.apply(loc("s2", 100, 0, ON, "b"))
    changed = d.server_lost("s1")
    assert [(c.encoder_id, c.state) for c in changed] == [("a", OFF)]
    assert d.where("a") is None and d.where("b") is not None
    # When the encoder registers again elsewhere, that wins.
    assert d.apply(loc("s2", 300, 0, ON, "a"))
    assert d.where("a").server_id == "s2"


def test_a_server_wrongly_declared_dead_comes_back() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 0, ON))
    d.server_lost("s1")
    assert d.where("cam") is None
    # It re-announces its registration (next seq) when the link is back.
    assert d.apply(loc("s1", 100, 1, STREAMING))
    d.server_back("s1")
    assert d.where("cam") == loc("s1", 100, 1, STREAMING)


@st.composite
def histories(draw: st.DrawFn) -> list[Location]:
    """Registrations of one encoder moving between servers, each with state changes."""
    out = []
    wall = 0
    for _ in range(draw(st.integers(1, 5))):
        server = draw(st.sampled_from(["s1", "s2", "s3"]))
        wall += draw(st.integers(1, 50))
        states = draw(st.lists(st.sampled_from([ON, STREAMING]), min_size=1, max_size=4))
        seq = 0
        for state in states:
            out.append(loc(server, wall, seq, state))
            seq += 1
        if draw(st.booleans()):
            out.append(loc(server, wall, seq, OFF))
    return out


@given(histories(), st.randoms(use_true_random=False))
def test_any_order_of_arrival_converges(history: list[Location], rnd: random.Random) -> None:
    in_order = Directory("x")
    in_order.merge(history)
    shuffled = list(history) * 2
    rnd.shuffle(shuffled)
    other = Directory("y")
    other.merge(shuffled)
    assert in_order.entries == other.entries
    # The result is the newest announcement of the newest registration.
    newest = max(history, key=lambda entry: entry.version)
    assert in_order.entries["cam"] == newest
