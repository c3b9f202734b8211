"""The client library against fake servers speaking the wire protocol (memory network, Clock).

Each fake server is a ``WireConnection`` on the in-memory network that
answers ``EncoderAuth`` / ``Login`` / ``RelayHello`` as a server does (or
holds the answer, or redirects); hosts are frozen, crashed and cut off with
the network's own faults (``MemoryNetwork(tcp_faults=True)``).  Covers the
connection attempts (a silent server gets company after ``HEDGE_DELAY``),
the servers a client remembers, a lost session's ticket, and EncoderRedirect.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python.failure import Failure

from evserver.media import SyntheticSource
from evserver.net import client as c
from evserver.net.client import (
    CONNECT_TIMEOUT,
    HEDGE_DELAY,
    MAX_KNOWN_SERVERS,
    PREAMBLE_DEADLINE,
    Address,
    ClientError,
    EncoderClient,
    TLSConfig,
    ViewerClient,
)
from evserver.net.connection import WireConnection
from evserver.testing import realsim
from evserver.testing.memnet import MemoryNetwork
from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode, ProtocolName

ENC, VIEW, RELAY = 5510, 5520, 5530
CLIENT = "10.0.9.1"
KEEPALIVE_MS = 500


class FakeConn(WireConnection):
    """One server-side connection of a FakeServer."""

    is_server = True

    def __init__(self, server: FakeServer, protocol_name: ProtocolName) -> None:
        super().__init__(server.net.clock, 1 << 24)
        self.protocol_name = protocol_name
        self.server = server
        self.received: list[Any] = []
        self.media_bytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.server.conns.append(self)

    def message_received(self, msg: Any) -> None:
        if self.handle_common(msg):
            return
        self.received.append(msg)
        self.server.handle(self, msg)

    def media_received(self, body: bytes) -> None:
        self.media_bytes += len(body)


class _Factory:
    def __init__(self, build: Callable[[], FakeConn]) -> None:
        self.build = build

    def buildProtocol(self, addr: Any) -> FakeConn:
        return self.build()


class FakeServer:
    """Encoder, viewer and relay ports of one server, answering like a server."""

    def __init__(self, net: MemoryNetwork, host: str, server_id: str,
                 cluster: list[FakeServer]) -> None:
        self.net = net
        self.host = host
        self.server_id = server_id
        self.cluster = cluster
        cluster.append(self)
        self.conns: list[FakeConn] = []
        #: Authentications (EncoderAuth, Login) received, in order.
        self.auths: list[Any] = []
        #: Answer authentications at once (else they wait in ``held``).
        self.answering = True
        self.held: list[tuple[FakeConn, Any]] = []
        #: Send encoders there instead of EncoderAuthOk (``redirect_placed``:
        #: also those whose placed_by is not empty, as a move just after login).
        self.redirect_to: FakeServer | None = None
        self.redirect_placed = False
        #: The servers this one names alive (None: the whole cluster).
        self.names: list[FakeServer] | None = None
        self.tickets: dict[bytes, FakeConn] = {}
        self.listen()

    @property
    def info(self) -> m.ServerInfo:
        return m.ServerInfo(self.server_id, self.host, ENC, VIEW, RELAY)

    @property
    def address(self) -> Address:
        return Address(self.host, ENC)

    def servers(self) -> tuple[m.ServerInfo, ...]:
        return tuple(s.info for s in (self.cluster if self.names is None else self.names))

    def listen(self) -> None:
        self.net.revive_host(self.host)
        for port, name in ((ENC, ProtocolName.ENCODER), (VIEW, ProtocolName.VIEWER),
                           (RELAY, ProtocolName.RELAY)):
            self.net.listen(self.host, port, _Factory(partial(FakeConn, self, name)))  # type: ignore[arg-type]

    def handle(self, conn: FakeConn, msg: Any) -> None:
        if isinstance(msg, m.EncoderAuth | m.Login):
            self.auths.append(msg)
            if self.answering:
                self.answer(conn, msg)
            else:
                self.held.append((conn, msg))
        elif isinstance(msg, m.RelayHello):
            if msg.ticket in self.tickets:
                conn.send(m.RelayOk())
            else:
                conn.fail(ErrorCode.AUTH_FAILED, "unknown ticket")

    def answer(self, conn: FakeConn, msg: Any) -> None:
        target = self.redirect_to
        if isinstance(msg, m.EncoderAuth) and target is not None and (
                not msg.placed_by or self.redirect_placed):
            self.redirect(conn, target, m.RedirectReason.PLACEMENT)
            return
        ticket = bytes([len(self.tickets) + 1, *self.server_id.encode()]).ljust(32, b"\0")
        self.tickets[ticket] = conn
        if isinstance(msg, m.EncoderAuth):
            conn.send(m.EncoderAuthOk(ticket, KEEPALIVE_MS, self.server_id, self.servers()))
        else:
            conn.send(m.LoginOk(ticket, KEEPALIVE_MS, self.server_id, "north", self.servers()))

    def answer_held(self) -> None:
        held, self.held = self.held, []
        for conn, msg in held:
            self.answer(conn, msg)

    def redirect(self, conn: FakeConn, target: FakeServer, reason: int) -> None:
        conn.send(m.EncoderRedirect(target.info, reason))
        conn.close()

    def controls(self) -> list[FakeConn]:
        return [x for x in self.conns if x.connected and x.protocol_name != ProtocolName.RELAY]

    def relays(self) -> list[FakeConn]:
        return [x for x in self.conns if x.connected and x.protocol_name == ProtocolName.RELAY]


class World:
    """A memory network with TCP's faults, fake servers a..z on 10.0.0.x, and a client log."""

    def __init__(self, *ids: str) -> None:
        self.net = MemoryNetwork(tcp_faults=True)
        self.clock = self.net.clock
        self.clock.advance(1000.0)
        self.cluster: list[FakeServer] = []
        self.s = {sid: FakeServer(self.net, f"10.0.0.{i + 1}", sid, self.cluster)
                  for i, sid in enumerate(ids)}
        #: (time, address) of every control connection attempt of the client.
        self.dials: list[tuple[float, Address]] = []

    def connector(self, address: Address) -> Any:
        if address.port != RELAY:
            self.dials.append((self.clock.seconds(), address))
        return self.net.endpoint(address.host, address.port, CLIENT, CONNECT_TIMEOUT)

    def encoder(self, *ids: str, seed: int = 1, **kw: Any) -> EncoderClient:
        return EncoderClient(self.clock, [self.s[i].address for i in ids], "cam1", "secret",
                             SyntheticSource(200_000, 10, keyframe_interval=10),
                             TLSConfig(enabled=False), connector=self.connector,
                             rng=random.Random(seed), **kw)

    def viewer(self, *ids: str, seed: int = 1) -> ViewerClient:
        return ViewerClient(self.clock, [Address(self.s[i].host, VIEW) for i in ids], "alice",
                            "pw", TLSConfig(enabled=False), connector=self.connector,
                            rng=random.Random(seed))

    def advance(self, seconds: float) -> None:
        self.net.advance(seconds)

    def run_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> float:
        return self.net.run_until(predicate, timeout)

    def now(self) -> float:
        return self.clock.seconds()


