"""Bad input on the peer port: the server refuses it clearly, never crashes, leaks or grows.

One real ``ClusterService`` (with its ``MemoryServer`` core and a ``Store`` in
``tmp_path``) listens on the in-memory network behind real TLS
(``TLSMemoryBIOFactory`` through ``evserver.tls.wrap_server_factory``).  The
attacker is a ``RawClient`` behind client TLS: a *member* (a certificate
signed by the same cluster CA), a *joiner* (no certificate, the CA pinned),
an *outsider* (a certificate of another cluster) or no TLS at all.

As in ``test_server_bad_input``, every test checks that nothing was logged as
an error or failure and that the store's tables are byte-for-byte unchanged;
the Hypothesis tests reuse one server across examples, and after every
example no connection is left, no member was added and no timer is left but
the service's own periodic loops.
"""

from __future__ import annotations

import gc
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet import ssl as tssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from evserver.cluster.ca import (
    create_cluster,
    install_membership,
    make_csr,
    peer_client_tls_options,
    peer_server_tls_options,
    pinned_client_tls_options,
    sign_csr,
)
from evserver.cluster.service import ClusterService
from evserver.net.connection import CLOSE_GRACE
from evserver.net.peer import HANDSHAKE_TIMEOUT
from evserver.passwords import hash_password
from evserver.store import TABLES, server_clock
from evserver.testing import raw
from evserver.testing.harness import (
    ENCODER_PORT,
    RELAY_PORT,
    VIEWER_PORT,
    MemoryServer,
    make_store,
)
from evserver.testing.memnet import MemoryNetwork
from evserver.testing.raw import RawClient
from evserver.testing.realsim import TLSClientEndpoint
from evserver.tls import wrap_client_factory, wrap_server_factory
from evserver.wire import messages as m
from evserver.wire import peer as p
from evserver.wire.framing import (
    FRAME_HEADER,
    VERSION,
    ErrorCode,
    FrameDecoder,
    Preamble,
    ProtocolName,
    WireError,
    encode_preamble,
)

HOST = "10.0.0.1"
SID = "s1"
MEMBER_HOST = "10.0.0.2"
MEMBER_SID = "s2"
ATTACKER_HOST = "10.0.0.66"
PEER_PORT = p.DEFAULT_PORT
ADMIN_PORT = 5540
DOMAINS: dict[str, dict[str, Any]] = {
    "north": {"accounts": {"bob": "bob-pw"}, "encoders": ["cam1"]},
}
STAMP = "1700000000000.00000.s2"
#: Size of a frame's length field (the rest of ``FRAME_HEADER`` is the type, counted in it).
LENGTH_SIZE = FRAME_HEADER.size - 1

#: Codes a fatal refusal of garbage on the peer port may carry.
GARBAGE_CODES = {
    ErrorCode.BAD_PREAMBLE,
    ErrorCode.WRONG_PROTOCOL,
    ErrorCode.VERSION_TOO_OLD,
    ErrorCode.MALFORMED,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.UNEXPECTED_MESSAGE,
    ErrorCode.AUTH_FAILED,  # garbage that happens to be a PeerHello
    ErrorCode.WRONG_CLUSTER,  # ... with another cluster id
    ErrorCode.BAD_TOKEN,  # ... or a JoinRequest
}


def _cheap_hash(password: str) -> str:
    return hash_password(password, n=16, r=1, p=1)


