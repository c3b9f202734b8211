"""Client side: encoder and viewer clients used by the tools, the tests and the simulator.

Each client keeps the server list it was given and reconnects by itself when
its connection is lost (to the next server of the list, with jitter).  What
a client does is driven by messages and the injected reactor; the protocols
here only move frames.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from evserver import __version__
from evserver.net.connection import WireConnection
from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode, ProtocolName

log = Logger()

SOFTWARE = f"evserver-client/{__version__}"
CLIENT_MAX_FRAME = 8 * 1024 * 1024
_MEDIA_PREFIX = struct.Struct("!IBI")


class RedirectedTo(Exception):
    """A Watch was answered with a Redirect: the encoder is hosted by ``server``."""

    def __init__(self, encoder_id: str, server: m.ServerInfo) -> None:
        super().__init__(f"{encoder_id!r} is hosted by {server.server_id}")
        self.encoder_id = encoder_id
        self.server = server


class ClientError(Exception):
    """The server refused us (bad credentials, wrong protocol, ...) or cannot be reached."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep:
            return cls(text, default_port)
        try:
            return cls(host.strip("[]"), int(port))
        except ValueError:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT") from None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class TLSConfig:
    """How a client connects: TLS verified against ``ca`` (a PEM file), or plain TCP."""

    enabled: bool = True
    ca: str | None = None
    insecure: bool = False

    def endpoint(self, reactor: Any, address: Address, timeout: float) -> Any:
        ep = endpoints.HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
        if not self.enabled:
            return ep
        from evserver.tls import client_tls_options

        return endpoints.wrapClientTLS(
            client_tls_options(address.host, self.ca, self.insecure), ep
        )


class _ClientConnection(WireConnection):
    """A client connection bound to an owner object that receives its events."""

    is_server = False

    def __init__(self, owner: Any, clock: Any) -> None:
        super().__init__(clock, CLIENT_MAX_FRAME)
        self.owner = owner
        self.refusal: ClientError | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.owner.connected(self)

    def message_received(self, msg: Any) -> None:
        if isinstance(msg, m.Error):
            if msg.fatal:
                # The server closes the connection next; keep why.
                self.refusal = ClientError(msg.message, _code(msg.code))
            else:
                self.owner.message(self, msg)
            return
        if self.handle_common(msg):
            return
        self.owner.message(self, msg)

    def media_received(self, body: bytes) -> None:
        self.owner.media(self, body)

    def fail(self, code: ErrorCode, message: str) -> None:
        if self.refusal is None:
            self.refusal = ClientError(f"protocol error: {message}", code)
        super().fail(code, message)

    def connection_closed(self, reason: Failure) -> None:
        self.owner.disconnected(self, self.refusal or ClientError(reason.getErrorMessage()))


def _code(value: int) -> ErrorCode | None:
    try:
        return ErrorCode(value)
    except ValueError:
        return None


class EncoderControlConnection(_ClientConnection):
    protocol_name = ProtocolName.ENCODER


class ViewerControlConnection(_ClientConnection):
    protocol_name = ProtocolName.VIEWER


class RelayConnection(_ClientConnection):
    protocol_name = ProtocolName.RELAY