def up(client: Any) -> bool:
    return client.control is not None and client.relay is not None


def on(client: Any, server: FakeServer) -> bool:
    return up(client) and client.server_id == server.server_id


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(c, "log", Logger(namespace="evserver.net.client",
                                         observer=cast(ILogObserver, events.append)))
    return events


def texts(events: list[dict[str, Any]], level: str) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"].name == level]


# --------------------------------------------------------------------------
# A silent server: another attempt alongside after HEDGE_DELAY


@pytest.mark.parametrize("kind", ["encoder", "viewer"])
def test_a_frozen_first_server_gets_company_and_never_hears_the_credentials(kind: str) -> None:
    w = World("a", "b")
    w.net.freeze_host(w.s["a"].host)
    client = w.encoder("a", "b") if kind == "encoder" else w.viewer("a", "b")
    client.start()
    w.advance(HEDGE_DELAY - 0.05)
    assert client.control is None and [a.host for _, a in w.dials] == ["10.0.0.1"]
    took = w.run_until(lambda: up(client))
    assert took <= 0.1, took
    assert client.server_id == "b" and client.parallel_attempts == 1
    # The frozen server's attempt was closed before it said who we are: once
    # thawed, the server hears a preamble and a close, never the credentials.
    w.net.thaw_host(w.s["a"].host)
    w.advance(3.0)
    assert w.s["a"].auths == [] and w.s["a"].controls() == []
    assert len(w.s["b"].auths) == 1 and client.connects == 1
    client.stop()


