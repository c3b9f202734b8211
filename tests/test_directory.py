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


def test_the_end_of_a_later_registration_elsewhere_ends_the_older_one() -> None:
    """A server frozen while the encoder moved from s3 to s4 and then stopped hears,
    once thawed, only s4's last word (offline): the encoder is offline, not on s3."""
    d = Directory("s2")
    d.apply(loc("s3", 100, 1, STREAMING))
    assert d.apply(loc("s4", 200, 3, OFF))
    assert d.where("cam") is None
    # s3's own late word on its older registration changes nothing.
    assert not d.apply(loc("s3", 100, 2, OFF))
    assert d.entries["cam"] == loc("s4", 200, 3, OFF)


def test_server_lost_takes_its_encoders_offline() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 0, ON, "a"))
    d.apply(loc("s2", 100, 0, ON, "b"))
    changed = d.server_lost("s1")
    assert [(c.encoder_id, c.state) for c in changed] == [("a", OFF)]
    assert d.where("a") is None and d.where("b") is not None
    # When the encoder registers again elsewhere, that wins.
    assert d.apply(loc("s2", 300, 0, ON, "a"))
    assert d.where("a") == loc("s2", 300, 0, ON, "a")


def test_a_server_wrongly_declared_dead_comes_back() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 0, ON))
    d.server_lost("s1")
    assert d.where("cam") is None
    # It re-announces its registration (next seq) when the link is back: merged,
    # but shown only once the server counts as alive again.
    merged = d.merge_one(loc("s1", 100, 1, STREAMING))
    assert (merged.stored, merged.changed) == (True, False)
    assert d.server_back("s1") == [loc("s1", 100, 1, STREAMING)]
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


# -- news (what a server forwards) ----------------------------------------------------


def test_an_announcement_is_news_once_and_only_if_newer() -> None:
    d = Directory("s3")
    first = d.merge_one(loc("s1", 100, 0, ON))
    assert (first.stored, first.changed) == (True, True)
    # The same announcement again (forwarded by another peer): not news.
    assert not d.merge_one(loc("s1", 100, 0, ON)).stored
    # A newer one with the same visible state is news (forwarded) but shows nothing new.
    bump = d.merge_one(loc("s1", 100, 1, ON))
    assert (bump.stored, bump.changed) == (True, False)
    # Older ones, and a server taking back a newer registration elsewhere: not news.
    assert d.merge_one(loc("s2", 200, 0, ON)).stored
    assert not d.merge_one(loc("s1", 100, 5, STREAMING)).stored
    assert not d.merge_one(loc("s1", 100, 6, OFF)).stored
    assert d.where("cam") == loc("s2", 200, 0, ON)


def test_news_of_a_lost_server_is_stored_but_not_shown() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 0, ON))
    d.server_lost("s1")
    # s1 is dead here, alive elsewhere: its news is forwarded to us all the same.
    merged = d.merge_one(loc("s1", 100, 1, STREAMING))
    assert (merged.stored, merged.changed) == (True, False)
    assert d.where("cam") is None
    assert d.server_back("s1") == [loc("s1", 100, 1, STREAMING)]


def test_snapshot_leaves_out_the_entries_of_the_server_it_is_for() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 0, ON, "a"))
    d.apply(loc("s2", 100, 0, ON, "b"))
    d.apply(loc("s3", 100, 0, OFF, "c"))
    assert {e.encoder_id for e in d.snapshot()} == {"a", "b", "c"}
    assert {e.encoder_id for e in d.snapshot(exclude_server="s1")} == {"b", "c"}


# -- a restarted server ----------------------------------------------------------------


def test_a_restart_ends_the_registrations_of_the_earlier_run() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 2, STREAMING, "a"))
    d.apply(loc("s1", 500, 0, ON, "b"))  # stamped in the new run: it stays
    d.apply(loc("s2", 100, 0, ON, "c"))  # another server's: it stays
    ended = d.server_restarted("s1", 300)
    assert ended == [loc("s1", 100, 2, OFF, "a")]
    assert d.where("a") is None
    assert d.where("b") == loc("s1", 500, 0, ON, "b")
    assert d.where("c") is not None
    # Idempotent; an older boot (a late MemberList) changes nothing.
    assert d.server_restarted("s1", 300) == []
    assert d.server_restarted("s1", 200) == []
    # This server's own registrations are its own business.
    d.apply(loc("s3", 100, 0, ON, "d"))
    assert d.server_restarted("s3", 300) == []
    assert d.where("d") is not None


def test_a_registration_of_an_earlier_run_heard_late_is_offline() -> None:
    """Forwarded by a server that had not heard of the restart: merged as offline, and
    it ends an older registration elsewhere (it had superseded it)."""
    d = Directory("s3")
    d.apply(loc("s2", 50, 0, ON))
    d.server_restarted("s1", 300)
    merged = d.merge_one(loc("s1", 100, 3, STREAMING))
    assert (merged.stored, merged.changed) == (True, True)
    assert d.entries["cam"] == loc("s1", 100, 3, OFF)
    assert d.where("cam") is None
    # The new run's registration counts.
    assert d.apply(loc("s1", 400, 0, ON))
    assert d.where("cam") == loc("s1", 400, 0, ON)


def test_a_restart_while_declared_dead_keeps_the_old_registrations_from_coming_back() -> None:
    d = Directory("s3")
    d.apply(loc("s1", 100, 0, ON))
    assert d.server_lost("s1") == [loc("s1", 100, 0, OFF)]
    assert d.server_restarted("s1", 300) == []  # already shown offline
    assert d.server_back("s1") == []
    assert d.where("cam") is None


@given(histories(), st.randoms(use_true_random=False), st.integers(0, 300))
def test_any_order_of_arrival_and_of_the_restart_converges(
        history: list[Location], rnd: random.Random, boot: int) -> None:
    """Wherever the news of s1's restart falls among the announcements, the result is
    the same, and no registration of s1's earlier run shows."""
    events: list[Location | None] = [*history, *history, None]
    rnd.shuffle(events)
    shuffled = Directory("x")
    for event in events:
        if event is None:
            shuffled.server_restarted("s1", boot)
        else:
            shuffled.apply(event)
    in_order = Directory("y")
    in_order.server_restarted("s1", boot)
    in_order.merge(history)
    assert shuffled.entries == in_order.entries
    where = in_order.where("cam")
    assert where is None or where.server_id != "s1" or where.epoch.wall_ms >= boot
