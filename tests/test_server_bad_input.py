"""Bad input on every server port: the server refuses it clearly, never crashes or leaks.

Everything runs on the in-memory network and a ``task.Clock`` (no sockets, no
real time).  Each test builds one server and, in the Hypothesis tests, reuses
it across examples: every example must leave the server exactly as idle as it
found it (no connection, session, channel, ticket or timer), which is itself
the main property checked.  Every test also checks that nothing was logged as
an error or failure and that the store's tables are byte-for-byte unchanged.
"""

from __future__ import annotations

import gc
import itertools
import sqlite3
import struct
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from evserver.media import SyntheticSource
from evserver.net.connection import CLOSE_GRACE
from evserver.net.server import ServerSettings, relay_settings
from evserver.passwords import hash_password
from evserver.state.relay import Limits
from evserver.store import Store
from evserver.testing import raw
from evserver.testing.harness import (
    ENCODER_PORT,
    RELAY_PORT,
    VIEWER_PORT,
    MemoryServer,
    make_store,
)
from evserver.testing.memnet import HIGH_WATER, MemoryNetwork
from evserver.testing.raw import RawClient
from evserver.wire import messages as m
from evserver.wire.framing import (
    MAGIC,
    VERSION,
    ErrorCode,
    FrameDecoder,
    Preamble,
    ProtocolName,
    WireError,
    encode_frame,
    encode_preamble,
)

HOST = "127.0.0.1"
PORTS = {
    ENCODER_PORT: ProtocolName.ENCODER,
    VIEWER_PORT: ProtocolName.VIEWER,
    RELAY_PORT: ProtocolName.RELAY,
}
PORT_IDS = [p.name.lower() for p in PORTS.values()]

DOMAINS: dict[str, dict[str, Any]] = {
    "north": {"accounts": {"alice": "alice-pw", "bob": "bob-pw"}, "encoders": ["cam1", "cam2"]},
    "south": {"accounts": {"carol": "carol-pw"}, "encoders": ["cam9"]},
}
#: Message class -> wire type.
TYPE: dict[type, int] = {cls: t for t, cls in m.MESSAGES.items()}
PASSWORDS = {name: pw for d in DOMAINS.values() for name, pw in d["accounts"].items()}
ZERO_STATS = {"encoders": 0, "streaming": 0, "viewers": 0, "channels": 0}

#: Codes a fatal refusal of unauthenticated garbage may carry.
PRE_AUTH_CODES = {
    ErrorCode.BAD_PREAMBLE,
    ErrorCode.WRONG_PROTOCOL,
    ErrorCode.VERSION_TOO_OLD,
    ErrorCode.MALFORMED,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.UNEXPECTED_MESSAGE,
    ErrorCode.AUTH_FAILED,  # garbage that happens to be a well-formed EncoderAuth / Login
    ErrorCode.BAD_TICKET,  # ... or a well-formed RelayHello
}
#: Codes a fatal refusal of garbage from an authenticated client may carry.
POST_AUTH_CODES = {
    ErrorCode.MALFORMED,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.UNEXPECTED_MESSAGE,
    ErrorCode.PROTOCOL_VIOLATION,  # uplink media with a stream id
}
#: Codes of the refusals (fatal = 0) a viewer's requests may get.
REFUSAL_CODES = {ErrorCode.NOT_FOUND, ErrorCode.DUPLICATE, ErrorCode.LIMIT_EXCEEDED}


# --------------------------------------------------------------------------
# The world: one server on a MemoryNetwork, with checks


def _cheap_hash(password: str) -> str:
    # Cheap scrypt parameters: a login then costs microseconds, so Hypothesis
    # can log in once per example.  Unknown accounts still cost one real
    # verification (the server's timing equaliser), which is why the
    # strategies mostly use existing account names.
    return hash_password(password, n=16, r=1, p=1)


def build_store(path: Path, domains: dict[str, dict[str, Any]]) -> tuple[Store, dict[str, str]]:
    """``harness.make_store`` with cheap password hashes."""
    return make_store(path, domains, password_hasher=_cheap_hash)


def dump_store(path: Path) -> str:
    """Every table of the store, as SQL text (read through a separate connection)."""
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


class World:
    """One server on an in-memory network, watched for logged errors."""

    def __init__(self, path: Path, *, settings: ServerSettings | None = None,
                 limits: Limits | None = None,
                 domains: dict[str, dict[str, Any]] = DOMAINS) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.net = MemoryNetwork()
        self.clock = self.net.clock
        self.store, self.secrets = build_store(path / "db.sqlite3", domains)
        self.server = MemoryServer(self.net, HOST, self.store, settings=settings, limits=limits)
        self.core = self.server.core
        self.settings = self.server.settings
        self.limits = self.core.limits
        self.dump_before = dump_store(self.store.path)
        self.bad_events: list[dict[str, Any]] = []
        self._observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(self._observer)
        self._closed = False

    def _observe(self, event: dict[str, Any]) -> None:
        if _is_bad_event(event):
            self.bad_events.append(event)

    # -- connecting and moving time ----------------------------------------

    def connect(self, port: int, **kwargs: Any) -> RawClient:
        return raw.connect(self.net, HOST, port, **kwargs)

    def flush(self) -> None:
        self.net.flush()

    def advance(self, seconds: float, step: float = 0.01) -> None:
        self.net.advance(seconds, step)

    # -- checks ------------------------------------------------------------

    def check_logs(self, collect: bool = False) -> None:
        if collect:
            gc.collect()  # "Unhandled error in Deferred" is logged when one is collected
        assert not self.bad_events, "\n\n".join(_describe(e) for e in self.bad_events)

    def check_store(self) -> None:
        assert dump_store(self.store.path) == self.dump_before

    def assert_idle(self) -> None:
        """No connection, session, channel, ticket or timer is left; nothing was logged as
        an error; the store is unchanged."""
        self.flush()
        assert self.net.connections == []
        for port, factory in self.server.factories.items():
            assert not factory.connections, (port, factory.connections)
        assert self.core.stats() == ZERO_STATS
        assert not self.core.encoders and not self.core.viewers and not self.core.channels
        assert not self.core._tickets
        assert self.clock.getDelayedCalls() == []
        self.check_logs()
        self.check_store()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        globalLogPublisher.removeObserver(self._observer)
        try:
            self.check_store()
            self.check_logs(collect=True)
        finally:
            self.store.close()


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    worlds: list[World] = []

    def make(**kwargs: Any) -> World:
        world = World(tmp_path / f"world{len(worlds)}", **kwargs)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.close()


# --------------------------------------------------------------------------
# Raw-client helpers


def server_side(client: RawClient) -> Any:
    """The server's protocol object at the other end of ``client``'s connection."""
    return client.mem.other.protocol  # type: ignore[union-attr]


def only(client: RawClient, cls: type) -> Any:
    found = client.of_type(cls)
    assert len(found) == 1, (cls.__name__, client.messages)
    return found[0]


def assert_fatal(client: RawClient, code: ErrorCode) -> m.Error:
    """Exactly one Error, fatal, with ``code``, as the last message; the server closed."""
    assert client.decode_error is None
    errors = client.errors
    assert len(errors) == 1, client.messages
    error = errors[0]
    assert client.messages[-1] is error
    assert (ErrorCode(error.code), error.fatal, error.request_id) == (code, 1, 0), error
    assert error.message
    assert client.closed
    return error