def test_a_silent_server_alone_is_given_up_after_the_preamble_deadline() -> None:
    w = World("a")
    w.net.freeze_host(w.s["a"].host)
    client = w.encoder("a")
    client.start()
    w.advance(PREAMBLE_DEADLINE - 0.05)
    assert client.attempts == 1 and client.last_error is None  # nobody to try alongside
    w.advance(0.1)
    assert client.last_error is not None
    assert client.last_error.code == ErrorCode.KEEPALIVE_TIMEOUT
    assert "no preamble" in str(client.last_error)
    w.advance(0.2)
    assert client.attempts == 2  # the next round, after the back-off
    client.stop()


def test_a_server_that_sent_its_preamble_has_time_to_answer() -> None:
    """A busy server (a burst of logins) is not dropped for a slow answer."""
    w = World("a", "b")
    w.s["a"].answering = False
    client = w.encoder("a", "b")
    client.start()
    w.advance(5.0)
    assert client.attempts == 1 and client.control is not None and client.relay is None
    w.s["a"].answer_held()
    w.advance(0.1)
    assert on(client, w.s["a"]) and client.connects == 1


def test_an_answer_that_never_comes_is_given_up() -> None:
    w = World("a", "b")
    w.s["a"].answering = False
    client = w.encoder("a", "b")
    client.start()
    took = w.run_until(lambda: on(client, w.s["b"]))
    assert c.ANSWER_DEADLINE <= took <= c.ANSWER_DEADLINE + 0.2, took
    assert len(w.s["a"].auths) == 1


def _session_on_a_then(w: World, client: EncoderClient, fault: str) -> None:
    """``client`` logged in at a; b becomes unreachable (``fault``), then a crashes."""
    client.start()
    w.run_until(lambda: on(client, w.s["a"]))
    if fault == "freeze":
        w.net.freeze_host(w.s["b"].host)
    else:
        w.net.cut(CLIENT, w.s["b"].host)
    w.advance(0.5)
    w.net.crash_host(w.s["a"].host)


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), fault=st.sampled_from(["freeze", "cut"]))
def test_failover_past_a_silent_server_is_within_budget(seed: int, fault: str) -> None:
    """The server lost, the next pick (at random) may be frozen or behind a cut link.

    The client is back at the live one within the back-off (< 0.075 s) plus
    HEDGE_DELAY, whatever it picks first: the budget's 0.5 s to reconnect.
    """
    w = World("a", "b", "c")
    client = w.encoder("a", "b", "c", seed=seed)
    _session_on_a_then(w, client, fault)
    took = w.run_until(lambda: on(client, w.s["c"]), 10.0)
    assert took <= 0.075 + HEDGE_DELAY + 0.02, took  # (run_until looks every 0.01 s)
    assert client.connects == 2
    client.stop()


def test_the_connection_timeout_is_short_and_the_simulator_uses_it() -> None:
    default = inspect.signature(c._ReconnectingClient.__init__).parameters["connect_timeout"]
    assert default.default == CONNECT_TIMEOUT <= 1.0
    assert realsim.CLIENT_CONNECT_TIMEOUT == CONNECT_TIMEOUT


def test_an_attempt_across_a_cut_link_fails_at_the_connection_timeout() -> None:
    w = World("a")
    w.net.cut(CLIENT, w.s["a"].host)
    client = w.encoder("a")
    client.start()
    w.advance(CONNECT_TIMEOUT - 0.05)
    assert client.last_error is None
    w.advance(0.1)
    assert client.last_error is not None and "cannot reach 10.0.0.1:5510" in str(
        client.last_error)
    client.stop()