def dump_store(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def _is_bad_event(event: dict[str, Any]) -> bool:
    return (
        event.get("log_failure") is not None
        or bool(event.get("isError"))
        or event.get("log_level") in (LogLevel.error, LogLevel.critical)
    )


def _describe(event: dict[str, Any]) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text += "\n" + failure.getTraceback()
    return text


def address(host: str) -> p.ExternalAddress:
    return p.ExternalAddress(host, ENCODER_PORT, VIEWER_PORT, RELAY_PORT, ADMIN_PORT, host,
                             PEER_PORT)


class _Port:
    """The listening port ``ClusterService`` gets from the injected ``listen``."""

    def __init__(self, net: MemoryNetwork) -> None:
        self.net = net

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", HOST, PEER_PORT)

    def stopListening(self) -> Deferred[None]:
        self.net.unlisten(HOST, PEER_PORT)
        return defer.succeed(None)


class _RawFactory(raw._RawFactory):
    noisy = False


class PeerWorld:
    """One cluster member on the in-memory network, with a member's and an outsider's
    credentials for attacking it, watched for logged errors."""

    def __init__(self, path: Path) -> None:
        for sub in (SID, MEMBER_SID, "other"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self.path = path
        self.net = MemoryNetwork()
        self.clock = self.net.clock
        self.identity = create_cluster(path / SID, SID, [HOST], time.time)
        self.store, self.secrets = make_store(
            path / SID / "db.sqlite3", DOMAINS, password_hasher=_cheap_hash,
            hlc=server_clock(SID, self.clock.seconds))
        self.server = MemoryServer(self.net, HOST, self.store, SID)
        self.core = self.server.core

        def listen(factory: Any) -> Deferred[Any]:
            served = wrap_server_factory(
                factory, peer_server_tls_options(self.identity, allow_joiners=True), self.clock)
            self.net.listen(HOST, PEER_PORT, cast(Any, served))
            return defer.succeed(_Port(self.net))

        def connector(record: Any) -> Any:
            # Nobody listens at a member's address here: dialling it is refused.
            inner = self.net.endpoint(record.address.peer_host, record.address.peer_port, HOST)
            options = peer_client_tls_options(self.identity, record.server_id)
            return TLSClientEndpoint(inner, options, self.clock)

        self.cluster = ClusterService(
            self.identity, path / SID, address(HOST), f"tcp:{PEER_PORT}", self.core, self.store,
            self.clock, listen=listen, connector=connector)
        self.cluster.startService()
        self.net.flush()
        #: The service's periodic loops: the only timers an idle server keeps.
        self.baseline_timers = {getattr(c, "func", None) for c in self.clock.getDelayedCalls()}
        self.dump_before = dump_store(self.store.path)

        # A member's credentials: a certificate signed by the same CA.
        key, csr = make_csr(MEMBER_SID, [MEMBER_HOST])
        cert = sign_csr(self.identity, csr, MEMBER_SID, [MEMBER_HOST], time.time)
        self.member = install_membership(path / MEMBER_SID, self.identity.cluster_id,
                                         self.identity.ca_cert, None, key, cert)
        # An outsider: a member of another cluster, with the same server id.
        self.outsider = create_cluster(path / "other", MEMBER_SID, [MEMBER_HOST], time.time)

        self.bad_events: list[dict[str, Any]] = []
        self._observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(self._observer)
        self._closed = False

    def _observe(self, event: dict[str, Any]) -> None:
        if _is_bad_event(event):
            self.bad_events.append(event)

    # -- attackers ---------------------------------------------------------

    def connect_tls(self, creator: Any) -> RawClient:
        """A RawClient behind client TLS; the handshake has run when this returns."""
        client = RawClient()
        out: list[Any] = []
        self.net.endpoint(HOST, PEER_PORT, ATTACKER_HOST).connect(
            wrap_client_factory(_RawFactory(client), creator, self.clock)).addBoth(out.append)
        self.flush()
        assert out and not isinstance(out[0], Failure), out
        return client

    def connect_member(self) -> RawClient:
        return self.connect_tls(peer_client_tls_options(self.member, SID))

    def connect_joiner(self) -> RawClient:
        return self.connect_tls(pinned_client_tls_options(self.identity.fingerprint()))

    def connect_plain(self) -> RawClient:
        return raw.connect(self.net, HOST, PEER_PORT, source=ATTACKER_HOST)

    def hello(self, cluster_id: str | None = None, server_id: str = MEMBER_SID) -> p.PeerHello:
        return p.PeerHello(cluster_id if cluster_id is not None else self.identity.cluster_id,
                           server_id, 1, "attacker/1", address(MEMBER_HOST))

    def join_as_member(self) -> RawClient:
        """A legitimate member's connection, handshake done."""
        c = self.connect_member()
        c.send_preamble(ProtocolName.PEER)
        c.send(self.hello())
        self.flush()
        assert c.preamble == Preamble(ProtocolName.PEER, VERSION)
        assert [type(x) for x in c.messages[:2]] == [p.PeerWelcome, p.MemberList], c.messages
        assert not c.closed
        assert self.cluster.connections.keys() == {MEMBER_SID}
        return c

    # -- time --------------------------------------------------------------

    def flush(self) -> None:
        self.net.flush()

    def advance(self, seconds: float, step: float = 0.05) -> None:
        self.net.advance(seconds, step)

    # -- checks ------------------------------------------------------------

    def check_logs(self, collect: bool = False) -> None:
        if collect:
            gc.collect()
        assert not self.bad_events, "\n\n".join(_describe(e) for e in self.bad_events)

    def check_store(self) -> None:
        assert dump_store(self.store.path) == self.dump_before

    def assert_idle(self) -> None:
        """No connection, member, load or timer left but the service's loops; nothing
        logged as an error; the store unchanged."""
        self.flush()
        assert self.net.connections == []
        assert self.cluster.connections == {}
        assert self.cluster.members == {}
        assert self.cluster.loads == {}
        assert self.cluster.membership.view() == {}
        assert not self.cluster._connecting
        timers = {getattr(c, "func", None) for c in self.clock.getDelayedCalls()}
        assert timers <= self.baseline_timers, self.clock.getDelayedCalls()
        self.check_logs()
        self.check_store()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.cluster.stopService()
            self.flush()
            self.check_store()
            self.check_logs(collect=True)
        finally:
            globalLogPublisher.removeObserver(self._observer)
            self.store.close()


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[[], PeerWorld]]:
    worlds: list[PeerWorld] = []

    def make() -> PeerWorld:
        world = PeerWorld(tmp_path / f"world{len(worlds)}")
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.close()


@pytest.fixture
def world(make_world: Callable[[], PeerWorld]) -> PeerWorld:
    return make_world()


def assert_fatal(client: RawClient, code: ErrorCode) -> m.Error:
    """Exactly one Error, fatal, with ``code``, as the last message; then closed."""
    assert client.decode_error is None, client.decode_error
    errors = client.errors
    assert len(errors) == 1, client.messages
    error = errors[0]
    assert client.messages[-1] is error
    assert (ErrorCode(error.code), error.fatal) == (code, 1), error
    assert error.message
    return error


def finish(w: PeerWorld, client: RawClient) -> None:
    """Let the server close after a fatal error (or the client give up otherwise), past
    every grace period.

    The close after a fatal error is only checked here, after ``CLOSE_GRACE``:
    on a TLS connection the server closes only when its abort timer fires (see
    ``test_refused_tls_peer_is_closed_at_once``).
    """
    w.flush()
    if not client.fatal_errors and not client.closed:
        client.close()
    w.advance(CLOSE_GRACE + 0.1)
    assert client.closed


def check_garbage_outcome(client: RawClient, codes: set[ErrorCode]) -> None:
    """At most one fatal Error, last, with one of ``codes``, then closed; otherwise the
    input was incomplete and the connection is still open (no answer at all)."""
    assert client.decode_error is None, client.decode_error
    assert client.preamble == Preamble(ProtocolName.PEER, VERSION)
    fatal = [x for x in client.messages if isinstance(x, m.Error) and x.fatal]
    if fatal:
        assert len(fatal) == 1, client.messages
        assert client.messages == fatal, client.messages
        assert ErrorCode(fatal[0].code) in codes, fatal[0]
    else:
        assert client.messages == [], client.messages
        assert not client.closed


#: Text the wire's string fields can carry (no control characters).
TEXT = st.characters(blacklist_categories=("Cc", "Cs"))

HYPOTHESIS = settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                              HealthCheck.too_slow])