class _Factory(Factory):
    def __init__(self, build: Callable[[], WireConnection]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> WireConnection:
        return self._build()


#: Errors after which retrying the same credentials is pointless.
#: SUPERSEDED: another instance registered the same encoder id; two devices
#: with one id must not take the registration from each other forever.
FINAL_ERRORS = {ErrorCode.AUTH_FAILED, ErrorCode.WRONG_PROTOCOL, ErrorCode.VERSION_TOO_OLD,
                ErrorCode.BAD_PREAMBLE, ErrorCode.SUPERSEDED}


class _ReconnectingClient:
    """Server list, connection attempts with jittered back-off, first-login Deferred."""

    control_class: type[_ClientConnection]
    default_port: int

    def __init__(self, reactor: Any, servers: list[Address], tls: TLSConfig,
                 connect_timeout: float = 2.0, retry_min: float = 0.05,
                 retry_max: float = 2.0, rng: random.Random | None = None,
                 connector: Callable[[Address], Any] | None = None) -> None:
        if not servers:
            raise ValueError("need at least one server address")
        self.reactor = reactor
        self.servers = list(servers)
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.rng = rng or random.Random()
        #: Makes the client endpoint for an address (tests pass an in-memory one).
        self.connector = connector or (
            lambda address: tls.endpoint(reactor, address, connect_timeout))
        self.control: _ClientConnection | None = None
        self.relay: RelayConnection | None = None
        self.server_id = ""
        self.ticket = b""
        self.stopped = True
        self.ready: Deferred[Any] = Deferred()
        self._first_done = False
        self._attempt = 0
        self._server_index = 0
        self._retry_call: IDelayedCall | None = None
        self._relay_address: Address | None = None
        self.last_error: ClientError | None = None
        self.connects = 0
        #: Called each time a session is ready (after every (re)connection).
        self.on_session: Callable[[], None] | None = None
        #: The cluster's servers as last told by the server, by id.
        self.server_infos: dict[str, m.ServerInfo] = {}

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Deferred[Any]:
        """Connect; the Deferred fires once authenticated, or fails on a final error."""
        self.stopped = False
        self._connect()
        return self.ready

    def stop(self) -> None:
        self.stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        for conn in (self.relay, self.control):
            if conn is not None and conn.connected:
                conn.close()

    def _connect(self) -> None:
        self._retry_call = None
        if self.stopped:
            return
        address = self.servers[self._server_index % len(self.servers)]
        d = self.connector(address).connect(
            _Factory(lambda: self.control_class(self, self.reactor)))
        d.addErrback(self._connect_failed, address)

    def _connect_failed(self, failure: Failure, address: Address) -> None:
        self._lost(ClientError(f"cannot reach {address}: {failure.getErrorMessage()}"))

    def _lost(self, error: ClientError) -> None:
        self.last_error = error
        self.control = None
        if self.relay is not None and self.relay.connected:
            self.relay.close()
        self.relay = None
        self.on_lost(error)
        if self.stopped:
            return
        if error.code in FINAL_ERRORS:
            self._give_up(error)
            return
        self._attempt += 1
        if not self._first_done and self._attempt >= 3 * len(self.servers):
            self._give_up(error)
            return
        self._server_index += 1
        delay = min(self.retry_max, self.retry_min * (2 ** min(self._attempt - 1, 8)))
        delay *= 0.5 + self.rng.random()
        self._retry_call = self.reactor.callLater(delay, self._connect)

    def _give_up(self, error: ClientError) -> None:
        self.stopped = True
        if not self._first_done:
            self._first_done = True
            self.ready.errback(error)
        else:
            self.on_final_error(error)

    def _authenticated(self, conn: _ClientConnection, ticket: bytes, keepalive_ms: int,
                       server_id: str, servers: tuple[m.ServerInfo, ...]) -> None:
        self._attempt = 0
        self.connects += 1
        self.ticket = ticket
        self.server_id = server_id
        interval = keepalive_ms / 1000
        conn.start_keepalive(interval, 3 * interval)
        self._set_servers(servers)
        own = next((s for s in servers if s.server_id == server_id), None)
        host = own.host if own is not None else self.servers[0].host
        self._relay_address = Address(host, own.relay_port) if own else None
        self._open_relay()

    def _set_servers(self, servers: tuple[m.ServerInfo, ...]) -> None:
        self.server_infos = {s.server_id: s for s in servers}
        addresses = [Address(s.host, self.port_of(s)) for s in servers]
        if addresses:
            current = self.servers[self._server_index % len(self.servers)]
            self.servers = addresses
            self._server_index = addresses.index(current) if current in addresses else 0

    def _open_relay(self) -> None:
        if self._relay_address is None or self.stopped:
            return
        d = self.connector(self._relay_address).connect(
            _Factory(lambda: RelayConnection(self, self.reactor)))
        d.addErrback(self._relay_failed)

    def _relay_failed(self, failure: Failure) -> None:
        if self.control is not None:
            self.control.fail(ErrorCode.INTERNAL, "cannot open the relay connection")

    # -- connection events -----------------------------------------------

    def connected(self, conn: _ClientConnection) -> None:
        if isinstance(conn, RelayConnection):
            conn.send(m.RelayHello(self.ticket))
        else:
            self.control = conn
            self.hello(conn)

    def message(self, conn: _ClientConnection, msg: Any) -> None:
        if isinstance(conn, RelayConnection):
            if isinstance(msg, m.RelayOk):
                self.relay = conn
                # Slower than the control connection, which notices a dead server.
                interval = 3 * self.keepalive_interval()
                conn.start_keepalive(interval, 3 * interval)
                self._relay_ready()
            return
        if isinstance(msg, m.ServerList):
            self._set_servers(msg.servers)
            return
        self.control_message(msg)

    def keepalive_interval(self) -> float:
        ka = self.control.keepalive if self.control is not None else None
        return ka.interval if ka is not None else 1.0

    def disconnected(self, conn: _ClientConnection, error: ClientError) -> None:
        if isinstance(conn, RelayConnection):
            if self.relay is conn:
                self.relay = None
            # The relay is part of the session: start over on the control side.
            if self.control is not None and self.control.connected:
                self.control.close()
            return
        if conn is self.control or self.control is None:
            self._lost(error)

    def first_ready(self, value: Any) -> None:
        if not self._first_done:
            self._first_done = True
            self.ready.callback(value)
        if self.on_session is not None:
            self.on_session()

    # -- for subclasses --------------------------------------------------

    def port_of(self, info: m.ServerInfo) -> int:
        raise NotImplementedError

    def hello(self, conn: _ClientConnection) -> None:
        raise NotImplementedError

    def control_message(self, msg: Any) -> None:
        raise NotImplementedError

    def media(self, conn: _ClientConnection, body: bytes) -> None:
        pass

    def _relay_ready(self) -> None:
        pass

    def on_lost(self, error: ClientError) -> None:
        pass

    def on_final_error(self, error: ClientError) -> None:
        log.error("giving up: {error}", error=error)


# --------------------------------------------------------------------------
# Encoder


class EncoderClient(_ReconnectingClient):
    """An encoder: streams samples from ``source`` while the server asks for them.

    ``source`` yields ``evserver.media.Sample``-like objects (``keyframe``,
    ``codec``, ``data``) and has an ``fps``.  Samples are paced on the reactor.
    After StartStream or KeyframeRequest the encoder skips ahead to the
    source's next keyframe, so a viewer starts at once.
    """

    control_class = EncoderControlConnection
    MAX_SKIP = 1000

    def __init__(self, reactor: Any, servers: list[Address], encoder_id: str, secret: str,
                 source: Any, tls: TLSConfig, **kwargs: Any) -> None:
        super().__init__(reactor, servers, tls, **kwargs)
        self.encoder_id = encoder_id
        self.secret = secret
        self.source = source
        self._samples: Iterator[Any] = iter(source)
        self.interval = 1.0 / float(getattr(source, "fps", 25.0))
        self.streaming = False
        self._need_keyframe = True
        self._tick_call: IDelayedCall | None = None
        self._next_due = 0.0
        self._t0: float | None = None
        self.frames_sent = 0
        self.bytes_sent = 0
        self.starts = 0

    def port_of(self, info: m.ServerInfo) -> int:
        return info.encoder_port

    def hello(self, conn: _ClientConnection) -> None:
        conn.send(m.EncoderAuth(self.encoder_id, self.secret, SOFTWARE))

    def control_message(self, msg: Any) -> None:
        assert self.control is not None
        if isinstance(msg, m.EncoderAuthOk):
            self._authenticated(self.control, msg.ticket, msg.keepalive_ms, msg.server_id,
                                msg.servers)
        elif isinstance(msg, m.StartStream):
            self.starts += 1
            self.streaming = True
            self._need_keyframe = True
            self._schedule(now=True)
        elif isinstance(msg, m.StopStream):
            self._halt()
        elif isinstance(msg, m.KeyframeRequest):
            self._need_keyframe = True

    def _relay_ready(self) -> None:
        self.first_ready(self)
        if self.streaming:
            self._schedule(now=True)

    def on_lost(self, error: ClientError) -> None:
        self._halt()

    def _halt(self) -> None:
        self.streaming = False
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None

    def _schedule(self, now: bool = False) -> None:
        if self._tick_call is not None and self._tick_call.active():
            if not now:
                return
            self._tick_call.cancel()
        if now:
            self._next_due = self.reactor.seconds()
        if self._t0 is None:
            self._t0 = self._next_due
        delay = max(0.0, self._next_due - self.reactor.seconds())
        self._tick_call = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._tick_call = None
        if not self.streaming or self.relay is None:
            return
        sample = self._next_sample()
        if sample is None:
            self._halt()
            return
        now_us = int(time.time() * 1e6)
        flags = m.FLAG_KEYFRAME if sample.keyframe else 0
        ts = round((self._next_due - (self._t0 or 0.0)) * 1e6)
        header = m.encode_media_header(0, int(sample.codec), flags, ts, now_us,
                                       len(sample.data))
        self.relay.write_frame(header + sample.data)
        self.frames_sent += 1
        self.bytes_sent += len(sample.data)
        self._next_due += self.interval
        # Never try to catch up a backlog after a stall: at most one frame late.
        self._next_due = max(self._next_due, self.reactor.seconds() - self.interval)
        self._schedule()

    def _next_sample(self) -> Any:
        try:
            sample = next(self._samples)
            if self._need_keyframe:
                skipped = 0
                while not sample.keyframe and skipped < self.MAX_SKIP:
                    sample = next(self._samples)
                    skipped += 1
                self._need_keyframe = not sample.keyframe
            return sample
        except StopIteration:
            return None


# --------------------------------------------------------------------------
# Viewer


@attrs.define
class Watched:
    encoder_id: str
    stream_id: int = 0
    frames: int = 0
    bytes: int = 0


class ViewerClient(_ReconnectingClient):
    """A viewer: logs in, lists encoders, watches several at once, receives frames.

    ``on_media(encoder_id, media)`` is called for each frame; ``on_update(info)``
    for each EncoderUpdate.  Watches are re-made after a reconnection.
    """

    control_class = ViewerControlConnection

    def __init__(self, reactor: Any, servers: list[Address], account: str, password: str,
                 tls: TLSConfig, on_media: Callable[[str, m.Media], None] | None = None,
                 on_update: Callable[[m.EncoderInfo], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(reactor, servers, tls, **kwargs)
        self.account = account
        self.password = password
        self.domain = ""
        self.on_media = on_media
        self.on_update = on_update
        self.watched: dict[str, Watched] = {}
        self._by_stream: dict[int, Watched] = {}
        self._requests: dict[int, Deferred[Any]] = {}
        self._next_request = 1
        self._subscribed = False

    def port_of(self, info: m.ServerInfo) -> int:
        return info.viewer_port

    def hello(self, conn: _ClientConnection) -> None:
        conn.send(m.Login(self.account, self.password, SOFTWARE))

    def _request(self, make: Callable[[int], Any]) -> Deferred[Any]:
        if self.control is None or self.relay is None:
            return defer.fail(ClientError("not connected"))
        request_id = self._next_request
        self._next_request = request_id % 0xFFFFFFFF + 1
        d: Deferred[Any] = Deferred()
        self._requests[request_id] = d
        self.control.send(make(request_id))
        return d

    def list_encoders(self) -> Deferred[tuple[m.EncoderInfo, ...]]:
        """The domain's encoders; also subscribes to their updates (kept across reconnections)."""
        self._subscribed = True
        d = self._request(m.ListEncoders)
        d.addCallback(lambda reply: reply.encoders)
        return d

    def watch(self, encoder_id: str) -> Deferred[Watched]:
        """Watch an encoder; it stays watched across reconnections until unwatched."""
        watched = self.watched.setdefault(encoder_id, Watched(encoder_id))
        d = self._request(lambda rid: m.Watch(rid, encoder_id))
        d.addCallback(self._watching, watched)
        d.addErrback(self._watch_failed, encoder_id)
        return d

    def _watching(self, reply: m.WatchOk | m.Redirect, watched: Watched) -> Watched:
        if isinstance(reply, m.Redirect):
            self.watched.pop(watched.encoder_id, None)
            raise RedirectedTo(reply.encoder_id, reply.server)
        watched.stream_id = reply.stream_id
        self._by_stream[reply.stream_id] = watched
        return watched

    def _watch_failed(self, failure: Failure, encoder_id: str) -> Failure:
        error = failure.value
        if isinstance(error, ClientError) and error.code in (
            ErrorCode.NOT_FOUND, ErrorCode.LIMIT_EXCEEDED
        ):
            self.watched.pop(encoder_id, None)
        return failure

    def unwatch(self, encoder_id: str) -> Deferred[Any]:
        watched = self.watched.pop(encoder_id, None)
        if watched is None or not watched.stream_id:
            return defer.succeed(None)
        self._by_stream.pop(watched.stream_id, None)
        return self._request(lambda rid: m.Unwatch(rid, watched.stream_id))

    def control_message(self, msg: Any) -> None:
        assert self.control is not None
        if isinstance(msg, m.LoginOk):
            self.domain = msg.domain
            self._authenticated(self.control, msg.ticket, msg.keepalive_ms, msg.server_id,
                                msg.servers)
        elif isinstance(msg, m.EncoderUpdate):
            if self.on_update is not None:
                self.on_update(msg.encoder)
        elif isinstance(msg, m.Error):
            d = self._requests.pop(msg.request_id, None)
            if d is not None:
                d.errback(ClientError(msg.message, _code(msg.code)))
        else:
            request_id = getattr(msg, "request_id", None)
            d = self._requests.pop(request_id, None) if request_id is not None else None
            if d is not None:
                d.callback(msg)

    def _relay_ready(self) -> None:
        # After a reconnection: subscribe again (the new session's list comes
        # as updates) and re-watch; stream ids are per server.
        if self._subscribed and self.connects > 1:
            relist = self.list_encoders()
            relist.addCallbacks(self._relisted, self._rewatch_failed, errbackArgs=("(list)",))
        self._by_stream.clear()
        for encoder_id, watched in list(self.watched.items()):
            watched.stream_id = 0
            self.watch(encoder_id).addErrback(self._rewatch_failed, encoder_id)
        self.first_ready(self)

    def _relisted(self, infos: tuple[m.EncoderInfo, ...]) -> None:
        if self.on_update is not None:
            for info in infos:
                self.on_update(info)

    def _rewatch_failed(self, failure: Failure, encoder_id: str) -> None:
        log.warn("cannot watch {e} again: {f}", e=encoder_id, f=failure.getErrorMessage())

    def on_lost(self, error: ClientError) -> None:
        requests, self._requests = self._requests, {}
        for d in requests.values():
            d.errback(ClientError(f"connection lost: {error}", error.code))

    def media(self, conn: _ClientConnection, body: bytes) -> None:
        media = m.decode_media(body)
        watched = self._by_stream.get(media.stream_id)
        if watched is None:
            return  # a frame of a stream just unwatched
        watched.frames += 1
        watched.bytes += len(media.payload)
        if self.on_media is not None:
            self.on_media(watched.encoder_id, media)


# --------------------------------------------------------------------------
# A viewer of a whole cluster


class ClusterViewer:
    """A viewer that follows its encoders across the servers of a cluster.

    A *home* session (to any server; it moves to another on failure) lists
    the domain's encoders and receives their updates, which name the server
    hosting each.  Each watched encoder is watched on its hosting server,
    through one session per server, opened when first needed and kept.
    When an update says an encoder moved (a failover, a rebalance), the
    watch moves with it; no action of the user is needed.
    """

    MAX_REDIRECTS = 3

    def __init__(self, reactor: Any, servers: list[Address], account: str, password: str,
                 tls: TLSConfig, on_media: Callable[[str, m.Media], None] | None = None,
                 on_update: Callable[[m.EncoderInfo], None] | None = None,
                 **client_kwargs: Any) -> None:
        self.reactor = reactor
        self.account = account
        self.password = password
        self.tls = tls
        self.on_media = on_media
        self.on_update = on_update
        self.client_kwargs = client_kwargs
        self.home = ViewerClient(reactor, servers, account, password, tls,
                                 on_media=self._media, on_update=self._update, **client_kwargs)
        self.home.on_session = self._home_ready
        #: Sessions to hosting servers, by server id (the home's server among them).
        self.sessions: dict[str, ViewerClient] = {}
        self.infos: dict[str, m.EncoderInfo] = {}
        self.wanted: set[str] = set()
        #: encoder id -> the server id where it is watched now
        self.placed: dict[str, str] = {}
        self._placing: set[str] = set()
        self.moves = 0

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Deferred[Any]:
        return self.home.start()

    def stop(self) -> None:
        self.home.stop()
        for session in self.sessions.values():
            if session is not self.home:
                session.stop()

    # -- watching --------------------------------------------------------

    def watch(self, encoder_id: str) -> None:
        """Watch ``encoder_id`` wherever it is, now and after it moves."""
        self.wanted.add(encoder_id)
        self._place(encoder_id)

    def unwatch(self, encoder_id: str) -> None:
        self.wanted.discard(encoder_id)
        server_id = self.placed.pop(encoder_id, None)
        session = self.sessions.get(server_id) if server_id else None
        if session is not None:
            session.unwatch(encoder_id).addErrback(lambda _: None)

    def _home_ready(self) -> None:
        self.sessions = {sid: s for sid, s in self.sessions.items() if s is not self.home}
        self.sessions.setdefault(self.home.server_id, self.home)
        # Every (re)connection of the home: learn the encoders and where they are.
        self.home.list_encoders().addCallbacks(self._listed, lambda _: None)

    def _listed(self, infos: tuple[m.EncoderInfo, ...]) -> None:
        for info in infos:
            self._update(info)
        for encoder_id in self.wanted:
            self._place(encoder_id)

    def _update(self, info: m.EncoderInfo) -> None:
        self.infos[info.encoder_id] = info
        if self.on_update is not None:
            self.on_update(info)
        if info.encoder_id in self.wanted:
            self._place(info.encoder_id)

    def _place(self, encoder_id: str, target: m.ServerInfo | None = None,
               redirects: int = 0) -> None:
        """Watch ``encoder_id`` on the server that hosts it (or at home while unknown)."""
        if encoder_id not in self.wanted or (encoder_id in self._placing and target is None):
            return
        info = self.infos.get(encoder_id)
        if target is not None:
            server_id = target.server_id
        elif info is not None and info.server_id:
            server_id = info.server_id
        else:
            server_id = self.placed.get(encoder_id) or self.home.server_id
        if not server_id:
            return  # not logged in yet: placed once the home is ready
        if self.placed.get(encoder_id) == server_id:
            session = self.sessions.get(server_id)
            if session is not None and encoder_id in session.watched:
                return
        session = self._session_for(server_id, target)
        if session is None:
            return
        old = self.placed.get(encoder_id)
        if old is not None and old != server_id:
            self.moves += 1
            previous = self.sessions.get(old)
            if previous is not None and previous.control is not None:
                previous.unwatch(encoder_id).addErrback(lambda _: None)
        self.placed[encoder_id] = server_id
        self._placing.add(encoder_id)
        if session.relay is None:
            # Its login is under way: place the encoder when it is ready.
            self._placing.discard(encoder_id)
            return
        d = session.watch(encoder_id)
        d.addCallbacks(self._placed, self._place_failed, errbackArgs=(encoder_id, redirects))

    def _placed(self, watched: Watched) -> None:
        self._placing.discard(watched.encoder_id)

    def _place_failed(self, failure: Failure, encoder_id: str, redirects: int) -> None:
        self._placing.discard(encoder_id)
        error = failure.value
        if isinstance(error, RedirectedTo) and redirects < self.MAX_REDIRECTS:
            self._place(encoder_id, error.server, redirects + 1)
        elif isinstance(error, ClientError) and error.code == ErrorCode.DUPLICATE:
            pass  # already watched there
        else:
            log.info("cannot watch {e} yet: {f}", e=encoder_id, f=failure.getErrorMessage())

    def _session_for(self, server_id: str, target: m.ServerInfo | None) -> ViewerClient | None:
        session = self.sessions.get(server_id)
        if session is not None:
            return session
        info = target or self.home.server_infos.get(server_id)
        if info is None:
            return None
        session = ViewerClient(self.reactor, [Address(info.host, info.viewer_port)],
                               self.account, self.password, self.tls,
                               on_media=self._media, **self.client_kwargs)
        session.on_session = lambda: self._session_ready(server_id)
        self.sessions[server_id] = session
        session.start().addErrback(lambda f: log.info("cannot log in to {s}: {f}",
                                                      s=server_id, f=f.getErrorMessage()))
        return session

    def _session_ready(self, server_id: str) -> None:
        for encoder_id in list(self.wanted):
            if self.placed.get(encoder_id) == server_id or (
                    self.infos.get(encoder_id) is not None
                    and self.infos[encoder_id].server_id == server_id):
                self._place(encoder_id)

    def _media(self, encoder_id: str, media: m.Media) -> None:
        if self.on_media is not None and encoder_id in self.wanted:
            self.on_media(encoder_id, media)