def test_at_most_three_attempts_at_once_and_a_failed_one_is_replaced_at_once() -> None:
    w = World("a", "b", "c", "d", "e")
    for sid in "abc":
        w.net.freeze_host(w.s[sid].host)
    w.net.crash_host(w.s["d"].host)  # refuses at once
    client = w.encoder("a", "b", "c", "d", "e", seed=3)
    client.start()
    w.advance(2 * HEDGE_DELAY + 0.01)
    assert len(client._attempts) <= c.MAX_ATTEMPTS
    took = w.run_until(lambda: on(client, w.s["e"]))
    # Three silent attempts hold the slots until the first deadline at the latest.
    assert w.now() - w.dials[0][0] <= PREAMBLE_DEADLINE + 0.01, took
    assert len(client._attempts) == 0
    client.stop()


def test_stop_during_attempts_leaves_no_timer_and_no_connection() -> None:
    w = World("a", "b")
    w.net.freeze_host(w.s["a"].host)
    w.net.cut(CLIENT, w.s["b"].host)
    client = w.encoder("a", "b")
    client.start()
    w.advance(HEDGE_DELAY + 0.1)
    assert client.attempts == 2
    client.stop()
    w.advance(5.0)
    assert w.clock.getDelayedCalls() == []
    assert w.net.connections == []
    assert client.attempts == 2


# --------------------------------------------------------------------------
# A lost session's ticket


def test_a_late_closing_relay_of_the_last_session_leaves_the_new_one_alone() -> None:
    """The relay of a lost session closes late (it could not flush); meanwhile the
    client is logging in again at the same server: that close is not this session's."""
    w = World("a")
    a = w.s["a"]
    client = w.encoder("a")
    client.start()
    w.run_until(lambda: on(client, a))
    a.controls()[0].send(m.StartStream())
    w.advance(0.3)
    assert client.frames_sent > 0
    old_relay = client.relay
    assert old_relay is not None
    a.relays()[0].transport.reader_stalled = True  # type: ignore[union-attr]
    w.advance(0.2)  # frames pile up in the relay's send buffer
    a.answering = False
    a.controls()[0].transport.abortConnection()  # type: ignore[union-attr]
    w.run_until(lambda: len(a.held) == 1, 1.0)
    new_control = client.control
    assert new_control is not None and old_relay.connected
    # The old relay gives up flushing (CLOSE_GRACE) while the login is under way.
    w.run_until(lambda: not old_relay.connected, 3.0)
    assert client.control is new_control and new_control.connected
    a.answer_held()
    w.advance(0.1)
    assert on(client, a) and client.connects == 2


# --------------------------------------------------------------------------
# The servers a client knows


def test_a_server_named_once_is_never_forgotten() -> None:
    w = World("a", "b", "c")
    a, b, c_ = w.s["a"], w.s["b"], w.s["c"]
    a.names = [a, b]
    client = w.encoder("a")  # configured with a only
    client.start()
    w.run_until(lambda: on(client, a))
    assert client.servers == [a.address, b.address]
    # b goes down, c joins, c goes down: a names only itself at the end.
    for names in ([a, c_], [a]):
        a.controls()[0].send(m.ServerList(tuple(s.info for s in names)))
        w.advance(0.1)
    assert client.servers[0] == a.address
    assert set(client.servers) == {a.address, b.address, c_.address}
    # a dies; only c is back: the client finds it.
    w.net.crash_host(b.host)
    w.net.crash_host(a.host)
    w.run_until(lambda: on(client, c_), 10.0)


def test_the_servers_named_alive_come_first() -> None:
    w = World("a", "b", "c")
    a, b, c_ = w.s["a"], w.s["b"], w.s["c"]
    a.names = [a, b, c_]
    client = w.encoder("a", seed=5)
    client.start()
    w.run_until(lambda: on(client, a))
    a.controls()[0].send(m.ServerList((a.info, c_.info)))
    w.advance(0.1)
    assert client.servers == [a.address, c_.address, b.address]
    # b, not named any more (frozen, say), is not tried while c is left.
    w.net.freeze_host(b.host)
    w.net.crash_host(a.host)
    w.run_until(lambda: on(client, c_), 1.0)
    assert b.address not in [addr for _, addr in w.dials]