def assert_refused(client: RawClient, request_id: int, code: ErrorCode) -> m.Error:
    """The last message is a refusal (fatal = 0) of ``request_id``; the connection stays."""
    error = client.messages[-1]
    assert isinstance(error, m.Error), client.messages
    assert (ErrorCode(error.code), error.fatal, error.request_id) == (code, 0, request_id)
    assert not client.closed
    return error


def auth_encoder(w: World, encoder_id: str = "cam2") -> tuple[RawClient, m.EncoderAuthOk]:
    c = w.connect(ENCODER_PORT, answer_pings=True)
    c.send_preamble(ProtocolName.ENCODER)
    c.send(m.EncoderAuth(encoder_id, w.secrets[encoder_id], "raw/1"))
    w.flush()
    assert c.preamble == Preamble(ProtocolName.ENCODER, VERSION)
    return c, only(c, m.EncoderAuthOk)


def login_viewer(w: World, account: str = "bob") -> tuple[RawClient, m.LoginOk]:
    c = w.connect(VIEWER_PORT, answer_pings=True)
    c.send_preamble(ProtocolName.VIEWER)
    c.send(m.Login(account, PASSWORDS[account], "raw/1"))
    w.flush()
    assert c.preamble == Preamble(ProtocolName.VIEWER, VERSION)
    return c, only(c, m.LoginOk)


def open_relay(w: World, ticket: bytes, **kwargs: Any) -> RawClient:
    c = w.connect(RELAY_PORT, **kwargs)
    c.send_preamble(ProtocolName.RELAY)
    c.send(m.RelayHello(ticket))
    w.flush()
    only(c, m.RelayOk)
    return c


def deliver(w: World, client: RawClient, data: bytes, chunks: Sequence[int] = ()) -> None:
    """Send ``data`` in pieces of the given sizes (the rest at the end), flushing between."""
    pos = 0
    for size in chunks:
        if pos >= len(data):
            break
        client.send_raw(data[pos:pos + size])
        pos += size
        w.flush()
    client.send_raw(data[pos:])
    w.flush()


def has_fatal_error_frame(data: bytes) -> bool:
    """True if ``data`` (frames, no preamble) holds a well-formed fatal Error frame."""
    try:
        for item in FrameDecoder(2**32 - 1, expect_preamble=False).feed(data):
            if isinstance(item, Preamble):
                continue
            msg_type, body = item
            if msg_type == TYPE[m.Error] and m.decode(msg_type, body).fatal:
                return True
    except WireError:
        pass
    return False


def check_garbage_outcome(client: RawClient, port: int, codes: set[ErrorCode],
                          allowed: tuple[type, ...] = (), skip: int = 0,
                          sent_after_auth: bytes = b"") -> None:
    """The server's answer to garbage: well-formed, at most one fatal Error, last, then closed.

    ``allowed``: the other messages it may send (before authentication:
    nothing, not even a Pong); ``skip``: messages received before the garbage
    (the authentication answer).  Without a fatal error the input was
    incomplete (or harmless) and the connection must still be open, unless
    the client itself sent a fatal Error after authenticating (the server
    then closes without answering, so that errors cannot ping-pong).
    """
    assert client.decode_error is None, client.decode_error
    assert client.preamble == Preamble(PORTS[port], VERSION)
    msgs = client.messages[skip:]
    fatal = [x for x in msgs if isinstance(x, m.Error) and x.fatal]
    for x in msgs:
        if isinstance(x, m.Error):
            if x.fatal:
                continue
            assert ErrorCode(x.code) in REFUSAL_CODES, x
        else:
            assert isinstance(x, allowed), x
    if fatal:
        assert len(fatal) == 1, msgs
        error = fatal[0]
        assert msgs[-1] is error, msgs
        assert ErrorCode(error.code) in codes, error
        assert error.request_id == 0 and error.message
        assert client.closed, "a fatal error must be followed by the close"
    elif client.closed:
        assert has_fatal_error_frame(sent_after_auth), "closed without an error frame"


# --------------------------------------------------------------------------
# Strategies

TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=12)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, 2**64 - 1)
ENCODER_IDS = st.sampled_from(["cam1", "cam2", "cam9", "nosuch"])
ACCOUNTS = st.sampled_from(["alice", "bob", "carol"])

CLIENT_MESSAGES = st.one_of(
    st.builds(m.Ping, U64),
    st.builds(m.Pong, U64),
    st.builds(m.Error, st.integers(0, 0xFFFF), U32, st.integers(0, 1), TEXT),
    st.builds(m.EncoderAuth, ENCODER_IDS | TEXT, TEXT, TEXT),
    st.builds(m.Login, ACCOUNTS, TEXT, TEXT),
    st.builds(m.ListEncoders, U32),
    st.builds(m.Watch, U32, ENCODER_IDS | TEXT),
    st.builds(m.Unwatch, U32, st.integers(0, 4) | U32),
    st.builds(m.RelayHello, st.binary(max_size=40)),
    st.builds(m.Media, st.integers(0, 2) | U32, st.integers(0, 255), st.integers(0, 1), U64,
              U64, st.binary(max_size=64)),
    # Messages only a server may send.
    st.sampled_from([m.RelayOk(), m.StartStream(), m.StopStream(), m.KeyframeRequest()]),
    st.builds(m.UnwatchOk, U32, U32),
)
#: Frames whose first field is a str holding arbitrary bytes (bad UTF-8, control
#: characters, a wrong length), or a Media header with arbitrary flags: what
#: the encoder refuses to produce.
BAD_FIELD_FRAMES = st.one_of(
    st.builds(lambda t, s, n, rest: encode_frame(t, struct.pack("!H", n) + s + rest),
              st.sampled_from([TYPE[m.EncoderAuth], TYPE[m.Login], TYPE[m.Error]]),
              st.binary(max_size=12), st.integers(0, 16), st.binary(max_size=12)),
    st.builds(lambda flags, payload: encode_frame(
        m.MEDIA, struct.pack("!IBBQQ", 0, 1, flags, 0, 0) + payload),
        st.integers(0, 255), st.binary(max_size=16)),
)
FRAMES = st.one_of(
    CLIENT_MESSAGES.map(m.encode),
    BAD_FIELD_FRAMES,
    st.builds(encode_frame, st.integers(0, 255), st.binary(max_size=48)),
    st.binary(max_size=24),
)
FRAME_STREAMS = st.lists(FRAMES, max_size=5).map(b"".join)
CHUNKS = st.lists(st.integers(1, 40), max_size=6)


def preambles(port: int) -> st.SearchStrategy[bytes]:
    own = PORTS[port]
    return st.one_of(
        st.just(encode_preamble(own)),
        st.builds(encode_preamble, st.sampled_from(list(ProtocolName)),
                  st.tuples(st.integers(0, 3), st.integers(0, 3))),
        st.binary(min_size=12, max_size=12).map(lambda rest: MAGIC + rest),
        st.binary(max_size=20),
    )


def with_port(make: Callable[[int], st.SearchStrategy[bytes]]) -> st.SearchStrategy[Any]:
    return st.sampled_from(list(PORTS)).flatmap(lambda port: st.tuples(st.just(port), make(port)))


# --------------------------------------------------------------------------
# Random bytes