# --------------------------------------------------------------------------
# Garbage after the TLS handshake


@HYPOTHESIS
@given(data=st.binary(min_size=1, max_size=2048), with_preamble=st.booleans(),
       as_member=st.booleans())
def test_random_bytes_after_handshake(world: PeerWorld, data: bytes, with_preamble: bool,
                                      as_member: bool) -> None:
    c = world.connect_member() if as_member else world.connect_joiner()
    assert c.preamble == Preamble(ProtocolName.PEER, VERSION)
    if with_preamble:
        c.send_preamble(ProtocolName.PEER)
    c.send_raw(data)
    world.flush()
    check_garbage_outcome(c, GARBAGE_CODES)
    finish(world, c)
    world.assert_idle()


@HYPOTHESIS
@given(data=st.binary(min_size=0, max_size=512))
def test_silent_or_partial_peer_times_out(world: PeerWorld, data: bytes) -> None:
    """A peer that completes TLS and then says too little is dropped by the handshake timer."""
    c = world.connect_member()
    c.send_preamble(ProtocolName.PEER)
    header = FRAME_HEADER.pack(1000, 0x50)  # a PeerHello that never arrives in full
    c.send_raw(header + data[:900])
    world.flush()
    assert c.messages == [] and not c.closed
    world.advance(HANDSHAKE_TIMEOUT + CLOSE_GRACE + 0.1)
    assert_fatal(c, ErrorCode.KEEPALIVE_TIMEOUT)
    world.assert_idle()


