"""ClusterService on its own: what it does with peers' frames and membership changes.

The service runs on a ``task.Clock`` with fake peer connections (the handshake
is taken as done): what each peer and each viewer is sent, and in which order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from evserver.cluster import service as cluster_service
from evserver.cluster.ca import create_cluster
from evserver.cluster.service import ClusterService, directory_frames
from evserver.state.directory import Location
from evserver.state.hlc import Stamp
from evserver.state.membership import PeerState
from evserver.state.relay import RelayCore
from evserver.wire import messages as m
from evserver.wire import peer as p
from evserver.wire.framing import ErrorCode
from tests.corefakes import Link, Registry

T0 = 1_700_000_000.0
OFF, ON, STREAMING = m.EncoderState.OFFLINE, m.EncoderState.ONLINE, m.EncoderState.STREAMING


def address(sid: str) -> p.ExternalAddress:
    host = f"10.0.0.{sid[1:]}"
    return p.ExternalAddress(host, 5510, 5520, 5530, 9443, host, 47100)


class Conn:
    """A peer connection whose handshake is done."""

    def __init__(self, cluster_id: str, peer_id: str, incarnation: int) -> None:
        self.peer_id = peer_id
        self.is_server = True
        self.expected_id = None
        self.peer_hello = p.PeerHello(cluster_id, peer_id, incarnation, "test/1",
                                      address(peer_id))
        self.sent: list[Any] = []
        self.connected = True

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.connected = False

    def fail(self, code: ErrorCode, message: str) -> None:
        self.connected = False

    def of(self, kind: type) -> list[Any]:
        return [x for x in self.sent if isinstance(x, kind)]

    def locations(self) -> list[p.Location]:
        return [loc for d in self.of(p.Directory) for loc in d.locations]


class _Port:
    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "10.0.0.1", 47100)

    def stopListening(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class _Nowhere:
    """An endpoint whose connection attempts never complete."""

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.Deferred()


@attrs.define
class World:
    clock: Clock
    core: RelayCore
    service: ClusterService
    viewer: Link

    def connect(self, sid: str, incarnation: int) -> Conn:
        conn = Conn(self.service.cluster_id, sid, incarnation)
        assert self.service.peer_connected(conn)  # type: ignore[arg-type]
        return conn

    def lose(self, conn: Conn) -> None:
        conn.connected = False
        self.service.peer_disconnected(conn, Failure(ConnectionError("reset")))  # type: ignore[arg-type]

    def directory(self, sender: Conn, *locations: Location) -> None:
        self.service.peer_frame(sender, p.Directory(tuple(  # type: ignore[arg-type]
            cluster_service._to_wire(loc) for loc in locations)))

    def told(self) -> list[Any]:
        """What the viewer was told: ('list', server ids) and ('update', id, state, server)."""
        out: list[Any] = []
        for msg in self.viewer.sent:
            if isinstance(msg, m.ServerList):
                out.append(("list", tuple(s.server_id for s in msg.servers)))
            elif isinstance(msg, m.EncoderUpdate):
                e = msg.encoder
                out.append(("update", e.encoder_id, e.state, e.server_id))
        return out


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = Clock()
    clock.advance(T0)
    identity = create_cluster(tmp_path, "s1", ["10.0.0.1"], T0)
    core = RelayCore(clock, "s1", Registry("cam", "cam2", "cam3"), lambda: ())
    service = ClusterService(identity, tmp_path, address("s1"), "tcp:47100", core, None, clock,
                             connector=lambda record: _Nowhere(),
                             listen=lambda factory: defer.succeed(_Port()))
    service.startService()
    viewer = core.viewer_connected("alice", "north", link := Link())
    viewer.list_encoders(1)
    yield World(clock, core, service, link)
    service.stopService()


def loc(server: str, at: float, seq: int, state: int, encoder: str = "cam") -> Location:
    return Location(encoder, server, Stamp(int(at * 1000), 0, server), seq, state)


# -- 1. a server back alive: the ServerList before the updates naming it ---------------


def test_clients_get_a_returning_server_s_address_before_updates_naming_it(
        world: World) -> None:
    inc = int((T0 - 100) * 1_000_000)
    s2 = world.connect("s2", inc)
    world.directory(s2, loc("s2", T0 + 1, 0, STREAMING))
    world.clock.pump([0.25] * 8)  # s2 silent: dead within 1.5 s
    assert world.service.membership.state("s2") is PeerState.DEAD
    dead = world.told()
    # Dead: the updates taking its encoders offline, then the list without it.
    assert dead[-2:] == [("update", "cam", OFF, ""), ("list", ("s1",))]
    world.connect("s2", inc)  # the link is back (same run)
    back = world.told()[len(dead):]
    assert back == [("list", ("s1", "s2")), ("update", "cam", STREAMING, "s2")]


# -- 2. a restarted server: its earlier run's registrations are over ------------------


@pytest.mark.parametrize("down", [0.2, 3.0])
def test_a_peer_back_with_a_higher_incarnation_has_its_old_registrations_ended(
        world: World, down: float) -> None:
    """Back before (0.2 s) or after (3 s) it was declared dead: either way, the viewers
    never hear that the encoder is on it again, and the directory has it offline."""
    s2 = world.connect("s2", int((T0 - 100) * 1_000_000))
    world.directory(s2, loc("s2", T0 - 50, 0, STREAMING), loc("s2", T0 - 40, 0, ON, "cam2"))
    world.lose(s2)
    world.clock.pump([down / 4] * 4)
    before = len(world.told())
    restarted = world.connect("s2", int((T0 + down) * 1_000_000))
    assert world.service.members["s2"].incarnation == int((T0 + down) * 1_000_000)
    told = world.told()[before:]
    assert not [t for t in told if t[0] == "update" and t[3] == "s2"], told
    assert world.core.hosted_elsewhere("cam") is None
    assert world.core.locations.entries["cam"].state == OFF
    # The new run's registrations count.
    world.directory(restarted, loc("s2", T0 + down + 0.1, 0, ON, "cam2"))
    assert world.core.hosted_elsewhere("cam2") is not None
    assert world.told()[-1] == ("update", "cam2", ON, "s2")


def test_a_restart_heard_in_a_member_list_ends_the_old_registrations_and_is_passed_on(
        world: World) -> None:
    """s2 restarted behind a cut link: s3 tells us, and we tell s4."""
    s2 = world.connect("s2", int((T0 - 100) * 1_000_000))
    s3 = world.connect("s3", int((T0 - 100) * 1_000_000))
    s4 = world.connect("s4", int((T0 - 100) * 1_000_000))
    world.directory(s2, loc("s2", T0 - 50, 0, STREAMING))
    sent_before = {c.peer_id: len(c.of(p.MemberList)) for c in (s2, s3, s4)}
    new = int((T0 + 1) * 1_000_000)
    members = world.service.member_list().members
    listed = tuple(attrs.evolve(x, incarnation=new) if x.server_id == "s2" else x
                   for x in members)
    world.service.peer_frame(s3, p.MemberList(listed))  # type: ignore[arg-type]
    assert world.core.hosted_elsewhere("cam") is None
    assert world.told()[-1] == ("update", "cam", OFF, "")
    assert world.service.members["s2"].incarnation == new
    after = {c.peer_id: len(c.of(p.MemberList)) for c in (s2, s3, s4)}
    assert after["s4"] == sent_before["s4"] + 1
    assert after["s2"] == sent_before["s2"]  # it knows its own incarnation
    (latest,) = [x for x in s4.of(p.MemberList)[-1].members if x.server_id == "s2"]
    assert latest.incarnation == new
    # The same list again (or an older one) changes nothing and is not passed on.
    world.service.peer_frame(s3, p.MemberList(listed))  # type: ignore[arg-type]
    world.service.peer_frame(s3, p.MemberList(members))  # type: ignore[arg-type]
    assert len(s4.of(p.MemberList)) == after["s4"]
    assert world.service.members["s2"].incarnation == new


# -- 3. directory news is forwarded ------------------------------------------------------


def test_directory_news_is_forwarded_to_the_other_peers_once(world: World) -> None:
    inc = int((T0 - 100) * 1_000_000)
    s2, s3, s4 = (world.connect(sid, inc) for sid in ("s2", "s3", "s4"))
    for c in (s2, s3, s4):
        c.sent.clear()
    on_s2 = loc("s2", T0 - 5, 0, STREAMING)
    on_s3 = loc("s3", T0 - 5, 0, ON, "cam2")  # s2 forwarding what s3 said
    world.directory(s2, on_s2, on_s3)
    wire = cluster_service._to_wire
    assert s2.locations() == []  # not back to the sender
    assert s3.locations() == [wire(on_s2)]  # not its own registration
    assert s4.locations() == [wire(on_s2), wire(on_s3)]
    # The same news forwarded back by s4: not news any more, nothing sent.
    world.directory(s4, on_s2, on_s3)
    assert len(s2.locations()) + len(s3.locations()) + len(s4.locations()) == 3
    assert world.core.hosted_elsewhere("cam") is not None


def test_a_forwarded_announcement_never_overrides_a_newer_one_from_the_host(
        world: World) -> None:
    inc = int((T0 - 100) * 1_000_000)
    s2, s3, s4 = (world.connect(sid, inc) for sid in ("s2", "s3", "s4"))
    world.directory(s2, loc("s2", T0 - 5, 3, OFF))
    for c in (s2, s3, s4):
        c.sent.clear()
    # s3 forwards an older word of s2 on the same registration: ignored, not forwarded.
    world.directory(s3, loc("s2", T0 - 5, 1, STREAMING))
    assert world.core.locations.entries["cam"] == loc("s2", T0 - 5, 3, OFF)
    assert s2.locations() == s3.locations() == s4.locations() == []
    assert world.core.hosted_elsewhere("cam") is None


def test_a_new_peer_hears_every_location_but_its_own(world: World) -> None:
    inc = int((T0 - 100) * 1_000_000)
    s2 = world.connect("s2", inc)
    assert s2.of(p.Directory) == [p.Directory(())]  # nothing held yet: an empty one
    world.connect("s3", inc)
    world.directory(s2, loc("s2", T0 - 5, 0, ON), loc("s3", T0 - 4, 0, ON, "cam2"))
    session = world.core.encoder_connected("cam3", "Camera cam3", "north", Link())
    s2.sent.clear()
    world.lose(s2)
    again = world.connect("s2", inc)
    held = {(x.encoder_id, x.server_id) for x in again.locations()}
    assert held == {("cam2", "s3"), ("cam3", "s1")}
    assert session.seq > 0  # announced again


def test_directory_frames_are_bounded_and_keep_every_location() -> None:
    locations = [p.Location(f"encoder-{i:05d}-" + "x" * 200, "s2",
                            Stamp(1_700_000_000_000 + i, 0, "s2").encode(), i, 1)
                 for i in range(3000)]
    frames = directory_frames(locations, max_bytes=64 * 1024)
    assert len(frames) > 1
    assert all(len(m.encode(f)) <= 64 * 1024 for f in frames)
    assert [x for f in frames for x in f.locations] == locations
    # Packed: every frame but the last could not take the next location.
    for f, nxt in itertools.pairwise(frames):
        one = len(m.encode(p.Directory((nxt.locations[0],)))) - len(m.encode(p.Directory(())))
        assert len(m.encode(f)) + one > 64 * 1024
    assert directory_frames([]) == []
    assert all(len(m.encode(f)) <= p.BATCH_BYTES for f in directory_frames(locations))


# -- 4. dialling a peer ---------------------------------------------------------------


def test_a_peer_is_dialled_with_a_short_connection_timeout(tmp_path: Path) -> None:
    """RTTs between servers are at most 100 ms: an attempt unanswered for 0.5 s is
    given up, and the next one starts after the membership's back-off (<= 0.55 s)."""
    reactor = MemoryReactorClock()
    reactor.advance(T0)
    identity = create_cluster(tmp_path, "s1", ["10.0.0.1"], T0)
    core = RelayCore(reactor, "s1", Registry(), lambda: ())
    service = ClusterService(identity, tmp_path, address("s1"), "tcp:47100", core, None,
                             reactor)
    service.add_member("s2", address("s2"))
    reactor.advance(0.01)
    assert [c[3] for c in reactor.tcpClients] == [cluster_service.PEER_CONNECT_TIMEOUT]
    assert cluster_service.PEER_CONNECT_TIMEOUT == 0.5
    service.membership.stop()


def test_the_incarnation_is_when_the_process_started(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0)
    identity = create_cluster(tmp_path, "s1", ["10.0.0.1"], T0)
    core = RelayCore(clock, "s1", Registry("cam"), lambda: ())
    session = core.encoder_connected("cam", "Camera", "north", Link())
    clock.advance(30.0)  # multi-site resilience enabled later, in place
    service = ClusterService(identity, tmp_path, address("s1"), "tcp:47100", core, None, clock)
    assert service.incarnation == int(T0 * 1_000_000)
    # The peers take every registration stamped since then for this run's.
    assert session.epoch.wall_ms >= cluster_service._boot_ms(service.incarnation)
