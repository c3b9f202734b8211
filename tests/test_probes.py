"""The peer probes glue (evserver.cluster.probes) without a cluster service.

Each side is a ``PeerProbes`` over a fake cluster (``connections``,
``reactor``, ``core``, ``server_id``, ``membership.view()``); its connection
to the other side encodes every message, decodes it as the peer protocol
does and offers it to the other side's ``frame`` (at once, or after the time
a link of a given rate takes, or never: a cut link).  The relay cores are
real, with fake client links.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock

from evserver.cluster.probes import (
    CONNECTIONS_TIMEOUT,
    REQUEST_ID_BASE,
    ConnectionsAnswer,
    PeerProbes,
    local_connections,
)
from evserver.state.membership import PeerState, PeerView
from evserver.state.relay import Limits, RelayCore
from evserver.wire import messages as m
from evserver.wire import peer as p
from evserver.wire.framing import ErrorCode, ProtocolName
from evserver.wire.messages import EncoderState

FRAME = 64 * 1024


class FakeLink:
    def send(self, msg: Any) -> None:
        pass

    def close_with_error(self, code: Any, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class FakeSink:
    def write(self, data: bytes) -> None:
        pass

    def stalled(self) -> None:
        pass


@attrs.define
class FakeMembership:
    views: dict[str, PeerView] = attrs.Factory(dict)

    def view(self) -> dict[str, PeerView]:
        return dict(self.views)


class FakeCluster:
    """What PeerProbes needs of a ClusterService."""

    def __init__(self, server_id: str, clock: Clock) -> None:
        self.server_id = server_id
        self.reactor = clock
        self.core = RelayCore(clock, server_id, None, lambda: (), Limits())  # type: ignore[arg-type]
        self.connections: dict[str, Conn] = {}
        self.membership = FakeMembership()


class Conn:
    """One side's connection to the other: what it sends arrives at ``peer``'s frame()."""

    def __init__(self, clock: Clock, me: str, is_server: bool) -> None:
        self.clock = clock
        self.me = me
        self.is_server = is_server
        self.peer: PeerProbes | None = None
        self.back: Conn | None = None
        self.sent: list[Any] = []
        self.unhandled: list[Any] = []
        self.cut = False
        self.mbps: float | None = None  # None: delivered at once
        self.busy_until = 0.0

    def send(self, msg: Any) -> None:
        raw = m.encode(msg)
        self.sent.append(msg)
        if self.cut:
            return
        decoded = m.decode_for(ProtocolName.PEER, self.is_server, raw[4], raw[5:])
        if self.mbps is None:
            self._deliver(decoded)
            return
        now = self.clock.seconds()
        self.busy_until = max(now, self.busy_until) + len(raw) * 8 / (self.mbps * 1e6)
        self.clock.callLater(self.busy_until - now, self._deliver, decoded)

    def _deliver(self, msg: Any) -> None:
        assert self.peer is not None and self.back is not None
        if not self.peer.frame(self.me, self.back, msg):
            self.unhandled.append(msg)

    def of(self, cls: type) -> list[Any]:
        return [msg for msg in self.sent if isinstance(msg, cls)]


@attrs.define
class Pair:
    clock: Clock
    one: FakeCluster
    two: FakeCluster
    a: PeerProbes  # ev1's
    b: PeerProbes  # ev2's
    #: The server ids ``a`` reported new bandwidth figures for (``on_measured``).
    measured: list[str]

    @property
    def a_to_b(self) -> Conn:
        return self.one.connections["ev2"]

    @property
    def b_to_a(self) -> Conn:
        return self.two.connections["ev1"]


def make_pair(start: bool = True) -> Pair:
    measured: list[str] = []
    clock = Clock()
    clock.advance(1_700_000_000)
    one, two = FakeCluster("ev1", clock), FakeCluster("ev2", clock)
    a = PeerProbes(one, on_measured=measured.append)
    b = PeerProbes(two)
    a_to_b, b_to_a = Conn(clock, "ev1", False), Conn(clock, "ev2", True)
    a_to_b.peer, a_to_b.back = b, b_to_a
    b_to_a.peer, b_to_a.back = a, a_to_b
    one.connections["ev2"] = a_to_b
    two.connections["ev1"] = b_to_a
    if start:
        for probes, other in ((a, "ev2"), (b, "ev1")):
            probes.start()
            probes.link_up(other)
    return Pair(clock, one, two, a, b, measured)


def fill(core: RelayCore, names: dict[str, str] | None = None) -> None:
    """Two encoders (one streaming to a viewer) and two viewers on ``core``."""
    names = names or {}
    front = core.encoder_connected("cam-1", names.get("cam-1", "Front door"), "ops", FakeLink())
    core.encoder_connected("cam-7", names.get("cam-7", "Entrée nord"), "ops", FakeLink())
    zoe = core.viewer_connected(names.get("zoë", "zoë"), "ops", FakeLink())
    zoe.attach_relay(object(), FakeSink())  # type: ignore[arg-type]
    zoe.watch(1, "cam-1")
    front.media(True, b"k" * 1000)
    front.media(False, b"d" * 500)
    core.viewer_connected("bob", "west", FakeLink())


# -- frames --------------------------------------------------------------------------


def test_only_its_own_messages_are_handled() -> None:
    pair = make_pair()
    conn = pair.b_to_a
    msg: Any
    for msg in (p.Heartbeat(1, 2, p.Load(0, 0, 0, 0)), p.Directory(()), m.Ping(1),
                p.DigestRequest(5, 0), m.Error(ErrorCode.NOT_FOUND, 5, 0, "no digest"),
                m.Error(ErrorCode.RATE_LIMITED, REQUEST_ID_BASE, 1, "fatal: not ours")):
        assert not pair.a.frame("ev2", conn, msg), msg
    for msg in (p.BandwidthProbe(1, 0, 4, b""), p.BandwidthReport(1, 1, 1),
                p.Connections(REQUEST_ID_BASE + 9, (), (), 0)):
        assert pair.a.frame("ev2", conn, msg), msg


def test_each_side_probes_the_other_and_keeps_the_figure() -> None:
    pair = make_pair()
    pair.a_to_b.mbps = 8.0  # one way slow
    pair.b_to_a.mbps = 200.0
    pair.clock.advance(4.9)
    assert pair.a.bandwidth == {} and pair.a_to_b.of(p.BandwidthProbe) == []
    pair.clock.pump([0.01] * 100)
    # ev1 (the smaller id) probed at 5 s; ev2 waits 5 s more, so the probes never cross.
    assert len(pair.a_to_b.of(p.BandwidthProbe)) == 4
    assert len(pair.b_to_a.of(p.BandwidthReport)) == 1
    assert set(pair.a.bandwidth) == {"ev2"} and pair.b.bandwidth == {}
    assert pair.measured == ["ev2"]  # told at once (the status file is rewritten)
    assert pair.b_to_a.of(p.BandwidthProbe) == []
    pair.clock.pump([0.01] * 500)
    assert len(pair.b_to_a.of(p.BandwidthProbe)) == 4
    assert pair.b_to_a.sent.index(pair.b_to_a.of(p.BandwidthProbe)[0]) > 0  # after the report
    assert set(pair.b.bandwidth) == {"ev1"}
    assert pair.a.bandwidth["ev2"].mbps == pytest.approx(8.0, rel=0.05)  # pump's 10 ms steps
    assert pair.a.warnings("ev2") == [
        f"link to ev2 measured {pair.a.bandwidth['ev2'].mbps:.1f} Mbit/s: "
        "below the 10 Mbit/s minimum"]
    assert pair.b.warnings("ev1") == []
    assert pair.a_to_b.unhandled == [] and pair.b_to_a.unhandled == []


def test_the_cross_check_uses_the_membership_round_trip() -> None:
    pair = make_pair()
    pair.one.membership.views["ev2"] = PeerView(PeerState.ALIVE, 1, 5.0, 0.0)
    pair.a_to_b.mbps = 100.0
    pair.clock.advance(5)
    pair.clock.advance(0.05)  # all four frames arrived (21 ms)
    result = pair.a.bandwidth["ev2"]
    assert result.sender_mbps is not None and result.sender_mbps < result.mbps
    pair.clock.advance(5)
    pair.clock.advance(0.01)  # ev1's report crosses the 100 Mbit/s link
    assert pair.b.bandwidth["ev1"].sender_mbps is None  # ev2 has no round trip for ev1


def test_link_down_and_stop_leave_nothing_behind() -> None:
    pair = make_pair()
    pair.a.link_down("ev2")
    pair.b.stop()
    pair.clock.advance(400)
    assert pair.a_to_b.of(p.BandwidthProbe) == [] and pair.b_to_a.of(p.BandwidthProbe) == []
    pair.a.stop()
    assert pair.clock.getDelayedCalls() == []
    pair.a.link_up("ev2")  # after stop: ignored
    assert pair.clock.getDelayedCalls() == []


def test_start_probes_the_links_already_up() -> None:
    pair = make_pair(start=False)
    pair.a.link_up("ev2")  # before start: ignored
    assert pair.clock.getDelayedCalls() == []
    pair.a.start()
    pair.clock.advance(5)
    assert len(pair.a_to_b.of(p.BandwidthProbe)) == 4


# -- connection lists -------------------------------------------------------------------


def answers(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_a_peer_lists_its_encoders_and_viewers() -> None:
    pair = make_pair()
    fill(pair.two.core)
    got = answers(pair.a.connections("ev2"))
    request = pair.a_to_b.of(p.ConnectionsRequest)
    assert len(request) == 1 and request[0].request_id >= REQUEST_ID_BASE
    [answer] = got
    assert isinstance(answer, ConnectionsAnswer)
    assert (answer.server_id, answer.at, answer.truncated) == ("ev2", pair.clock.seconds(),
                                                               False)
    assert answer.encoders == (
        p.ConnectedEncoder("cam-1", "Front door", "ops", EncoderState.STREAMING, 1, 2, 1500),
        p.ConnectedEncoder("cam-7", "Entrée nord", "ops", EncoderState.ONLINE, 0, 0, 0))
    [bob, zoe] = answer.viewers
    assert (bob.account, bob.domain, bob.watching, bob.relay_connected) == (
        "bob", "west", (), 0)
    assert (zoe.account, zoe.watching, zoe.relay_connected) == (
        "zoë", (p.Watched("cam-1"),), 1)
    assert zoe.frames_out >= 1 and zoe.bytes_out >= 1000
    # The answer is what this server's own core says.
    assert pair.b_to_a.of(p.Connections)[0] == local_connections(
        pair.two.core, request[0].request_id)


def test_answers_are_shared_and_reused_for_a_second() -> None:
    pair = make_pair()
    pair.a_to_b.cut = True  # nothing arrives: requests stay pending
    first, second = answers(pair.a.connections("ev2")), answers(pair.a.connections("ev2"))
    assert len(pair.a_to_b.of(p.ConnectionsRequest)) == 1  # one request for both
    [request] = pair.a_to_b.of(p.ConnectionsRequest)
    fill(pair.two.core)
    reply = local_connections(pair.two.core, request.request_id)
    assert pair.a.frame("ev2", pair.b_to_a, reply)
    assert first == second and first[0].encoders == reply.encoders
    pair.clock.advance(0.9)
    assert answers(pair.a.connections("ev2")) == first  # given again
    assert len(pair.a_to_b.of(p.ConnectionsRequest)) == 1
    pair.clock.advance(0.1)
    pending = answers(pair.a.connections("ev2"))
    assert pending == [] and len(pair.a_to_b.of(p.ConnectionsRequest)) == 2
    ids = [r.request_id for r in pair.a_to_b.of(p.ConnectionsRequest)]
    assert ids[0] != ids[1]


def test_no_answer_within_two_seconds_is_none_and_a_late_one_is_ignored() -> None:
    pair = make_pair()
    pair.a_to_b.cut = True
    got = answers(pair.a.connections("ev2"))
    pair.clock.advance(CONNECTIONS_TIMEOUT - 0.001)
    assert got == []
    pair.clock.advance(0.001)
    assert got == [None]
    [request] = pair.a_to_b.of(p.ConnectionsRequest)
    late = p.Connections(request.request_id, (), (), 0)
    assert pair.a.frame("ev2", pair.b_to_a, late)  # ours, and dropped
    # Not cached: the next caller asks again.
    assert answers(pair.a.connections("ev2")) == []
    assert len(pair.a_to_b.of(p.ConnectionsRequest)) == 2


def test_an_answer_from_another_server_does_not_count() -> None:
    pair = make_pair()
    pair.a_to_b.cut = True
    got = answers(pair.a.connections("ev2"))
    [request] = pair.a_to_b.of(p.ConnectionsRequest)
    assert pair.a.frame("ev3", pair.b_to_a, p.Connections(request.request_id, (), (), 0))
    assert got == []
    assert not pair.a.frame("ev3", pair.b_to_a, m.Error(ErrorCode.RATE_LIMITED,
                                                          request.request_id, 0, "x"))
    assert got == []


def test_without_a_link_or_when_stopped_the_answer_is_none_at_once() -> None:
    pair = make_pair()
    assert answers(pair.a.connections("ev9")) == [None]
    pair.a_to_b.cut = True
    got = answers(pair.a.connections("ev2"))
    pair.a.link_down("ev2")
    assert got == [None]
    got = answers(pair.a.connections("ev2"))
    pair.a.stop()
    assert got == [None]
    assert answers(pair.a.connections("ev2")) == [None]
    pair.b.stop()
    assert pair.clock.getDelayedCalls() == []


def test_a_peer_asking_too_often_is_refused_and_the_refusal_ends_the_wait() -> None:
    pair = make_pair()
    conn = pair.b_to_a  # ev2 answering ev1's requests through pair.b
    first = answers(pair.a.connections("ev2"))
    assert isinstance(first[0], ConnectionsAnswer)
    pair.clock.advance(0.25)
    # Straight at the answering side: a second request 0.25 s after the first.
    assert pair.b.frame("ev1", conn, p.ConnectionsRequest(REQUEST_ID_BASE + 100))
    [refusal] = conn.of(m.Error)
    assert (refusal.code, refusal.request_id, refusal.fatal) == (
        ErrorCode.RATE_LIMITED, REQUEST_ID_BASE + 100, 0)
    pair.clock.advance(0.5)  # 0.75 s after the answer: answered
    assert pair.b.frame("ev1", conn, p.ConnectionsRequest(REQUEST_ID_BASE + 101))
    assert conn.of(p.Connections)[-1].request_id == REQUEST_ID_BASE + 101
    # 1.125 s after its answer the requester asks again, 0.375 s after the
    # answer above: refused, which it takes as no answer, at once.
    pair.clock.advance(0.375)
    got = answers(pair.a.connections("ev2"))
    assert got == [None]
    last_request = pair.a_to_b.of(p.ConnectionsRequest)[-1]
    assert conn.of(m.Error)[-1].request_id == last_request.request_id
    # The refusal of a request ev1's probes never made is left to the service (it logs).
    assert pair.a_to_b.unhandled == [] and pair.b_to_a.unhandled == [refusal]


def test_request_ids_stay_in_the_upper_half_and_wrap() -> None:
    pair = make_pair()
    pair.a_to_b.cut = True
    pair.a._next_request = 0xFFFFFFFF
    answers(pair.a.connections("ev2"))
    pair.clock.advance(CONNECTIONS_TIMEOUT)
    answers(pair.a.connections("ev2"))
    assert [r.request_id for r in pair.a_to_b.of(p.ConnectionsRequest)] == [
        0xFFFFFFFF, REQUEST_ID_BASE]


def test_a_busy_server_answers_within_the_frame_budget() -> None:
    pair = make_pair()
    core = pair.two.core
    for i in range(2100):
        core.encoder_connected(f"cam-{i:04d}", "n" * 64, "ops", FakeLink())
    for i in range(2500):
        core.viewer_connected(f"viewer-{i:04d}", "ops", FakeLink())
    [answer] = answers(pair.a.connections("ev2"))
    assert answer.truncated
    assert len(answer.encoders) < 2100 and len(answer.viewers) <= 2000
    assert [e.encoder_id for e in answer.encoders] == [
        f"cam-{i:04d}" for i in range(len(answer.encoders))]
    assert len(m.encode(pair.b_to_a.of(p.Connections)[0])) <= p.BATCH_BYTES