def test_random_bytes_as_whole_connection(make_world: Callable[..., World]) -> None:
    w = make_world()

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(
        target=with_port(lambda p: st.binary(max_size=200)
                         | st.binary(max_size=120).map(lambda b: MAGIC + b)
                         | st.tuples(preambles(p), FRAME_STREAMS).map(b"".join)),
        chunks=CHUNKS,
    )
    def run(target: tuple[int, bytes], chunks: list[int]) -> None:
        port, data = target
        c = w.connect(port)
        deliver(w, c, data, chunks)
        check_garbage_outcome(c, port, PRE_AUTH_CODES)
        if data[:1] and data[:1] != MAGIC[:1]:
            assert_fatal(c, ErrorCode.BAD_PREAMBLE)  # refused on the first wrong byte
        c.close()
        w.assert_idle()

    run()


def test_random_bytes_after_preamble(make_world: Callable[..., World]) -> None:
    w = make_world()

    @settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
    @given(
        target=with_port(lambda p: (st.binary(max_size=120) | FRAME_STREAMS)
                         .map(lambda rest: encode_preamble(PORTS[p]) + rest)),
        chunks=CHUNKS,
    )
    def run(target: tuple[int, bytes], chunks: list[int]) -> None:
        port, data = target
        c = w.connect(port)
        deliver(w, c, data, chunks)
        check_garbage_outcome(c, port, PRE_AUTH_CODES)
        c.close()
        w.assert_idle()

    run()


@pytest.mark.parametrize("mode", ["encoder", "viewer", "encoder-relay", "viewer-relay"])
def test_random_frames_after_authentication(make_world: Callable[..., World], mode: str) -> None:
    """An authenticated client sending garbage: refused, its session ends, nothing is left."""
    w = make_world()

    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    @given(data=FRAME_STREAMS | st.binary(max_size=100), chunks=CHUNKS)
    def run(data: bytes, chunks: list[int]) -> None:
        ok: m.EncoderAuthOk | m.LoginOk
        session: Any
        if mode.startswith("encoder"):
            control, ok = auth_encoder(w)
            session = w.core.encoders["cam2"]
        else:
            control, ok = login_viewer(w)
            session = next(iter(w.core.viewers))
        if mode.endswith("relay"):
            target, port = open_relay(w, ok.ticket), RELAY_PORT
            allowed: tuple[type, ...] = (m.Pong, m.RelayOk)
        else:
            target, port = control, (ENCODER_PORT if mode == "encoder" else VIEWER_PORT)
            allowed = (m.Pong, m.EncoderAuthOk, m.LoginOk, m.EncoderList, m.WatchOk,
                       m.UnwatchOk, m.EncoderUpdate)
        skip = len(target.messages)
        deliver(w, target, data, chunks)
        check_garbage_outcome(target, port, POST_AUTH_CODES, allowed, skip, data)
        if target is control and control.closed:
            assert session.closed
        control.close()
        target.close()
        w.assert_idle()
        assert session.closed

    run()


# --------------------------------------------------------------------------
# Truncations


def _truncation_cases(w: World, ticket: bytes) -> list[tuple[int, str, bytes, bytes]]:
    """(port, name, bytes sent before, the frame to truncate): every valid client frame."""
    enc = encode_preamble(ProtocolName.ENCODER)
    view = encode_preamble(ProtocolName.VIEWER)
    rel = encode_preamble(ProtocolName.RELAY)
    auth = m.encode(m.EncoderAuth("cam2", w.secrets["cam2"], "raw/1"))
    login = m.encode(m.Login("bob", "bob-pw", "raw/1"))
    media = m.Media(0, 1, 1, 40_000, 1_700_000_000_000_000, bytes(range(40)))
    common = [m.Ping(0x0102030405060708), m.Pong(9), m.Error(1, 0, 1, "giving up")]
    cases: list[tuple[int, str, bytes, bytes]] = []
    for port, pre in ((ENCODER_PORT, enc), (VIEWER_PORT, view), (RELAY_PORT, rel)):
        cases.append((port, "preamble", b"", pre))
        for msg in common:
            cases.append((port, type(msg).__name__, pre, m.encode(msg)))
    for msg in (m.EncoderAuth("cam2", w.secrets["cam2"], "raw/1"),
                m.EncoderAuth("cam2", "wrong-secret-wrong", "raw/1"), media):
        cases.append((ENCODER_PORT, type(msg).__name__, enc, m.encode(msg)))
    for msg in (m.Login("bob", "bob-pw", "raw/1"), m.Login("bob", "nope", "raw/1"),
                m.ListEncoders(1), m.Watch(2, "cam1"), m.Unwatch(3, 1)):
        cases.append((VIEWER_PORT, type(msg).__name__, view, m.encode(msg)))
    for msg in (m.RelayHello(ticket), m.RelayHello(b"\x00" * 32), media):
        cases.append((RELAY_PORT, type(msg).__name__, rel, m.encode(msg)))
    # After authentication: truncations of what an authenticated client sends.
    for msg in (m.Ping(5), m.Pong(6)):
        cases.append((ENCODER_PORT, "authed " + type(msg).__name__, enc + auth, m.encode(msg)))
    for msg in (m.ListEncoders(7), m.Watch(8, "cam1"), m.Unwatch(9, 1), m.Ping(10)):
        cases.append((VIEWER_PORT, "authed " + type(msg).__name__, view + login, m.encode(msg)))
    hello = m.encode(m.RelayHello(ticket))
    for msg in (media, m.Ping(11)):
        cases.append((RELAY_PORT, "authed " + type(msg).__name__, rel + hello, m.encode(msg)))
    return cases


#: What the server answers to valid requests.
ANSWERS = (m.Pong, m.EncoderAuthOk, m.LoginOk, m.RelayOk, m.EncoderList, m.WatchOk,
           m.UnwatchOk)


def test_every_truncation_of_every_client_frame_then_close(
        make_world: Callable[..., World]) -> None:
    w = make_world()
    # A live encoder session (cam1) whose ticket the relay cases present.
    owner, ok = auth_encoder(w, "cam1")
    owner_session = w.core.encoders["cam1"]
    timers = len(w.clock.getDelayedCalls())
    cases = _truncation_cases(w, ok.ticket)
    seen = 0
    for port, name, before, frame in cases:
        for cut in range(len(frame) + 1):
            c = w.connect(port)
            c.send_raw(before + frame[:cut])
            w.flush()
            check_garbage_outcome(c, port, PRE_AUTH_CODES, ANSWERS)
            c.close()
            w.flush()
            seen += 1
            where = (name, cut, len(frame))
            assert w.net.connections == [(owner.mem, owner.mem.other)], where
            for factory in w.server.factories.values():
                assert all(conn is server_side(owner) for conn in factory.connections), where
            assert w.core.stats() == {**ZERO_STATS, "encoders": 1, "channels": 1}, where
            assert list(w.core._tickets) == [ok.ticket], where
            assert owner_session.relay is None and not owner_session.closed, where
            assert len(w.clock.getDelayedCalls()) == timers, where
    assert len(cases) == 31 and seen == sum(len(c[3]) + 1 for c in cases)
    w.check_logs()
    owner.close()
    w.assert_idle()


