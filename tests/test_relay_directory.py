"""The relay core's side of the cluster directory: news, restarts, what viewers are told."""

from __future__ import annotations

from twisted.internet.task import Clock

from evserver.state.directory import Location
from evserver.state.hlc import Stamp
from evserver.state.relay import RelayCore
from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode
from tests.corefakes import Link, Registry

OFF, ON, STREAMING = m.EncoderState.OFFLINE, m.EncoderState.ONLINE, m.EncoderState.STREAMING
SERVERS = (m.ServerInfo("s1", "10.0.0.1", 1, 2, 3), m.ServerInfo("s2", "10.0.0.2", 1, 2, 3))


def loc(server: str, wall: int, seq: int, state: int, encoder: str = "cam") -> Location:
    return Location(encoder, server, Stamp(wall, 0, server), seq, state)


def core_with_viewer(server_id: str = "s3") -> tuple[RelayCore, Link]:
    clock = Clock()
    clock.advance(1000.0)
    core = RelayCore(clock, server_id, Registry("cam", "cam2"), lambda: SERVERS)
    link = Link()
    viewer = core.viewer_connected("alice", "north", link)
    viewer.list_encoders(1)
    return core, link


def test_remote_locations_returns_the_news_as_received() -> None:
    core, link = core_with_viewer()
    first = loc("s1", 100, 0, ON)
    assert core.remote_locations([first]) == [first]
    # Heard again from another peer: not news, nothing told twice.
    assert core.remote_locations([first]) == []
    # Older, or a server taking back a newer registration elsewhere: not news.
    moved = loc("s2", 200, 0, STREAMING)
    assert core.remote_locations([moved, loc("s1", 100, 1, OFF), first]) == [moved]
    assert link.updates() == [("cam", ON, "s1"), ("cam", STREAMING, "s2")]


def test_announcements_of_our_own_registrations_are_not_taken_from_others() -> None:
    """This server is the authority for its registrations: an echo of an earlier run's
    (a peer forwarding what it held) neither enters the directory nor is forwarded."""
    core, link = core_with_viewer("s3")
    assert core.remote_locations([loc("s3", 100, 0, ON)]) == []
    assert core.locations.where("cam") is None
    assert link.updates() == []


def test_news_of_a_server_declared_dead_here_is_kept_and_shown_when_it_is_back() -> None:
    core, link = core_with_viewer()
    core.remote_locations([loc("s1", 100, 0, ON)])
    core.server_lost("s1")
    # Forwarded by a peer that still hears s1: kept (and forwarded on), not shown.
    news = loc("s1", 100, 1, STREAMING)
    assert core.remote_locations([news]) == [news]
    assert core.hosted_elsewhere("cam") is None
    core.server_back("s1")
    assert link.updates() == [("cam", ON, "s1"), ("cam", OFF, ""), ("cam", STREAMING, "s1")]


def test_a_restarted_server_s_earlier_registrations_are_offline_and_viewers_told() -> None:
    core, link = core_with_viewer()
    core.remote_locations([loc("s1", 100, 0, STREAMING), loc("s1", 500, 0, ON, "cam2")])
    assert core.hosted_elsewhere("cam") == SERVERS[0]
    core.server_restarted("s1", 300)
    assert core.hosted_elsewhere("cam") is None
    assert core.hosted_elsewhere("cam2") == SERVERS[0]
    assert link.updates()[-1] == ("cam", OFF, "")
    # A forwarded announcement of the earlier run, heard late, shows nothing online
    # (it is news all the same: it replaces the older entry).
    late = loc("s1", 100, 1, STREAMING)
    assert core.remote_locations([late]) == [late]
    assert core.hosted_elsewhere("cam") is None
    assert link.updates()[-1] == ("cam", OFF, "")


def test_a_registration_of_an_earlier_run_does_not_supersede_a_local_session() -> None:
    core, _ = core_with_viewer("s3")
    enc_link = Link()
    session = core.encoder_connected("cam", "Camera cam", "north", enc_link)
    core.server_restarted("s1", session.epoch.wall_ms + 10)
    newer_but_stale = Location("cam", "s1", Stamp(session.epoch.wall_ms + 5, 0, "s1"), 0, ON)
    core.remote_locations([newer_but_stale])
    assert enc_link.closed == [] and core.encoders["cam"] is session
    # A registration of the running incarnation does.
    core.remote_locations([Location("cam", "s1", Stamp(session.epoch.wall_ms + 20, 0, "s1"),
                                    0, ON)])
    assert [code for code, _ in enc_link.closed] == [ErrorCode.SUPERSEDED]
    assert "cam" not in core.encoders


def test_the_core_knows_when_its_process_started() -> None:
    clock = Clock()
    clock.advance(1234.5)
    core = RelayCore(clock, "s1", Registry(), lambda: ())
    clock.advance(10.0)
    session = core.encoder_connected("cam", "Camera", "north", Link())
    assert core.started_at == 1234.5
    assert session.epoch.wall_ms >= core.started_at * 1000
