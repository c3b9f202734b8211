"""Server side of the encoder control, viewer control and video relay protocols.

Thin: each protocol authenticates (through an ``Authenticator``), forwards
requests to the ``RelayCore`` and writes what it answers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evserver.net.connection import WireConnection
from evserver.passwords import verify_password
from evserver.state.fanout import IMediaSink, ViewerFeed
from evserver.state.relay import (
    EncoderSession,
    Redirected,
    Refused,
    RelayCore,
    ViewerSession,
)
from evserver.wire import messages as m
from evserver.wire.framing import ErrorCode, ProtocolName, ProtocolViolation

log = Logger()

_MEDIA_PREFIX = struct.Struct("!IBI")  # length, type, stream_id
_MEDIA_FLAGS_AT = 5  # offset of the flags byte in a media body


@attrs.frozen
class ServerSettings:
    max_control_frame: int = 64 * 1024
    max_media_frame: int = 4 * 1024 * 1024
    keepalive_interval: float = 0.5
    keepalive_timeout: float = 1.5
    auth_timeout: float = 10.0


def relay_settings(settings: ServerSettings) -> ServerSettings:
    """The settings of the relay port: a slower keepalive.

    The control connection tells a dead peer first; the relay connection's
    keepalive only needs to catch a half-dead one.
    """
    return attrs.evolve(settings, keepalive_interval=3 * settings.keepalive_interval,
                        keepalive_timeout=3 * settings.keepalive_timeout)


class Authenticator:
    """Checks credentials against the store; passwords are verified in a thread."""

    def __init__(self, store: Any,
                 defer_to_thread: Callable[..., Deferred[Any]] = threads.deferToThread) -> None:
        self.store = store
        self._defer_to_thread = defer_to_thread

    def encoder(self, encoder_id: str, secret: str) -> Any:
        return self.store.verify_encoder(encoder_id, secret)

    def account(self, name: str, password: str) -> Deferred[Any]:
        account = self.store.get_account(name)
        if account is None:
            # Spend the same effort as for a real account so timing does not
            # tell which names exist.
            d = self._defer_to_thread(verify_password, _DUMMY_HASH, password)
            d.addCallback(lambda _: None)
            return d
        d = self._defer_to_thread(verify_password, account.password_hash, password)
        d.addCallback(lambda ok: account if ok else None)
        return d


def _dummy_hash() -> str:
    from evserver.passwords import hash_password

    return hash_password("evserver-timing-equaliser")


_DUMMY_HASH = _dummy_hash()


def _peer(conn: WireConnection) -> str:
    address: Any = conn.transport.getPeer() if conn.transport is not None else None
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


class _ServerConnection(WireConnection):
    is_server = True

    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory.clock, factory.settings.max_control_frame)
        self.factory = factory
        self._auth_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.add(self)
        self._auth_call = self.clock.callLater(self.factory.settings.auth_timeout,
                                               self._auth_timeout)

    def _auth_timeout(self) -> None:
        self._auth_call = None
        self.fail(ErrorCode.KEEPALIVE_TIMEOUT, "no authentication within the time allowed")

    def authenticated(self) -> None:
        if self._auth_call is not None:
            if self._auth_call.active():
                self._auth_call.cancel()
            self._auth_call = None
        s = self.factory.settings
        self.start_keepalive(s.keepalive_interval, s.keepalive_timeout)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._auth_call is not None and self._auth_call.active():
            self._auth_call.cancel()
        self._auth_call = None
        self.factory.connections.discard(self)
        super().connectionLost(reason)

    @property
    def keepalive_ms(self) -> int:
        return int(self.factory.settings.keepalive_interval * 1000)


class EncoderControl(_ServerConnection):
    protocol_name = ProtocolName.ENCODER

    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory)
        self.session: EncoderSession | None = None

    def message_received(self, msg: Any) -> None:
        if self.session is None:
            if not isinstance(msg, m.EncoderAuth):
                raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                        "the first message must be EncoderAuth")
            record = self.factory.auth.encoder(msg.encoder_id, msg.secret)
            if record is None:
                log.info("encoder authentication failed for {encoder_id!r} from {peer}",
                         encoder_id=msg.encoder_id, peer=_peer(self))
                self.fail(ErrorCode.AUTH_FAILED, "unknown encoder or wrong secret")
                return
            self.authenticated()
            core = self.factory.core
            placement = getattr(core, "placement", None)
            target = (placement(record.encoder_id, record.domain)
                      if placement is not None and not msg.placed_by else None)
            if target is not None:
                log.info("encoder {encoder_id} ({software}) from {peer} placed on {target}",
                         encoder_id=record.encoder_id, software=msg.software,
                         peer=_peer(self), target=target.server_id)
                # The list first: it names this server, for the encoder's placed_by.
                self.send(m.ServerList(core.servers()))
                self.send(m.EncoderRedirect(target, m.RedirectReason.PLACEMENT))
                self.close()
                return
            log.info("encoder {encoder_id} ({software}) connected from {peer}{placed}",
                     encoder_id=record.encoder_id, software=msg.software, peer=_peer(self),
                     placed=f", placed by {msg.placed_by}" if msg.placed_by else "")
            self.session = core.encoder_connected(record.encoder_id, record.name,
                                                  record.domain, self)
            self.send(m.EncoderAuthOk(self.session.ticket, self.keepalive_ms,
                                      core.server_id, core.servers()))
            return
        if self.handle_common(msg):
            return
        raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                f"{type(msg).__name__} is not expected from an encoder")

    def connection_closed(self, reason: Failure) -> None:
        if self.session is not None:
            log.info("encoder {encoder_id} disconnected: {reason}",
                     encoder_id=self.session.encoder_id, reason=reason.getErrorMessage())
            self.factory.core.encoder_disconnected(self.session)
            if self.session.relay is not None:
                self.session.relay.close()


class ViewerControl(_ServerConnection):
    protocol_name = ProtocolName.VIEWER

    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory)
        self.session: ViewerSession | None = None
        self._logging_in = False

    def message_received(self, msg: Any) -> None:
        session = self.session
        if session is None:
            if not isinstance(msg, m.Login) or self._logging_in:
                raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                        "the first message must be Login")
            self._logging_in = True
            self.pause_receiving()
            d = self.factory.auth.account(msg.account, msg.password)
            d.addCallbacks(self._logged_in, self._login_error)
            return
        if self.handle_common(msg):
            return
        try:
            if isinstance(msg, m.ListEncoders):
                self.send(session.list_encoders(msg.request_id))
            elif isinstance(msg, m.Watch):
                self.send(session.watch(msg.request_id, msg.encoder_id))
            elif isinstance(msg, m.Unwatch):
                self.send(session.unwatch(msg.request_id, msg.stream_id))
            else:
                raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                        f"{type(msg).__name__} is not expected from a viewer")
        except Refused as refused:
            self.refuse(getattr(msg, "request_id", 0), refused.code, refused.message)
        except Redirected as redirect:
            self.send(m.Redirect(msg.request_id, redirect.encoder_id, redirect.server))

    def _logged_in(self, account: Any) -> None:
        if not self.connected or self.failed:
            return
        if account is None:
            log.info("viewer login failed from {peer}", peer=_peer(self))
            self.fail(ErrorCode.AUTH_FAILED, "unknown account or wrong password")
            return
        log.info("viewer {account} logged in from {peer}", account=account.name,
                 peer=_peer(self))
        self.authenticated()
        core = self.factory.core
        self.session = core.viewer_connected(account.name, account.domain, self)
        self.send(m.LoginOk(self.session.ticket, self.keepalive_ms, core.server_id,
                            account.domain, core.servers()))
        self.resume_receiving()

    def _login_error(self, failure: Failure) -> None:
        log.failure("login check failed", failure)
        self.fail(ErrorCode.INTERNAL, "internal error while checking the login")

    def connection_closed(self, reason: Failure) -> None:
        if self.session is not None:
            relay = self.session.relay
            self.factory.core.viewer_disconnected(self.session)
            if relay is not None:
                relay.close()


@implementer(IMediaSink)
class Relay(_ServerConnection):
    """A relay connection: media up from an encoder, or down to a viewer."""

    protocol_name = ProtocolName.RELAY

    def __init__(self, factory: ServerFactory) -> None:
        super().__init__(factory)
        self.session: EncoderSession | ViewerSession | None = None
        self.feed: ViewerFeed | None = None

    def message_received(self, msg: Any) -> None:
        if self.session is not None and self.handle_common(msg):
            return
        if self.session is not None or not isinstance(msg, m.RelayHello):
            raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                    f"{type(msg).__name__} is not expected here")
        session = self.factory.core.redeem(msg.ticket)
        if session is None:
            self.fail(ErrorCode.BAD_TICKET, "unknown or expired ticket")
            return
        self.authenticated()
        self.session = session
        if session.relay is not None:
            session.relay.fail(ErrorCode.SUPERSEDED,
                               "another relay connection presented this ticket")
        if isinstance(session, EncoderSession):
            session.relay = self
            self.decoder.max_frame = self.factory.settings.max_media_frame
        else:
            self.feed = session.attach_relay(self, self)
        self.send(m.RelayOk())

    def media_received(self, body: bytes) -> None:
        session = self.session
        if not isinstance(session, EncoderSession):
            raise ProtocolViolation(ErrorCode.UNEXPECTED_MESSAGE,
                                    "media is only accepted from an authenticated encoder")
        if len(body) < m.MEDIA_OVERHEAD:
            raise ProtocolViolation(ErrorCode.MALFORMED, "truncated media header")
        if body[:4] != b"\0\0\0\0":
            raise ProtocolViolation(ErrorCode.PROTOCOL_VIOLATION,
                                    "uplink media must carry stream_id 0")
        flags = body[_MEDIA_FLAGS_AT]
        if flags & ~m.FLAG_KEYFRAME:
            raise ProtocolViolation(ErrorCode.MALFORMED, f"unknown media flags {flags:#x}")
        if session.closed:
            return
        # Re-frame once with this stream's id; every viewer gets these bytes.
        frame = b"".join((
            _MEDIA_PREFIX.pack(len(body) + 1, m.MEDIA, session.stream_id),
            memoryview(body)[4:],
        ))
        session.media(bool(flags & m.FLAG_KEYFRAME), frame)

    # IMediaSink: write is the transport's; the feed calls it per frame.
    def write(self, data: bytes) -> None:
        self.write_frame(data)

    def stalled(self) -> None:
        self.fail(ErrorCode.STALLED, "the viewer did not read its video in time")
        # The peer is not reading: do not wait for the error frame to flush.
        if self.connected:
            self.transport.abortConnection()  # type: ignore[union-attr]

    # The transport's write buffer is full / drained.  A viewer's video
    # queues in its feed (bounded, skipping to keyframes, and dropped after
    # the stall timeout); its Pings are still read, so a slow viewer is not
    # taken for a dead one.
    def write_paused(self) -> None:
        if self.feed is not None:
            self.feed.pause()
        else:
            super().write_paused()

    def write_resumed(self) -> None:
        if self.feed is not None:
            self.feed.resume()
        else:
            super().write_resumed()

    def connection_closed(self, reason: Failure) -> None:
        session = self.session
        if isinstance(session, EncoderSession):
            if session.relay is self:
                session.relay = None
        elif isinstance(session, ViewerSession):
            session.detach_relay(self)
        self.feed = None


class ServerFactory(Factory):
    """One factory per port; all share the core."""

    noisy = False

    def __init__(self, protocol_class: type[_ServerConnection], core: RelayCore,
                 auth: Authenticator, settings: ServerSettings, clock: IReactorTime) -> None:
        self.protocol_class = protocol_class
        self.core = core
        self.auth = auth
        self.settings = settings
        self.clock = clock
        self.connections: set[_ServerConnection] = set()

    def buildProtocol(self, addr: Any) -> _ServerConnection:
        return self.protocol_class(self)