def test_refused_tls_peer_is_closed_at_once(world: PeerWorld) -> None:
    c = world.connect_member()
    c.send_raw(b"GET / HTTP/1.0\r\n\r\n")
    world.flush()
    assert_fatal(c, ErrorCode.BAD_PREAMBLE)
    try:
        assert c.closed and world.net.connections == []
    finally:
        finish(world, c)
        world.assert_idle()


# --------------------------------------------------------------------------
# Refused at the TLS handshake


def test_plain_text_peer_is_refused(world: PeerWorld) -> None:
    c = world.connect_plain()
    c.send_preamble(ProtocolName.PEER)
    c.send(world.hello())
    world.flush()
    finish(world, c)
    assert c.preamble is None and c.messages == []
    world.assert_idle()


@HYPOTHESIS
@given(data=st.binary(min_size=1, max_size=1024))
def test_plain_text_garbage_is_refused(world: PeerWorld, data: bytes) -> None:
    c = world.connect_plain()
    c.send_raw(data)
    finish(world, c)
    assert c.preamble is None and c.messages == []
    world.assert_idle()


def test_peer_of_another_cluster_is_refused(world: PeerWorld) -> None:
    """The outsider checks the server as its own cluster's: the handshake fails."""
    c = world.connect_tls(peer_client_tls_options(world.outsider, SID))
    c.send_preamble(ProtocolName.PEER)
    c.send(world.hello(world.outsider.cluster_id))
    finish(world, c)
    assert c.preamble is None and c.messages == []
    world.assert_idle()


def test_server_refuses_certificate_of_another_cluster(world: PeerWorld) -> None:
    """An outsider that trusts anything still cannot get in with its own certificate."""
    trusting = tssl.CertificateOptions(
        privateKey=world.outsider.server_key,  # type: ignore[arg-type]
        certificate=world.outsider.server_cert,  # type: ignore[arg-type]
        verify=False)
    c = world.connect_tls(trusting)
    c.send_preamble(ProtocolName.PEER)
    c.send(world.hello(world.identity.cluster_id))
    finish(world, c)
    assert c.preamble is None and c.messages == []
    assert MEMBER_SID not in world.cluster.members
    world.assert_idle()