# --------------------------------------------------------------------------
# Frame length limits


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
def test_length_over_control_limit_refused_on_the_four_length_bytes(
        make_world: Callable[..., World], port: int) -> None:
    w = make_world()
    limit = w.settings.max_control_frame
    c = w.connect(port)
    c.send_preamble(PORTS[port])
    w.flush()
    header = struct.pack("!I", limit + 1)
    for i in range(3):
        c.send_raw(header[i:i + 1])
        w.flush()
        assert c.messages == [] and not c.closed
    srv = server_side(c)
    c.send_raw(header[3:])
    w.flush()
    error = assert_fatal(c, ErrorCode.FRAME_TOO_LARGE)
    assert str(limit + 1) in error.message and str(limit) in error.message
    assert srv.decoder.buffered <= 4  # none of the body was ever sent or kept
    c.close()
    w.assert_idle()


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
def test_length_at_control_limit_waits_for_the_body(
        make_world: Callable[..., World], port: int) -> None:
    w = make_world()
    c = w.connect(port)
    c.send_preamble(PORTS[port])
    c.send_raw(struct.pack("!IB", w.settings.max_control_frame, 0x7F))
    w.flush()
    assert c.messages == [] and not c.closed
    c.send_raw(bytes(w.settings.max_control_frame - 1))
    w.flush()
    assert_fatal(c, ErrorCode.MALFORMED)  # unknown type 0x7f, once the frame is complete
    c.close()
    w.assert_idle()


def test_any_length_over_the_limit_is_refused(make_world: Callable[..., World]) -> None:
    w = make_world()
    limit = w.settings.max_control_frame

    @settings(max_examples=100)
    @given(port=st.sampled_from(list(PORTS)), length=st.integers(limit + 1, 2**32 - 1),
           body=st.binary(max_size=8))
    def run(port: int, length: int, body: bytes) -> None:
        c = w.connect(port)
        c.send_preamble(PORTS[port])
        c.send_raw(struct.pack("!I", length))
        w.flush()
        assert_fatal(c, ErrorCode.FRAME_TOO_LARGE)
        srv = server_side(c)
        c.send_raw(body)  # the body, too late: the server has closed
        w.flush()
        assert srv.decoder.buffered <= 4  # the length bytes, never the body
        c.close()
        w.assert_idle()

    run()


def test_encoder_relay_gets_the_media_limit_after_hello(make_world: Callable[..., World]) -> None:
    w = make_world()
    control, ok = auth_encoder(w)
    media_limit = w.settings.max_media_frame
    # Before the hello: the control limit.
    early = w.connect(RELAY_PORT)
    early.send_preamble(ProtocolName.RELAY)
    early.send_raw(struct.pack("!IB", w.settings.max_control_frame + 1, m.MEDIA))
    w.flush()
    assert_fatal(early, ErrorCode.FRAME_TOO_LARGE)
    # After it (even in the same write): the media limit.
    relay = w.connect(RELAY_PORT)
    relay.send_preamble(ProtocolName.RELAY)
    relay.send(m.RelayHello(ok.ticket))
    payload = bytes(w.settings.max_control_frame * 2)
    relay.send(m.Media(0, 1, 1, 0, 0, payload))
    w.flush()
    assert [type(x) for x in relay.messages] == [m.RelayOk] and not relay.closed
    assert w.core.encoders["cam2"].frames_in == 1
    relay.send_raw(struct.pack("!I", media_limit))
    w.flush()
    assert not relay.closed  # exactly at the limit: waits for the body
    relay.abort()
    w.flush()
    relay = open_relay(w, ok.ticket)
    relay.send_raw(struct.pack("!I", media_limit + 1))
    w.flush()
    assert_fatal(relay, ErrorCode.FRAME_TOO_LARGE)
    assert not control.closed  # the control session is not affected
    control.close()
    w.assert_idle()


def test_viewer_relay_and_control_keep_the_control_limit(
        make_world: Callable[..., World]) -> None:
    w = make_world()
    enc, _ = auth_encoder(w)
    control, ok = login_viewer(w)
    relay = open_relay(w, ok.ticket)
    relay.send_raw(struct.pack("!I", w.settings.max_control_frame + 1))
    w.flush()
    assert_fatal(relay, ErrorCode.FRAME_TOO_LARGE)
    for client in (control, enc):
        skip = len(client.messages)
        client.send_raw(struct.pack("!I", w.settings.max_control_frame + 1))
        w.flush()
        error = client.messages[skip:]
        assert [(ErrorCode(e.code), e.fatal) for e in error] == [(ErrorCode.FRAME_TOO_LARGE, 1)]
        assert client.closed
    w.assert_idle()


# --------------------------------------------------------------------------
# Preambles


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
def test_bad_magic_is_refused_on_the_first_wrong_byte(
        make_world: Callable[..., World], port: int) -> None:
    w = make_world()
    for data in (b"G", b"EVSX", b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\n",
                 b"EVSX" + encode_preamble(ProtocolName.ENCODER)[4:]):
        c = w.connect(port)
        c.send_raw(data)
        w.flush()
        assert c.preamble == Preamble(PORTS[port], VERSION)
        assert_fatal(c, ErrorCode.BAD_PREAMBLE)
        w.assert_idle()
    c = w.connect(port)
    c.send_raw(MAGIC[:3])  # a correct beginning: wait for the rest
    w.flush()
    assert c.messages == [] and not c.closed
    c.close()
    w.assert_idle()


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
@pytest.mark.parametrize("other", list(ProtocolName), ids=[p.name.lower() for p in ProtocolName])
def test_wrong_protocol_names_both(make_world: Callable[..., World], port: int,
                                   other: ProtocolName) -> None:
    w = make_world()
    c = w.connect(port)
    c.send_preamble(other)
    w.flush()
    if other is PORTS[port]:
        assert c.messages == [] and not c.closed
        c.close()
    else:
        error = assert_fatal(c, ErrorCode.WRONG_PROTOCOL)
        assert repr(PORTS[port].value.decode()) in error.message
        assert repr(other.value.decode()) in error.message
    w.assert_idle()


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
def test_unknown_protocol_name(make_world: Callable[..., World], port: int) -> None:
    w = make_world()
    for name in (b"camera\0\0", b"encoder ", PORTS[port].value.ljust(7, b"\0") + b"x",
                 b"\xff" * 8):
        c = w.connect(port)
        c.send_raw(MAGIC + name + struct.pack("!HH", *VERSION))
        w.flush()
        assert_fatal(c, ErrorCode.WRONG_PROTOCOL)
        w.assert_idle()


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
@pytest.mark.parametrize(("version", "code"), [
    ((0, 0), ErrorCode.VERSION_TOO_OLD),
    ((0, 9), ErrorCode.VERSION_TOO_OLD),
    ((0, 65535), ErrorCode.VERSION_TOO_OLD),
    ((2, 0), ErrorCode.WRONG_PROTOCOL),
    ((65535, 0), ErrorCode.WRONG_PROTOCOL),
    ((1, 0), None),
    ((1, 7), None),  # a newer minor of the same major is accepted
])
def test_versions(make_world: Callable[..., World], port: int, version: tuple[int, int],
                  code: ErrorCode | None) -> None:
    w = make_world()
    c = w.connect(port)
    c.send_preamble(PORTS[port], version)
    w.flush()
    if code is None:
        assert c.messages == [] and not c.closed
        c.close()
    else:
        error = assert_fatal(c, code)
        # Both sides' versions, so an operator can tell which one to upgrade.
        assert f"{version[0]}.{version[1]}" in error.message
        assert f"{VERSION[0]}.{VERSION[1]}" in error.message
    w.assert_idle()


# --------------------------------------------------------------------------
# Malformed frames


def _str_field(raw_bytes: bytes) -> bytes:
    return struct.pack("!H", len(raw_bytes)) + raw_bytes


def _three_strs(first: bytes) -> bytes:
    return first + _str_field(b"x") + _str_field(b"y")