def test_servers_not_named_alive_are_tried_together() -> None:
    """The server lost named only itself: the others are tried at once, not one
    every HEDGE_DELAY (two of them are silent, behind cut links)."""
    w = World("a", "b", "c", "d")
    a, b, c_, d = (w.s[i] for i in "abcd")
    client = w.encoder("a", "b", "c", "d", seed=3)
    client.start()
    w.run_until(lambda: on(client, a))
    a.controls()[0].send(m.ServerList((a.info,)))
    w.advance(0.1)
    for silent in (b, c_):
        w.net.cut(CLIENT, silent.host)
    w.dials.clear()
    w.net.crash_host(a.host)
    took = w.run_until(lambda: on(client, d), 2.0)
    starts = [t for t, addr in w.dials if addr != a.address]
    assert len(starts) == 3 and max(starts) - min(starts) < 0.01, w.dials
    assert took < 0.3 + client.retry_max  # the back-off before the round, then one RTT


def test_the_known_servers_are_bounded_and_the_useful_ones_kept() -> None:
    w = World("a", "s")
    a, s = w.s["a"], w.s["s"]
    a.names = [a, s]
    client = w.encoder("a")
    client.start()
    w.run_until(lambda: on(client, a))
    w.net.crash_host(a.host)
    w.run_until(lambda: on(client, s))  # a session worked at s
    a.listen()

    def named(prefix: str, count: int, *extra: FakeServer) -> m.ServerList:
        infos = [m.ServerInfo(f"{prefix}{i}", f"10.1.{len(prefix)}.{i}", ENC, VIEW, RELAY)
                 for i in range(count)]
        return m.ServerList((*(e.info for e in extra), *infos))

    control = s.controls()[0]
    control.send(named("x", 62, s, a))
    control.send(named("yy", 62, s, a))
    w.advance(0.1)
    assert len(client.servers) <= MAX_KNOWN_SERVERS
    assert client.servers[:2] == [s.address, a.address]
    # s is not named any more: of those not named now, the ones where no
    # session ever worked go first.
    control.send(named("zzz", 62, a))
    w.advance(0.1)
    assert len(client.servers) == MAX_KNOWN_SERVERS
    assert client.servers[:2] == [a.address, Address("10.1.3.0", ENC)]
    assert s.address in client.servers
    assert Address("10.1.3.61", ENC) in client.servers  # the latest list, whole
    assert not any(addr.host.startswith(("10.1.1.", "10.1.2.")) for addr in client.servers)


# --------------------------------------------------------------------------
# EncoderRedirect


def test_redirected_at_login_it_connects_to_the_target_at_once(
        logged: list[dict[str, Any]]) -> None:
    w = World("a", "b")
    a, b = w.s["a"], w.s["b"]
    a.redirect_to = b
    client = w.encoder("a")
    lost: list[ClientError] = []
    client.on_lost = lost.append  # type: ignore[method-assign, assignment]
    client.start()
    w.run_until(lambda: on(client, b))
    (t_a, _), (t_b, to_b) = w.dials
    assert to_b == b.address and t_b == t_a  # no back-off, no jitter
    # Before EncoderAuthOk the client cannot know a's id: a's address says who.
    assert b.auths[0].placed_by == str(a.address)
    assert client.placed_by == str(a.address)
    assert client.redirects == 1 and lost == [] and client.connects == 1
    assert client.last_redirect == (str(a.address), "b", "placement")
    assert b.address in client.servers
    assert any("sends us to b" in t and "placement" in t for t in texts(logged, "info"))
    assert texts(logged, "warn") == []


def test_redirected_at_login_it_names_the_server_it_knows() -> None:
    w = World("a", "b", "c")
    a, b, c_ = w.s["a"], w.s["b"], w.s["c"]
    client = w.encoder("a")
    client.start()
    w.run_until(lambda: on(client, a))
    b.redirect_to = c_
    w.net.crash_host(a.host)
    w.run_until(lambda: on(client, c_))
    assert [x.placed_by for x in c_.auths] in (["b"], ["", "b"])
    assert [x.placed_by for x in b.auths] == [""]