# --------------------------------------------------------------------------
# The peer handshake


@pytest.mark.parametrize("claimed", ["s3", SID, "s2x"])
def test_member_claiming_another_server_id(world: PeerWorld, claimed: str) -> None:
    c = world.connect_member()
    c.send_preamble(ProtocolName.PEER)
    c.send(world.hello(server_id=claimed))
    world.flush()
    error = assert_fatal(c, ErrorCode.AUTH_FAILED)
    assert MEMBER_SID in error.message and claimed in error.message
    finish(world, c)
    world.assert_idle()


@HYPOTHESIS
@given(cluster_id=st.text(TEXT, max_size=60))
def test_member_with_wrong_cluster_id(world: PeerWorld, cluster_id: str) -> None:
    if cluster_id == world.identity.cluster_id:
        return
    c = world.connect_member()
    c.send_preamble(ProtocolName.PEER)
    c.send(world.hello(cluster_id))
    world.flush()
    error = assert_fatal(c, ErrorCode.WRONG_CLUSTER)
    assert world.identity.cluster_id in error.message
    finish(world, c)
    world.assert_idle()


JOINER_MESSAGES = st.sampled_from([
    p.Heartbeat(1, 2, p.Load(0, 0, 0, 0)),
    p.HeartbeatAck(1, 2, 3, 4),
    p.MemberList(()),
    p.Updates(()),
    p.DigestRequest(1, 0),
    p.Directory(()),
    p.Leave(SID),
    p.ProbeRequest(SID, 7),
    m.Ping(5),
])


@HYPOTHESIS
@given(msg=JOINER_MESSAGES)
def test_joiner_may_only_send_join_request(world: PeerWorld, msg: Any) -> None:
    c = world.connect_joiner()
    c.send_preamble(ProtocolName.PEER)
    c.send(msg)
    world.flush()
    assert_fatal(c, ErrorCode.UNEXPECTED_MESSAGE)
    finish(world, c)
    world.assert_idle()


def test_joiner_claiming_a_member_id_in_hello(world: PeerWorld) -> None:
    """A PeerHello without a client certificate names nobody: refused."""
    c = world.connect_joiner()
    c.send_preamble(ProtocolName.PEER)
    c.send(world.hello(server_id=MEMBER_SID))
    world.flush()
    assert_fatal(c, ErrorCode.AUTH_FAILED)
    finish(world, c)
    world.assert_idle()


@HYPOTHESIS
@given(token_id=st.text(TEXT, max_size=40), secret=st.text(TEXT, max_size=80),
       server_id=st.from_regex(p.SERVER_ID_PATTERN, fullmatch=True))
def test_join_request_with_random_token(world: PeerWorld, token_id: str, secret: str,
                                        server_id: str) -> None:
    _key, csr = make_csr("s9", ["10.0.0.9"])
    c = world.connect_joiner()
    c.send_preamble(ProtocolName.PEER)
    c.send(p.JoinRequest(token_id, secret, server_id, csr.public_bytes(Encoding.PEM),
                         address("10.0.0.9")))
    world.flush()
    assert_fatal(c, ErrorCode.BAD_TOKEN)
    finish(world, c)
    world.assert_idle()


# --------------------------------------------------------------------------
# A member misbehaving after the handshake


def _state(w: PeerWorld) -> tuple[Any, ...]:
    return (sorted(w.cluster.members), sorted(w.cluster.connections),
            sorted(w.cluster.membership.view()), len(w.net.connections),
            len(w.clock.getDelayedCalls()), len(w.cluster._digests))