MALFORMED_COMMON = {
    "length zero": b"\0\0\0\0",
    "unknown type": encode_frame(0x7F, b""),
    "type zero": encode_frame(0x00, b"abc"),
    "truncated u64": encode_frame(TYPE[m.Ping], bytes(7)),
    "trailing byte": encode_frame(TYPE[m.Pong], bytes(9)),
    "truncated error": encode_frame(TYPE[m.Error], bytes(6)),
}
MALFORMED_AUTH = {
    ENCODER_PORT: (TYPE[m.EncoderAuth], {
        "truncated str": b"\x00\x06cam",
        "bad utf-8": _three_strs(_str_field(b"\xff\xfecam")),
        "encoded surrogate": _three_strs(_str_field(b"\xed\xa0\x80")),
        "overlong nul": _three_strs(_str_field(b"\xc0\x80")),
        "control character": _three_strs(_str_field(b"cam\x1b[2J")),
        "nul": _three_strs(_str_field(b"cam\x00")),
        "del": _three_strs(_str_field(b"cam\x7f")),
        "missing field": _str_field(b"cam") + _str_field(b"x"),
        "trailing bytes": _three_strs(_str_field(b"cam")) + b"\x00",
    }),
    VIEWER_PORT: (TYPE[m.Login], {
        "truncated str": b"\x00\x06ali",
        "bad utf-8": _three_strs(_str_field(b"ali\xe2\x82")),
        "control character": _three_strs(_str_field(b"alice\n")),
        "missing field": _str_field(b"alice"),
        "trailing bytes": _three_strs(_str_field(b"alice")) + b"\xff",
    }),
    RELAY_PORT: (TYPE[m.RelayHello], {
        "truncated bytes16": b"\x00\x20" + bytes(5),
        "truncated length": b"\x00",
        "trailing bytes": _str_field(bytes(32)) + b"\x00",
    }),
}


def _malformed_cases() -> list[Any]:
    cases = []
    for port in PORTS:
        for name, frame in MALFORMED_COMMON.items():
            cases.append(pytest.param(port, frame, id=f"{PORTS[port].name.lower()}-{name}"))
        msg_type, bodies = MALFORMED_AUTH[port]
        for name, body in bodies.items():
            cases.append(pytest.param(port, encode_frame(msg_type, body),
                                      id=f"{PORTS[port].name.lower()}-{name}"))
    return cases


@pytest.mark.parametrize(("port", "frame"), _malformed_cases())
def test_malformed_frame(make_world: Callable[..., World], port: int, frame: bytes) -> None:
    w = make_world()
    c = w.connect(port)
    c.send_preamble(PORTS[port])
    c.send_raw(frame + encode_frame(TYPE[m.Ping], bytes(8)))  # nothing after it is handled
    w.flush()
    assert_fatal(c, ErrorCode.MALFORMED)
    w.assert_idle()


@pytest.mark.parametrize("body", [
    struct.pack("!I", 1) + _str_field(b"cam\x01"),
    struct.pack("!I", 1) + _str_field(b"\xff"),
    struct.pack("!I", 1) + _str_field(b"cam1") + b"!",
    struct.pack("!I", 1),
], ids=["control character", "bad utf-8", "trailing byte", "missing field"])
def test_malformed_watch_after_login(make_world: Callable[..., World], body: bytes) -> None:
    w = make_world()
    c, _ = login_viewer(w)
    c.send_raw(encode_frame(TYPE[m.Watch], body))
    w.flush()
    c.messages.pop(0)
    assert_fatal(c, ErrorCode.MALFORMED)
    w.assert_idle()


@pytest.mark.parametrize("where", ["encoder", "viewer", "relay"])
def test_error_frames_from_an_authenticated_client(make_world: Callable[..., World],
                                                   where: str) -> None:
    """A refusal from the client is ignored; a fatal one ends the connection, unanswered."""
    w = make_world()
    control, ok = auth_encoder(w) if where != "viewer" else login_viewer(w)
    target = open_relay(w, ok.ticket) if where == "relay" else control
    target.take()
    target.send(m.Error(ErrorCode.INTERNAL, 5, 0, "could not do it"), m.Ping(3))
    w.flush()
    assert target.take() == [m.Pong(3)] and not target.closed
    target.send(m.Error(ErrorCode.PROTOCOL_VIOLATION, 0, 1, "you broke it"), m.Ping(4))
    w.flush()
    assert target.messages == [] and target.closed  # no answer, not even the Pong
    if where == "relay":
        assert not control.closed
        control.close()
    w.assert_idle()


# --------------------------------------------------------------------------
# Authentication


def test_encoder_auth_failures_are_indistinguishable(make_world: Callable[..., World]) -> None:
    w = make_world()
    answers = []
    for encoder_id, secret in (("cam1", "wrong-secret-0123456789"), ("nosuch", "whatever"),
                               ("cam1", w.secrets["cam9"]), ("", ""), ("cam1", "ß" * 20)):
        c = w.connect(ENCODER_PORT)
        c.send_preamble(ProtocolName.ENCODER)
        c.send(m.EncoderAuth(encoder_id, secret, "raw/1"))
        w.flush()
        answers.append(assert_fatal(c, ErrorCode.AUTH_FAILED))
        w.assert_idle()
    assert len(set(answers)) == 1, answers  # same code, same message: ids cannot be probed


def test_viewer_auth_failures_are_indistinguishable(make_world: Callable[..., World]) -> None:
    w = make_world()
    answers = []
    for account, password in (("alice", "wrong"), ("mallory", "alice-pw"), ("alice", "bob-pw"),
                              ("", ""), ("alice", "alice-pw ")):
        c = w.connect(VIEWER_PORT)
        c.send_preamble(ProtocolName.VIEWER)
        c.send(m.Login(account, password, "raw/1"))
        w.flush()
        answers.append(assert_fatal(c, ErrorCode.AUTH_FAILED))
        w.assert_idle()
    assert len(set(answers)) == 1, answers