def test_a_move_during_the_session_is_no_failure(logged: list[dict[str, Any]]) -> None:
    w = World("a", "b", "c")
    a, c_ = w.s["a"], w.s["c"]
    a.names = [a]  # c is not in any list the encoder was given
    client = w.encoder("a", "b")
    lost: list[ClientError] = []
    client.on_lost = lost.append  # type: ignore[method-assign, assignment]
    client.start()
    w.run_until(lambda: on(client, a))
    w.advance(5.0)
    old_control, old_relay = client.control, client.relay
    assert old_control is not None and old_relay is not None
    t_move = w.now()
    a.redirect(a.controls()[0], c_, m.RedirectReason.BALANCE)
    w.run_until(lambda: on(client, c_))
    assert w.dials[-1] == (t_move, c_.address)
    assert not old_control.connected and not old_relay.connected
    assert a.controls() == [] and a.relays() == []
    assert c_.auths[-1].placed_by == "a" and client.placed_by == "a"
    assert lost == [] and client._attempt == 0 and client.redirects == 1
    assert client.server_id == "c" and c_.address in client.servers
    assert client.last_redirect == ("a", "c", "balance")
    assert any("balance" in t for t in texts(logged, "info"))


def test_an_unreachable_target_falls_back_to_the_server_that_redirected() -> None:
    w = World("a", "b", "c")
    a, c_ = w.s["a"], w.s["c"]
    w.net.crash_host(c_.host)
    a.redirect_to = c_
    client = w.encoder("a", "b")
    lost: list[ClientError] = []
    client.on_lost = lost.append  # type: ignore[method-assign, assignment]
    client.start()
    w.run_until(lambda: on(client, a))
    # a answered a moment ago: it comes first after c refused, before b.
    assert [addr for _, addr in w.dials] == [a.address, c_.address, a.address]
    assert len(lost) == 1 and "cannot reach 10.0.0.3:5510" in str(lost[0])  # a real failure
    # Placed: a does not send it to c again.  (a sent no ServerList, so the
    # encoder names it by its address.)
    assert a.auths[-1].placed_by == str(a.address)
    assert client.redirects == 1
    # The fallback is used once: the next loss tries the others as usual.
    w.net.crash_host(a.host)
    b = w.s["b"]
    w.run_until(lambda: on(client, b))
    assert b.auths[-1].placed_by == ""


@pytest.mark.parametrize("fault", ["freeze", "cut"])
def test_a_silent_target_gets_the_redirecting_server_as_company(fault: str) -> None:
    """A target the cluster reaches but the client does not (frozen for it, or
    behind a cut link): the redirecting server, tried alongside, hosts it."""
    w = World("a", "b", "c")
    a, c_ = w.s["a"], w.s["c"]
    if fault == "freeze":
        w.net.freeze_host(c_.host)
    else:
        w.net.cut(CLIENT, c_.host)
    client = w.encoder("a", "b")
    client.start()
    w.run_until(lambda: on(client, a))
    t0 = w.clock.seconds()
    a.redirect(a.controls()[0], c_, m.RedirectReason.POOL)
    w.run_until(lambda: up(client))
    assert w.clock.seconds() - t0 <= HEDGE_DELAY + 0.01
    assert client.server_id == "a" and a.auths[-1].placed_by == "a"


def _bouncing(w: World) -> tuple[FakeServer, FakeServer]:
    """a and b send every encoder to each other, placed or not."""
    a, b = w.s["a"], w.s["b"]
    a.redirect_to, b.redirect_to = b, a
    a.redirect_placed = b.redirect_placed = True
    return a, b