def test_heartbeat_flood_is_answered_without_growth(world: PeerWorld) -> None:
    c = world.join_as_member()
    c.take()
    before = _state(world)
    count = 10_000
    load = p.Load(1, 2, 3, 4)
    frames = b"".join(m.encode(p.Heartbeat(seq, 1_000_000 + seq, load)) for seq in range(count))
    for start in range(0, len(frames), 64 * 1024):  # as TCP would deliver it
        c.send_raw(frames[start:start + 64 * 1024])
        world.flush()
    acks = c.of_type(p.HeartbeatAck)
    assert [a.seq for a in acks] == list(range(count))
    assert [a.echo_sent_wall_us for a in acks] == [1_000_000 + s for s in range(count)]
    assert not c.closed and c.errors == []
    assert _state(world) == before
    assert world.cluster.loads == {MEMBER_SID: load}
    # The link still works ...
    c.take()
    c.send(m.Ping(99))
    world.flush()
    assert m.Pong(99) in c.messages
    # ... and so does the server's client side.
    viewer = raw.connect(world.net, HOST, VIEWER_PORT, source="10.0.0.77")
    viewer.send_preamble(ProtocolName.VIEWER)
    viewer.send(m.Login("bob", "bob-pw", "raw/1"))
    world.flush()
    assert viewer.of_type(m.LoginOk), viewer.messages
    viewer.close()
    c.close()
    world.flush()
    world.check_logs()
    world.check_store()


def _valid_domain(name: str) -> p.RecordUpdate:
    return p.RecordUpdate("domains", name, "", (
        p.Field("uid", p.encode_value("6f1c2bd4-58b5-4bd5-9a57-4a1d50c7e0a1"), STAMP),
        p.Field("created", p.encode_value(1.0), STAMP),
        p.Field("updated", p.encode_value(1.0), STAMP),
    ))


#: Every field name of every replicated table (a name valid in one table is
#: not drawn as "unknown" for another: the test stays about unknown names).
_ALL_FIELDS = frozenset(f for table in TABLES.values() for f in table.fields) | {"uid"}

BAD_RECORDS = st.one_of(
    # An unknown table.
    st.builds(lambda t, k: p.RecordUpdate(t, k, "", (p.Field("x", b"1", STAMP),)),
              st.text(TEXT, max_size=20).filter(lambda t: t not in TABLES),
              st.text(TEXT, max_size=20)),
    # An unknown field of a known table.
    st.builds(lambda t, f: p.RecordUpdate(t, "k1", "", (p.Field(f, b"1", STAMP),)),
              st.sampled_from(sorted(TABLES)),
              st.text(TEXT, max_size=20).filter(lambda f: f not in _ALL_FIELDS)),
    # A value of the wrong type or not JSON at all.
    st.builds(lambda v: p.RecordUpdate("domains", "evil", "", (p.Field("created", v, STAMP),)),
              st.sampled_from([b'"yesterday"', b"[1,2]", b"{}", b"null", b"true", b"\xff\xfe",
                               b"NaN", b"", b"{"])),
    # A bad key.
    st.builds(lambda k: p.RecordUpdate("domains", k, "", (p.Field("created", b"1.0", STAMP),)),
              st.sampled_from(["", " ", " lead", "trail ", "x" * 65])),
)


def _updates_frame(records: list[p.RecordUpdate], pad_to: int | None) -> bytes:
    """``Updates(records)``, with one more (bad) record padded so that the frame's length
    field (which counts the type byte and the body) is exactly ``pad_to``."""
    if pad_to is None:
        return m.encode(p.Updates(tuple(records)))
    filler = p.RecordUpdate("no_such_table", "pad", "", (p.Field("pad", b"", STAMP),))
    base = len(m.encode(p.Updates((*records, filler))))
    room = pad_to + LENGTH_SIZE - base
    assert room >= 0
    chunks = []
    while room > 0:
        # Each extra field costs its name (2 + 3) + value (2 + n) + stamp (2 + len).
        overhead = 2 + 3 + 2 + 2 + len(STAMP)
        n = min(room - overhead, 0xFFFF) if room > overhead else 0
        if room <= overhead:
            break
        chunks.append(p.Field("pad", b"0" * n, STAMP))
        room -= overhead + n
    filler = p.RecordUpdate("no_such_table", "pad" + "x" * room, "",
                            (p.Field("pad", b"", STAMP), *chunks))
    frame = m.encode(p.Updates((*records, filler)))
    assert len(frame) == pad_to + LENGTH_SIZE, (len(frame), pad_to)
    return frame