class PendingThreads:
    """Stands in for deferToThread: calls wait until ``run`` is called."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args))
        return d

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for d, f, args in calls:
            d.callback(f(*args))


@pytest.mark.parametrize("password", ["bob-pw", "wrong"])
def test_second_login_while_one_is_pending(make_world: Callable[..., World],
                                           password: str) -> None:
    w = make_world()
    threads = PendingThreads()
    w.server.auth._defer_to_thread = threads
    c = w.connect(VIEWER_PORT)
    c.send_preamble(ProtocolName.VIEWER)
    c.send(m.Login("bob", password, "raw/1"))
    w.flush()
    assert len(threads.calls) == 1 and c.messages == []
    c.send(m.Login("bob", "bob-pw", "raw/1"))
    w.flush()
    assert len(threads.calls) == 1  # the second one did not start another check
    assert not w.core.viewers
    threads.run()
    w.flush()
    assert not threads.calls
    if password == "bob-pw":
        assert [type(x) for x in c.messages] == [m.LoginOk, m.Error]
        c.messages.pop(0)
        assert_fatal(c, ErrorCode.UNEXPECTED_MESSAGE)
    else:
        assert_fatal(c, ErrorCode.AUTH_FAILED)
    w.assert_idle()


@pytest.mark.parametrize(("port", "msg"), [
    (ENCODER_PORT, m.Error(1, 0, 1, "x")),
    (ENCODER_PORT, m.Login("alice", "alice-pw", "x")),  # another protocol's message
    (ENCODER_PORT, m.EncoderAuthOk(b"t", 1, "s", ())),  # a message only a server sends
    (ENCODER_PORT, m.Media(0, 1, 1, 0, 0, b"frame")),
    (VIEWER_PORT, m.ListEncoders(1)),
    (VIEWER_PORT, m.Watch(1, "cam1")),
    (VIEWER_PORT, m.Unwatch(1, 1)),
    (VIEWER_PORT, m.EncoderAuth("cam1", "x", "x")),
    (VIEWER_PORT, m.Media(0, 1, 1, 0, 0, b"frame")),
    (RELAY_PORT, m.Media(0, 1, 1, 0, 0, b"frame")),
    (RELAY_PORT, m.Error(1, 0, 0, "x")),
    (RELAY_PORT, m.RelayOk()),
])
def test_message_before_authentication(make_world: Callable[..., World], port: int,
                                       msg: Any) -> None:
    w = make_world()
    c = w.connect(port)
    c.send_preamble(PORTS[port])
    c.send(msg)
    w.flush()
    assert_fatal(c, ErrorCode.UNEXPECTED_MESSAGE)
    w.assert_idle()


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
def test_ping_before_authentication_is_unexpected(make_world: Callable[..., World],
                                                  port: int) -> None:
    w = make_world()
    c = w.connect(port)
    c.send_preamble(PORTS[port])
    c.send(m.Ping(1))
    w.flush()
    assert_fatal(c, ErrorCode.UNEXPECTED_MESSAGE)
    w.assert_idle()


def test_second_authentication_is_unexpected(make_world: Callable[..., World]) -> None:
    w = make_world()
    enc, ok = auth_encoder(w)
    relay = open_relay(w, ok.ticket)
    relay.send(m.RelayHello(ok.ticket))
    w.flush()
    enc.send(m.EncoderAuth("cam2", w.secrets["cam2"], "raw/1"))
    viewer, _ = login_viewer(w)
    viewer.send(m.Login("bob", "bob-pw", "raw/1"))
    w.flush()
    for c in (enc, relay, viewer):
        c.messages.pop(0)  # the acceptance
        assert_fatal(c, ErrorCode.UNEXPECTED_MESSAGE)
    w.assert_idle()


@pytest.mark.parametrize("port", PORTS, ids=PORT_IDS)
def test_no_authentication_within_ten_seconds(make_world: Callable[..., World],
                                              port: int) -> None:
    w = make_world()
    c = w.connect(port)
    c.send_preamble(PORTS[port])
    w.advance(w.settings.auth_timeout - 0.05)
    assert not c.closed and c.errors == []
    w.advance(0.1)
    error = assert_fatal(c, ErrorCode.KEEPALIVE_TIMEOUT)
    assert "authentication" in error.message
    w.assert_idle()
    # A client sending nothing at all (not even its preamble) is closed as well.
    silent = w.connect(port)
    w.advance(w.settings.auth_timeout + 0.1)
    assert_fatal(silent, ErrorCode.KEEPALIVE_TIMEOUT)
    w.assert_idle()
    # So is one that does not even read: aborted once the close grace is over.
    deaf = w.connect(port)
    deaf.mem.reader_stalled = True
    w.advance(w.settings.auth_timeout + 0.1)
    assert not deaf.closed  # the error frame waits to be read ...
    w.advance(CLOSE_GRACE)
    assert deaf.closed and deaf.messages == []  # ... and is dropped with the connection
    w.assert_idle()


def test_auth_timeout_while_the_login_check_is_pending(make_world: Callable[..., World]) -> None:
    w = make_world()
    threads = PendingThreads()
    w.server.auth._defer_to_thread = threads
    c = w.connect(VIEWER_PORT)
    c.send_preamble(ProtocolName.VIEWER)
    c.send(m.Login("bob", "bob-pw", "raw/1"))
    w.advance(w.settings.auth_timeout + 0.1)
    assert_fatal(c, ErrorCode.KEEPALIVE_TIMEOUT)
    threads.run()  # the check finishes after the connection is gone
    w.assert_idle()


def test_login_check_finishing_after_the_auth_timeout_creates_no_session(
        make_world: Callable[..., World]) -> None:
    w = make_world()
    threads = PendingThreads()
    w.server.auth._defer_to_thread = threads
    c = w.connect(VIEWER_PORT)
    c.send_preamble(ProtocolName.VIEWER)
    c.send(m.Login("bob", "bob-pw", "raw/1"))
    w.flush()
    w.clock.advance(w.settings.auth_timeout)  # the deadline passes; no flush yet
    assert server_side(c).failed
    threads.run()
    assert not w.core.viewers and not w.core._tickets
    w.flush()
    w.assert_idle()


def test_relay_hello_with_random_tickets(make_world: Callable[..., World]) -> None:
    w = make_world()
    enc, ok = auth_encoder(w)
    viewer, vok = login_viewer(w)

    @settings(max_examples=100)
    @given(ticket=st.binary(max_size=64))
    def run(ticket: bytes) -> None:
        if ticket in (ok.ticket, vok.ticket):
            return
        c = w.connect(RELAY_PORT)
        c.send_preamble(ProtocolName.RELAY)
        c.send(m.RelayHello(ticket))
        w.flush()
        assert_fatal(c, ErrorCode.BAD_TICKET)
        w.flush()
        assert len(w.server.factories[RELAY_PORT].connections) == 0

    run()
    assert w.core.encoders["cam2"].relay is None
    enc.close()
    viewer.close()
    w.assert_idle()


@pytest.mark.parametrize("kind", ["encoder", "viewer"])
def test_ticket_of_a_closed_session_is_refused(make_world: Callable[..., World],
                                               kind: str) -> None:
    w = make_world()
    control, ok = auth_encoder(w) if kind == "encoder" else login_viewer(w)
    relay = open_relay(w, ok.ticket)
    control.close()
    w.flush()
    assert relay.closed  # the session's relay connection goes with it
    late = w.connect(RELAY_PORT)
    late.send_preamble(ProtocolName.RELAY)
    late.send(m.RelayHello(ok.ticket))
    w.flush()
    assert_fatal(late, ErrorCode.BAD_TICKET)
    w.assert_idle()


@pytest.mark.parametrize("kind", ["encoder", "viewer"])
def test_replaced_relay_connection_gets_superseded(make_world: Callable[..., World],
                                                   kind: str) -> None:
    w = make_world()
    control, ok = auth_encoder(w) if kind == "encoder" else login_viewer(w)
    first = open_relay(w, ok.ticket)
    second = open_relay(w, ok.ticket)
    first.messages.pop(0)
    assert_fatal(first, ErrorCode.SUPERSEDED)
    assert not second.closed
    control.close()
    w.assert_idle()


def test_relay_of_a_superseded_encoder_gets_superseded(make_world: Callable[..., World]) -> None:
    w = make_world()
    old, ok = auth_encoder(w)
    relay = open_relay(w, ok.ticket)
    new, _ = auth_encoder(w)
    old.messages.pop(0)
    assert_fatal(old, ErrorCode.SUPERSEDED)
    assert not new.closed
    relay.messages.pop(0)
    assert_fatal(relay, ErrorCode.SUPERSEDED)
    new.close()
    w.assert_idle()


def test_uplink_media_with_a_stream_id_is_a_violation(make_world: Callable[..., World]) -> None:
    w = make_world()
    control, ok = auth_encoder(w)
    relay = open_relay(w, ok.ticket)
    relay.send(m.Media(7, 1, 1, 0, 0, b"frame"))
    w.flush()
    relay.messages.pop(0)
    assert_fatal(relay, ErrorCode.PROTOCOL_VIOLATION)
    control.close()
    w.assert_idle()


def test_media_with_undefined_flags_or_short_header(make_world: Callable[..., World]) -> None:
    w = make_world()
    control, ok = auth_encoder(w)
    for body in (bytes(m.MEDIA_OVERHEAD - 1),
                 struct.pack("!IBBQQ", 0, 1, 0x02, 0, 0) + b"payload"):
        relay = open_relay(w, ok.ticket)
        relay.send_raw(encode_frame(m.MEDIA, body))
        w.flush()
        relay.messages.pop(0)
        assert_fatal(relay, ErrorCode.MALFORMED)
    assert w.core.encoders["cam2"].frames_in == 0
    # Media from a viewer's relay connection is not accepted either.
    viewer, vok = login_viewer(w)
    vrelay = open_relay(w, vok.ticket)
    vrelay.send(m.Media(0, 1, 1, 0, 0, b"frame"))
    w.flush()
    vrelay.messages.pop(0)
    assert_fatal(vrelay, ErrorCode.UNEXPECTED_MESSAGE)
    assert not viewer.closed
    control.close()
    viewer.close()
    w.assert_idle()


# --------------------------------------------------------------------------
# Viewer requests


def test_other_domain_encoder_is_not_found_like_a_missing_one(
        make_world: Callable[..., World]) -> None:
    w = make_world()
    viewer, _ = login_viewer(w, "alice")
    answers = {}

    def refusal(encoder_id: str, request_id: int) -> tuple[int, int, int, str]:
        channels = dict(w.core.channels)
        viewer.send(m.Watch(request_id, encoder_id))
        w.flush()
        e = assert_refused(viewer, request_id, ErrorCode.NOT_FOUND)
        assert w.core.channels == channels
        return e.code, e.fatal, e.request_id, e.message.replace(repr(encoder_id), "<id>")

    answers["offline other"] = refusal("cam9", 11)
    answers["missing"] = refusal("cam8", 11)
    south, _ = auth_encoder(w, "cam9")  # online now: still invisible
    answers["online other"] = refusal("cam9", 11)
    assert len(set(answers.values())) == 1, answers
    assert w.core.channels.keys() == {"cam9"}
    # The connection is kept: a valid request still works.
    viewer.send(m.Watch(12, "cam1"))
    w.flush()
    assert isinstance(viewer.messages[-1], m.WatchOk)
    viewer.close()
    south.close()
    w.assert_idle()


def test_unwatch_of_an_unknown_stream(make_world: Callable[..., World]) -> None:
    w = make_world()
    alice, _ = login_viewer(w, "alice")
    bob, _ = login_viewer(w, "bob")
    alice.send(m.Watch(1, "cam1"))
    w.flush()
    stream_id = alice.messages[-1].stream_id
    for request_id, sid in ((2, stream_id + 1), (3, 0), (4, 0xFFFFFFFF)):
        alice.send(m.Unwatch(request_id, sid))
        w.flush()
        assert_refused(alice, request_id, ErrorCode.NOT_FOUND)
    bob.send(m.Unwatch(5, stream_id))  # alice's stream, not bob's
    w.flush()
    assert_refused(bob, 5, ErrorCode.NOT_FOUND)
    alice.send(m.Unwatch(6, stream_id))
    w.flush()
    assert alice.messages[-1] == m.UnwatchOk(6, stream_id)
    alice.send(m.Unwatch(7, stream_id))  # twice
    w.flush()
    assert_refused(alice, 7, ErrorCode.NOT_FOUND)
    assert w.core.channels == {}
    alice.close()
    bob.close()
    w.assert_idle()


BIG = {
    "big": {"accounts": {"dora": "dora-pw"},
            "encoders": [f"e{i:02d}" for i in range(66)]},
}


def _watch_up_to_the_limit(w: World) -> RawClient:
    c = w.connect(VIEWER_PORT, answer_pings=True)
    c.send_preamble(ProtocolName.VIEWER)
    c.send(m.Login("dora", "dora-pw", "raw/1"))
    c.send(*(m.Watch(i, f"e{i:02d}") for i in range(w.limits.max_watches)))
    w.flush()
    assert len(c.of_type(m.WatchOk)) == w.limits.max_watches == 64
    return c


def test_watch_limit(make_world: Callable[..., World]) -> None:
    w = make_world(domains=BIG)
    c = _watch_up_to_the_limit(w)
    c.send(m.Watch(100, "e64"))
    w.flush()
    assert_refused(c, 100, ErrorCode.LIMIT_EXCEEDED)
    c.send(m.Watch(101, "e00"))  # already watched: a duplicate, not a limit
    w.flush()
    assert_refused(c, 101, ErrorCode.DUPLICATE)
    c.send(m.Unwatch(102, c.of_type(m.WatchOk)[0].stream_id))
    c.send(m.Watch(103, "e64"))  # room again
    w.flush()
    assert isinstance(c.messages[-1], m.WatchOk)
    c.close()
    w.assert_idle()


def test_watch_over_the_limit_leaves_no_channel(make_world: Callable[..., World]) -> None:
    w = make_world(domains=BIG)
    c = _watch_up_to_the_limit(w)
    c.send(m.Watch(100, "e64"), m.Watch(101, "e65"))
    w.flush()
    assert len(w.core.channels) == 64, sorted(set(w.core.channels) - {
        f"e{i:02d}" for i in range(64)})
    c.close()
    w.assert_idle()


# --------------------------------------------------------------------------
# A viewer that never reads


def _stream(w: World, fps: int = 50) -> Any:
    enc = w.server.encoder("cam1", w.secrets["cam1"],
                           SyntheticSource(2_000_000, fps, keyframe_interval=25))
    enc.start()
    w.flush()
    assert enc.control is not None
    return enc


def _good_viewer(w: World) -> tuple[Any, list[m.Media]]:
    frames: list[m.Media] = []
    viewer = w.server.viewer("alice", "alice-pw", on_media=lambda _e, media: frames.append(media))
    viewer.start()
    w.flush()
    viewer.watch("cam1")
    return viewer, frames


def _assert_every_frame(frames: list[m.Media], interval_us: int = 20_000) -> None:
    ts = [f.timestamp_us for f in frames]
    gaps = [(i, b - a) for i, (a, b) in enumerate(itertools.pairwise(ts))
            if b - a != interval_us]
    assert not gaps, gaps[:5]
    assert frames[0].keyframe


def _stop_all(w: World, *clients: Any) -> None:
    for client in clients:
        client.stop()
    w.advance(w.limits.stop_linger + 1.0, step=0.1)


@pytest.mark.parametrize("pings", [False, True], ids=["silent", "pinging"])
def test_viewer_that_never_reads(make_world: Callable[..., World], pings: bool) -> None:
    """Its queue stays bounded; the server drops it; the other viewer gets every frame."""
    limits = Limits(viewer_queue_bytes=128 * 1024, stall_timeout=6.0)
    w = make_world(limits=limits)
    enc = _stream(w)
    good, frames = _good_viewer(w)
    control, ok = login_viewer(w, "bob")
    control.send(m.Watch(1, "cam1"))
    relay = open_relay(w, ok.ticket)
    w.advance(0.5)
    assert isinstance(control.messages[-1], m.WatchOk)
    received_before = len(relay.messages)
    assert received_before > 10  # it was getting video
    srv = server_side(relay)
    failures: list[ErrorCode] = []
    original_fail = srv.fail

    def spy_fail(code: ErrorCode, message: str) -> None:
        failures.append(code)
        original_fail(code, message)

    srv.fail = spy_fail
    srv_transport = relay.mem.other
    assert srv_transport is not None
    feed = srv.feed
    assert feed is not None
    relay.mem.reader_stalled = True
    largest = max(len(m.encode(f)) for f in frames)
    peak_queue = peak_buffer = 0
    dropped_at = None
    for step in range(1500):
        if pings and step % 50 == 0 and not relay.closed:
            relay.send(m.Ping(step))  # alive, just not reading
        w.advance(0.01)
        peak_queue = max(peak_queue, feed.queued_bytes)
        peak_buffer = max(peak_buffer, srv_transport.outbytes)
        if relay.closed:
            dropped_at = step * 0.01
            break
    assert dropped_at is not None, "the server never dropped the viewer that does not read"
    assert len(relay.messages) == received_before  # it really read nothing
    assert peak_queue <= limits.viewer_queue_bytes
    assert peak_buffer <= HIGH_WATER + largest + 1024
    if pings:
        assert failures == [ErrorCode.STALLED]
        assert limits.stall_timeout <= dropped_at <= limits.stall_timeout + 1.0
        assert feed.queue_drops >= 1
    else:
        assert failures == [ErrorCode.KEEPALIVE_TIMEOUT]
        # the relay port keeps alive at a third of the control rate
        assert dropped_at <= relay_settings(w.settings).keepalive_timeout + 1.0
    assert feed.closed and feed.queued_bytes == 0
    bob = next(v for v in w.core.viewers if v.account == "bob")
    assert bob.feed is None and bob.relay is None
    # The other viewer was not disturbed, before, during or after.
    n = len(frames)
    w.advance(1.0)
    assert len(frames) >= n + 45
    assert len(frames) >= 50 * (0.5 + dropped_at + 1.0) - 10
    _assert_every_frame(frames)
    assert not control.closed  # only the relay was dropped
    control.close()
    _stop_all(w, good, enc)
    w.assert_idle()


# --------------------------------------------------------------------------
# Other sessions are not disturbed


ATTACKS = st.one_of(
    with_port(lambda _p: st.binary(max_size=80)),
    with_port(lambda p: st.tuples(preambles(p), FRAME_STREAMS | st.binary(max_size=60))
              .map(b"".join)),
    st.tuples(st.sampled_from(["viewer-bob", "encoder-cam2", "relay-cam2"]), FRAME_STREAMS),
)


def test_others_not_disturbed_by_an_attacker(make_world: Callable[..., World]) -> None:
    w = make_world()
    enc = _stream(w)
    good, frames = _good_viewer(w)
    w.advance(0.5)
    assert len(frames) >= 20
    legit_timers = len(w.clock.getDelayedCalls())

    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    @given(attack=ATTACKS, watch_first=st.booleans())
    def run(attack: tuple[Any, bytes], watch_first: bool) -> None:
        where, data = attack
        before = len(frames)
        extra: list[RawClient] = []
        if isinstance(where, int):
            target, port, skip = w.connect(where), where, 0
            codes = PRE_AUTH_CODES
            allowed: tuple[type, ...] = ()
        else:
            codes = POST_AUTH_CODES
            allowed = (m.Pong, m.EncoderList, m.WatchOk, m.UnwatchOk, m.EncoderUpdate,
                       m.RelayOk)
            if where == "viewer-bob":
                target, _ = login_viewer(w, "bob")
                port = VIEWER_PORT
                if watch_first:  # a viewer of the same stream that misbehaves
                    target.send(m.Watch(1, "cam1"))
                    w.flush()
            else:
                control, ok = auth_encoder(w, "cam2")
                extra.append(control)
                if where == "relay-cam2":
                    target, port = open_relay(w, ok.ticket), RELAY_PORT
                else:
                    target, port = control, ENCODER_PORT
            skip = len(target.messages)
        target.send_raw(data)
        w.advance(0.1)
        check_garbage_outcome(target, port, codes, allowed, skip,
                              data if skip else b"")
        for c in (target, *extra):
            c.close()
        w.advance(0.06)
        # The stream flowed all along, every frame in order.
        assert len(frames) >= before + 7
        assert enc.control is not None and good.control is not None
        assert enc.connects == 1 and good.connects <= 1
        assert w.core.stats() == {"encoders": 1, "streaming": 1, "viewers": 1, "channels": 1}
        assert len(w.core._tickets) == 2
        assert len(w.clock.getDelayedCalls()) <= legit_timers + 1
        w.check_logs()

    run()
    _assert_every_frame(frames)
    assert all(f.stream_id == frames[0].stream_id for f in frames)
    _stop_all(w, good, enc)
    w.assert_idle()


# --------------------------------------------------------------------------
# Ping and Pong


@pytest.mark.parametrize("where", ["encoder", "viewer", "relay"])
def test_ping_flood_is_answered_without_growth(make_world: Callable[..., World],
                                               where: str) -> None:
    w = make_world()
    control, ok = auth_encoder(w) if where != "viewer" else login_viewer(w)
    target = open_relay(w, ok.ticket) if where == "relay" else control
    target.take()
    srv = server_side(target)
    srv_transport = target.mem.other
    assert srv_transport is not None

    def server_state() -> tuple[Any, ...]:
        return (w.core.stats(), len(w.core._tickets), len(w.clock.getDelayedCalls()),
                srv.decoder.buffered, len(srv._pending), srv_transport.outbytes,
                sum(len(f.connections) for f in w.server.factories.values()))

    baseline = server_state()
    tracemalloc.start()
    try:
        first = None
        for batch in range(20):
            nonces = [(batch * 500 + i) * 0x9E3779B97F4A7C15 % 2**64 for i in range(500)]
            target.send(*(m.Ping(n) for n in nonces))
            w.flush()
            got = target.take()
            assert got == [m.Pong(n) for n in nonces]
            assert server_state() == baseline
            if batch == 1:
                gc.collect()
                first = tracemalloc.get_traced_memory()[0]
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - (first or 0)
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, growth  # 9,000 more Pings retained nothing
    assert not target.closed and not control.closed
    control.close()
    target.close()
    w.assert_idle()


@pytest.mark.parametrize("where", ["encoder", "viewer", "encoder-relay"])
def test_pings_from_a_client_that_never_reads(make_world: Callable[..., World],
                                              where: str) -> None:
    w = make_world()
    control, ok = auth_encoder(w) if where != "viewer" else login_viewer(w)
    target = open_relay(w, ok.ticket) if where == "encoder-relay" else control
    srv_transport = target.mem.other
    assert srv_transport is not None
    target.mem.reader_stalled = True
    peak = 0
    for batch in range(30):
        target.send(*(m.Ping(batch * 1000 + i) for i in range(1000)))
        w.advance(0.1)
        peak = max(peak, srv_transport.outbytes)
    # 30,000 Pongs are 390,000 bytes: the server must stop reading (or drop the
    # client) long before that, as it does for a viewer's relay connection.
    assert peak <= HIGH_WATER + 64 * 1024 or srv_transport.disconnected, peak
    target.mem.reader_stalled = False
    control.close()
    target.close()
    w.assert_idle()