def test_a_redirect_loop_is_broken_and_the_encoder_stays(logged: list[dict[str, Any]]) -> None:
    w = World("a", "b")
    a, b = _bouncing(w)
    client = w.encoder("a")
    client.start()
    w.advance(5.0)
    # a -> b -> a -> b, then the fourth redirect (from b) is ignored: back to
    # b, as placed, again and again with a growing back-off.
    assert client.redirects == EncoderClient.REDIRECT_LOOP
    assert client.redirects_ignored >= 2
    assert len(w.dials) < 20
    assert {addr for _, addr in w.dials[4:]} == {b.address}
    assert all(x.placed_by for x in b.auths[1:])
    warnings = texts(logged, "warn")
    assert len(warnings) == 1 and "ignoring redirects for 30 s" in warnings[0]
    # b stops redirecting placed encoders (as a server does): the encoder stays.
    b.redirect_placed = False
    w.run_until(lambda: on(client, b), 5.0)
    assert b.auths[-1].placed_by == str(b.address)
    # Within the ignore period, a move from b is not followed either.
    b.redirect(b.controls()[0], a, m.RedirectReason.BALANCE)
    w.run_until(lambda: on(client, b), 5.0)
    assert client.redirects == EncoderClient.REDIRECT_LOOP and b.auths[-1].placed_by == "b"
    # After it, redirects are obeyed again.
    w.advance(EncoderClient.REDIRECT_IGNORE)
    a.redirect_to = None
    b.redirect(b.controls()[0], a, m.RedirectReason.BALANCE)
    w.run_until(lambda: on(client, a), 5.0)
    assert client.redirects == EncoderClient.REDIRECT_LOOP + 1
    assert a.auths[-1].placed_by == "b"


def test_redirects_between_sessions_that_last_are_no_loop() -> None:
    w = World("a", "b")
    a, b = w.s["a"], w.s["b"]
    client = w.encoder("a")
    client.start()
    w.run_until(lambda: on(client, a))
    here, there = a, b
    for _ in range(6):
        w.advance(EncoderClient.REDIRECT_SETTLED + 0.05)
        here.redirect(here.controls()[0], there, m.RedirectReason.BALANCE)
        w.run_until(lambda there=there: on(client, there), 1.0)  # type: ignore[misc]
        here, there = there, here
    assert client.redirects == 6 and client.redirects_ignored == 0


def test_quick_redirects_after_short_sessions_are_a_loop() -> None:
    w = World("a", "b")
    a, b = w.s["a"], w.s["b"]
    client = w.encoder("a")
    client.start()
    w.run_until(lambda: on(client, a))
    w.advance(EncoderClient.REDIRECT_SETTLED + 0.05)
    here, there = a, b
    for _ in range(4):
        here.redirect(here.controls()[0], there, m.RedirectReason.BALANCE)
        w.run_until(lambda: up(client), 1.0)
        w.advance(0.5)
        if client.server_id == there.server_id:
            here, there = there, here
    assert client.redirects == EncoderClient.REDIRECT_LOOP and client.redirects_ignored == 1
    assert client.server_id == here.server_id  # stayed where the fourth came from


def test_a_redirect_on_a_stale_connection_is_ignored() -> None:
    """Frames of a control connection left behind after a redirect count for nothing."""
    w = World("a", "b", "c")
    a, b, c_ = w.s["a"], w.s["b"], w.s["c"]
    client = w.encoder("a")
    client.start()
    w.run_until(lambda: on(client, a))
    conn = a.controls()[0]
    # Two redirects in one piece of data: the second comes after the first
    # closed the connection on the client's side.
    conn.transport.write(m.encode(m.EncoderRedirect(b.info, m.RedirectReason.BALANCE))  # type: ignore[union-attr]
                         + m.encode(m.EncoderRedirect(c_.info, m.RedirectReason.BALANCE)))
    w.run_until(lambda: on(client, b))
    w.advance(1.0)
    assert on(client, b) and client.redirects == 1 and c_.auths == []


def test_redirect_failure_hooks_see_no_outage() -> None:
    """on_final_error and ready are untouched by redirects (the tools report them)."""
    w = World("a", "b")
    w.s["a"].redirect_to = w.s["b"]
    client = w.encoder("a")
    results: list[Any] = []
    client.start().addBoth(results.append)
    w.run_until(lambda: bool(results))
    assert results == [client] and not isinstance(results[0], Failure)
    assert client.last_error is None