@settings(HYPOTHESIS, max_examples=15)
@given(good=st.integers(0, 50), bad=st.lists(BAD_RECORDS, min_size=1, max_size=20),
       at_limit=st.booleans())
def test_bad_updates_leave_the_store_unchanged(make_world: Callable[[], PeerWorld],
                                               good: int, bad: list[p.RecordUpdate],
                                               at_limit: bool) -> None:
    world = make_world()  # a fresh server each time: a member is added by the handshake
    try:
        _send_bad_updates(world, good, bad, at_limit)
    finally:
        world.close()


def _send_bad_updates(world: PeerWorld, good: int, bad: list[p.RecordUpdate],
                      at_limit: bool) -> None:
    c = world.connect_member()
    c.send_preamble(ProtocolName.PEER)
    c.send(world.hello())
    world.flush()
    assert c.of_type(p.PeerWelcome), c.messages
    c.take()
    records = [_valid_domain(f"d{i}") for i in range(good)] + bad
    try:
        frame = _updates_frame(records, p.FRAME_LIMIT if at_limit else None)
    except WireError:
        return  # not encodable (e.g. a key too long for a string field): nothing to send
    decoded = list(FrameDecoder(p.FRAME_LIMIT, expect_preamble=False).feed(frame))
    assert len(decoded) == 1
    if at_limit:  # exactly at the limit: one byte more would be refused
        with pytest.raises(WireError):
            list(FrameDecoder(p.FRAME_LIMIT - 1, expect_preamble=False).feed(frame))
    c.send_raw(frame)
    world.flush()
    assert c.decode_error is None
    fatal = c.fatal_errors
    if fatal:
        assert len(fatal) == 1 and ErrorCode(fatal[0].code) == ErrorCode.MALFORMED, fatal
    else:
        # Refused inside: the link stays and still answers.
        assert not c.closed
        c.send(m.Ping(1))
        world.flush()
        assert m.Pong(1) in c.messages
    world.check_store()
    world.check_logs()
    finish(world, c)
    assert world.cluster.connections == {}
    world.check_store()


def test_frame_over_the_limit_is_refused_before_its_body(world: PeerWorld) -> None:
    c = world.join_as_member()
    c.take()
    # Only the header: the refusal must not wait for (or buffer) the body.
    c.send_raw(FRAME_HEADER.pack(p.FRAME_LIMIT + 1, 0x60) + b"\x00" * 100)
    world.flush()
    assert_fatal(c, ErrorCode.FRAME_TOO_LARGE)
    finish(world, c)
    assert world.cluster.connections == {}
    world.check_store()
    world.check_logs()


def test_frame_over_the_handshake_limit_is_refused(world: PeerWorld) -> None:
    c = world.connect_member()
    c.send_preamble(ProtocolName.PEER)
    c.send_raw(FRAME_HEADER.pack(p.HANDSHAKE_FRAME_LIMIT + 1, 0x50))
    world.flush()
    assert_fatal(c, ErrorCode.FRAME_TOO_LARGE)
    finish(world, c)
    world.assert_idle()


def test_preamble_of_another_protocol(world: PeerWorld) -> None:
    c = world.connect_member()
    c.send_raw(encode_preamble(ProtocolName.VIEWER))
    world.flush()
    assert_fatal(c, ErrorCode.WRONG_PROTOCOL)
    finish(world, c)
    world.assert_idle()

