"""Client side: encoder and viewer clients used by the tools, the tests and the simulator.

Each client keeps every server address it was given or told of and
reconnects by itself when its connection is lost (to another server, with
jitter; to a second one alongside when the first is silent).  What a client
does is driven by messages and the injected reactor; the protocols here only
move frames.
"""

from __future__ import annotations

import collections
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

# How long a client waits for a server, and when it tries another alongside.
#
# The failover budget (design.md) leaves a client 0.5 s to reconnect and
# register once it has noticed the loss of its server; the server it picks
# may itself be silent: frozen (its kernel accepts the TCP connection, the
# process never answers), or behind a cut link (no answer to the SYN).  Such
# a server cannot be told from a slow one by a short deadline without also
# dropping live servers that are busy with a burst of logins after a
# failover.  Measured on loopback with TLS (a 2-core machine: one scrypt
# thread, ~37 ms per check), from the TCP connection to the server's
# preamble / to the end of the login: 1 viewer 11 ms / 82 ms; 30 at once
# 0.10 s / up to 1.45 s; 100 at once 0.19 s (1.24 s at worst) / up to 4.0 s.
# The preamble needs only the TLS handshake, the answer the password check.
# Hence, as "happy eyeballs" (RFC 8305) does for addresses:
#
# - an attempt that has no preamble after HEDGE_DELAY gets company: another
#   attempt to another server starts alongside (at most MAX_ATTEMPTS at
#   once), and the first server to send its preamble wins.  Only the winner
#   is sent the credentials, so the others are closed cleanly, cost the
#   servers no password check, and an encoder never registers twice.  0.5 s
#   is five times the preamble wait measured under a burst of 30 logins,
#   and leaves 0.3 s over the two round trips (TCP, TLS 1.3) of a 100 ms RTT
#   (R14); the few that wait longer in a bigger burst cost a TLS handshake
#   elsewhere, not a password check.
# - when no server the cluster named alive is left to try, the attempts to
#   the others (likely down: the cluster stopped naming them) start together,
#   without the wait.
# - a silent server is still given up after PREAMBLE_DEADLINE (2 s: above
#   the worst preamble measured under a burst of 100), which matters only
#   when no other server is left to try.
# - a server that sent its preamble is alive: it has ANSWER_DEADLINE (10 s,
#   over twice the 4 s measured for a burst of 100 logins) to answer the
#   authentication (and the relay's hello).  Giving up sooner would only
#   move the burst, and its password checks, to another server.
# - CONNECT_TIMEOUT (1 s) bounds the TCP handshake: 10 RTTs of 100 ms, and
#   the time Linux waits before it sends a lost SYN again; the parallel
#   attempt has started long before.

#: Seconds the TCP connection may take (``connect_timeout``'s default).
CONNECT_TIMEOUT = 1.0
#: Seconds without a preamble after which another attempt starts alongside.
HEDGE_DELAY = 0.5
#: At most this many connection attempts at once.
MAX_ATTEMPTS = 3
#: Seconds a server may take to send its preamble (TLS handshake included).
PREAMBLE_DEADLINE = 2.0
#: Seconds a server that sent its preamble may take to answer the authentication.
ANSWER_DEADLINE = 10.0
#: How many server addresses a client remembers (configured and ever named).
MAX_KNOWN_SERVERS = 64
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


@attrs.define(eq=False)
class _Attempt:
    """One connection attempt of a control connection, until the server's preamble."""

    address: Address
    #: What the authentication will say in ``EncoderAuth.placed_by``.
    placed_by: str
    started: float
    conn: _ClientConnection | None = None
    connecting: Deferred[Any] | None = None


class _ClientConnection(WireConnection):
    """A client connection bound to an owner object that receives its events.

    Until the server has sent its preamble, and then until it has answered,
    a deadline runs (the owner's ``preamble_deadline``, then what
    ``expect_answer`` says): a server that never answers is given up.
    """

    is_server = False

    def __init__(self, owner: Any, clock: Any, attempt: _Attempt | None = None) -> None:
        super().__init__(clock, CLIENT_MAX_FRAME)
        self.owner = owner
        self.attempt = attempt
        self.refusal: ClientError | None = None
        self._deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # A frozen server accepts the TCP connection (its kernel does) but
        # never says a word.
        self._arm(self.owner.preamble_deadline, "the server sent no preamble")
        self.owner.connected(self)

    def preamble_received(self) -> None:
        self._cancel_deadline()
        self.owner.preamble(self)

    def expect_answer(self, seconds: float) -> None:
        """The server must answer within ``seconds`` (until ``answered``)."""
        self._arm(seconds, "the server does not answer")

    def answered(self) -> None:
        self._cancel_deadline()

    def _arm(self, seconds: float, why: str) -> None:
        self._cancel_deadline()
        if self.connected:
            self._deadline = self.clock.callLater(seconds, self._no_answer, why)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _no_answer(self, why: str) -> None:
        self._deadline = None
        if self.refusal is None:
            self.refusal = ClientError(why, ErrorCode.KEEPALIVE_TIMEOUT)
        self.fail(ErrorCode.KEEPALIVE_TIMEOUT, why)
        if self.connected:
            self.transport.abortConnection()  # type: ignore[union-attr]

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
        self._cancel_deadline()
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

    def __init__(self, owner: Any, clock: Any, ticket: bytes = b"") -> None:
        super().__init__(owner, clock)
        #: The ticket of the session that opened it: a relay of an earlier
        #: session (closing late, e.g. to a frozen server) must not touch this one.
        self.ticket = ticket


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
    """Known servers, connection attempts (in parallel, with jittered back-off), first login.

    A round of attempts starts at one server; while no server has sent its
    preamble, another attempt starts every ``hedge_delay`` (at most
    ``MAX_ATTEMPTS`` at once, each to a server not tried yet); the first
    server to send its preamble is sent the credentials, the other attempts
    are closed.  When every attempt of a round failed, or a session is
    lost, the next round starts after a jittered back-off.
    """

    control_class: type[_ClientConnection]
    default_port: int

    def __init__(self, reactor: Any, servers: list[Address], tls: TLSConfig,
                 connect_timeout: float = CONNECT_TIMEOUT, retry_min: float = 0.05,
                 retry_max: float = 2.0, rng: random.Random | None = None,
                 connector: Callable[[Address], Any] | None = None,
                 hedge_delay: float = HEDGE_DELAY,
                 preamble_deadline: float = PREAMBLE_DEADLINE,
                 answer_deadline: float = ANSWER_DEADLINE) -> None:
        if not servers:
            raise ValueError("need at least one server address")
        self.reactor = reactor
        #: Every server address known, the ones the cluster names alive first.
        self.servers = list(dict.fromkeys(servers))
        #: The addresses given at start, kept whatever the servers say later.
        self.configured = list(self.servers)
        #: Every address given or ever named, least recently named first ->
        #: whether a session ever worked there (the forgetting order).
        self._known: dict[Address, bool] = dict.fromkeys(self.servers, False)
        #: The addresses of the last server list (the servers the cluster thinks alive).
        self._named: list[Address] = list(self.servers)
        #: Addresses tried since the last session that worked, and the last one.
        self._tried: set[Address] = set()
        self._last_tried: Address | None = None
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.hedge_delay = hedge_delay
        self.preamble_deadline = preamble_deadline
        self.answer_deadline = answer_deadline
        self.rng = rng or random.Random()
        #: Makes the client endpoint for an address (tests pass an in-memory one).
        self.connector = connector or (
            lambda address: tls.endpoint(reactor, address, connect_timeout))
        self.control: _ClientConnection | None = None
        self.relay: RelayConnection | None = None
        #: The server of the current (or last) session.
        self.server_id = ""
        #: The address of the current (or last) control connection.
        self.address: Address | None = None
        #: ``placed_by`` of the current (or last) control connection.
        self.placed_by = ""
        #: The server that last redirected us, until a session logs in: every
        #: attempt meanwhile names it, so that no server redirects us again
        #: (the target may be out of our reach although the cluster sees it).
        self._placement = ""
        #: The server that redirected us, reachable a moment ago: the first to
        #: try alongside (or after) a redirect target that does not answer.
        self._fallback: Address | None = None
        self.ticket = b""
        self.stopped = True
        self.ready: Deferred[Any] = Deferred()
        self._first_done = False
        self._attempt = 0
        self._attempts: list[_Attempt] = []
        self._hedge_call: IDelayedCall | None = None
        self._retry_call: IDelayedCall | None = None
        self._relay_address: Address | None = None
        #: When the current session logged in (None while there is none).
        self._session_started: float | None = None
        self.last_error: ClientError | None = None
        #: Sessions that logged in.
        self.connects = 0
        #: Connection attempts started, and those started alongside another.
        self.attempts = 0
        self.parallel_attempts = 0
        #: Called each time a session is ready (after every (re)connection).
        self.on_session: Callable[[], None] | None = None
        #: The cluster's servers as last told by the server, by id.
        self.server_infos: dict[str, m.ServerInfo] = {}

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Deferred[Any]:
        """Connect; the Deferred fires once authenticated, or fails on a final error."""
        self.stopped = False
        self._start_attempt(self.servers[0])
        return self.ready

    def stop(self) -> None:
        self.stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._drop_attempts()
        for conn in (self.relay, self.control):
            if conn is not None and conn.connected:
                conn.close()

    def _backoff(self) -> float:
        delay = min(self.retry_max, self.retry_min * (2 ** min(self._attempt - 1, 8)))
        return delay * (0.5 + self.rng.random())

    # -- attempts --------------------------------------------------------

    def _next_round(self) -> Address:
        """Where the next round of attempts starts (no server list can come meanwhile)."""
        address = self._pick()
        if address is None:
            # Every server was tried since the last session: again, the last
            # one tried last.
            self._tried.clear()
            address = self._pick(avoid=self._last_tried) or self._pick()
        assert address is not None
        return address

    def _pick(self, avoid: Address | None = None) -> Address | None:
        """A server not tried yet, at random (None if none is left).

        At random, so that a lost server's clients spread over the others
        instead of all landing on the next one in the list.  The servers the
        cluster names as alive come before the others, which it may have
        declared dead (a frozen one among them).  Right after a redirect, the
        redirecting server comes first of all, once: it answered a moment ago,
        and it hosts us as placed when the target is out of our reach.
        """
        busy = {a.address for a in self._attempts}
        fallback, self._fallback = self._fallback, None
        if fallback is not None and fallback not in busy and fallback != avoid:
            return fallback
        untried = [a for a in self.servers
                   if a not in self._tried and a not in busy and a != avoid]
        named = [a for a in untried if a in self._named]
        pool = named or untried
        return self.rng.choice(pool) if pool else None

    def _start_attempt(self, address: Address, placed_by: str = "") -> None:
        self._retry_call = None
        if self.stopped:
            return
        attempt = _Attempt(address, placed_by or self._placement, self.reactor.seconds())
        self._attempts.append(attempt)
        self._tried.add(address)
        self._last_tried = address
        self.attempts += 1
        if len(self._attempts) > 1:
            self.parallel_attempts += 1
        d = self.connector(address).connect(
            _Factory(lambda: self.control_class(self, self.reactor, attempt)))
        attempt.connecting = d
        d.addErrback(self._connect_failed, attempt)
        self._arm_hedge()

    def _arm_hedge(self) -> None:
        self._cancel_hedge()
        if (self._attempts and self.control is None and len(self._attempts) < MAX_ATTEMPTS
                and not self.stopped):
            self._hedge_call = self.reactor.callLater(self._hedge_wait(), self._hedge)

    def _hedge_wait(self) -> float:
        """How long the attempts under way get before another starts alongside.

        ``hedge_delay``, unless every one of them is to a server that the
        cluster's last word did not name alive (the ones it named were tried
        already): such a server is likely down or out of reach, and waiting
        for it only adds to the failover.  Then the next starts at once, up to
        MAX_ATTEMPTS.  Not while redirected: the target must get its chance
        before the redirecting server is tried alongside.
        """
        if not self._placement and all(a.address not in self._named for a in self._attempts):
            return 0.0
        return self.hedge_delay

    def _cancel_hedge(self) -> None:
        if self._hedge_call is not None and self._hedge_call.active():
            self._hedge_call.cancel()
        self._hedge_call = None

    def _hedge(self) -> None:
        """No server has answered yet: try another one alongside."""
        self._hedge_call = None
        if self.stopped or self.control is not None or not self._attempts:
            return
        address = self._pick()
        if address is None:
            return  # nothing else to try: wait for the attempts under way
        log.info("no answer from {silent} yet: trying {address} too",
                 silent=", ".join(str(a.address) for a in self._attempts), address=address)
        self._start_attempt(address)

    def _connect_failed(self, failure: Failure, attempt: _Attempt) -> None:
        if attempt in self._attempts:
            self._attempt_failed(attempt, ClientError(
                f"cannot reach {attempt.address}: {failure.getErrorMessage()}"))

    def _attempt_failed(self, attempt: _Attempt, error: ClientError) -> None:
        self._attempts.remove(attempt)
        self.last_error = error
        if self.stopped:
            return
        if self._attempts and error.code not in FINAL_ERRORS:
            # Others are under way: one more at once, if a server is left.
            self._hedge()
            return
        self._drop_attempts()
        self._lost(error)

    def _drop_attempts(self) -> None:
        """Close the attempts under way (before any of them said who we are)."""
        self._cancel_hedge()
        attempts, self._attempts = self._attempts, []
        for attempt in attempts:
            if attempt.conn is not None:
                attempt.conn.close()
            elif attempt.connecting is not None and not attempt.connecting.called:
                attempt.connecting.cancel()

    def _lost(self, error: ClientError) -> None:
        """The session (or the round of attempts) is over: the next round, after a back-off."""
        self.last_error = error
        if self.control is not None and self.address is not None:
            self._tried.add(self.address)
        self.control = None
        self._end_session_clock()
        # A relay of this session that closes late must not take the next
        # session's control connection for its own.
        self.ticket = b""
        self._drop_attempts()
        relay, self.relay = self.relay, None
        if relay is not None and relay.connected:
            relay.close()
        self.on_lost(error)
        if self.stopped:
            return
        if error.code in FINAL_ERRORS:
            self._give_up(error)
            return
        self._attempt += 1
        if not self._first_done and self._attempt >= 3 * len(self.configured):
            self._give_up(error)
            return
        address = self._next_round()
        self._retry_call = self.reactor.callLater(self._backoff(), self._start_attempt, address)

    def _end_session_clock(self) -> None:
        started, self._session_started = self._session_started, None
        if started is not None:
            self.session_ended(self.reactor.seconds() - started)

    def _give_up(self, error: ClientError) -> None:
        self.stopped = True
        self._drop_attempts()
        if not self._first_done:
            self._first_done = True
            self.ready.errback(error)
        else:
            self.on_final_error(error)

    def _authenticated(self, conn: _ClientConnection, ticket: bytes, keepalive_ms: int,
                       server_id: str, servers: tuple[m.ServerInfo, ...]) -> None:
        conn.answered()
        self._attempt = 0
        self._tried.clear()
        self.connects += 1
        self.ticket = ticket
        self.server_id = server_id
        self._session_started = self.reactor.seconds()
        self._placement = ""
        self._fallback = None
        if self.address is not None:
            self._known[self.address] = True
        interval = keepalive_ms / 1000
        conn.start_keepalive(interval, 3 * interval)
        self._set_servers(servers)
        own = next((s for s in servers if s.server_id == server_id), None)
        self._relay_address = Address(own.host, own.relay_port) if own else None
        self._open_relay()

    # -- known servers -----------------------------------------------------

    def _set_servers(self, servers: tuple[m.ServerInfo, ...]) -> None:
        self.server_infos = {s.server_id: s for s in servers}
        addresses = list(dict.fromkeys(Address(s.host, self.port_of(s)) for s in servers))
        if addresses:
            self._named = addresses
            for address in addresses:
                self._remember(address)

    def _remember(self, address: Address) -> None:
        """Know ``address`` for good (as the most recently named), within the bound."""
        self._known[address] = self._known.pop(address, False)
        keep = set(self._named) | set(self.configured)
        while len(self._known) > MAX_KNOWN_SERVERS:
            # The least recently named of those where no session ever worked,
            # else of the others (never one configured or named now).
            spare = [a for a in self._known if a not in keep]
            if not spare:
                break
            never = [a for a in spare if not self._known[a]]
            del self._known[(never or spare)[0]]
        # The servers the cluster names now, then those given at start, then
        # the others ever named: if every named server dies, the client still
        # tries the others when they return.
        self.servers = list(dict.fromkeys(
            [*self._named, *self.configured, *reversed(self._known)]))

    def _open_relay(self) -> None:
        if self._relay_address is None or self.stopped:
            return
        ticket = self.ticket
        d = self.connector(self._relay_address).connect(
            _Factory(lambda: RelayConnection(self, self.reactor, ticket)))
        d.addErrback(self._relay_failed, ticket)

    def _relay_failed(self, failure: Failure, ticket: bytes) -> None:
        if self.control is not None and ticket and ticket == self.ticket:
            self.control.fail(ErrorCode.INTERNAL, "cannot open the relay connection")

    # -- connection events -----------------------------------------------

    def connected(self, conn: _ClientConnection) -> None:
        if isinstance(conn, RelayConnection):
            if self.stopped or not conn.ticket or conn.ticket != self.ticket:
                conn.close()  # the session that opened it is over
            else:
                conn.send(m.RelayHello(conn.ticket))
            return
        if self.stopped or conn.attempt not in self._attempts:
            conn.close()  # an attempt given up meanwhile
            return
        assert conn.attempt is not None
        conn.attempt.conn = conn

    def preamble(self, conn: _ClientConnection) -> None:
        """The server said its preamble: it is alive."""
        if isinstance(conn, RelayConnection):
            conn.expect_answer(self.answer_deadline)
            return
        attempt = conn.attempt
        if self.stopped or attempt not in self._attempts or self.control is not None:
            conn.close()
            return
        assert attempt is not None
        # The first server to answer wins: the other attempts are closed
        # before they said who we are.
        self._attempts.remove(attempt)
        self._drop_attempts()
        self.control = conn
        self.address = attempt.address
        self.placed_by = attempt.placed_by
        conn.expect_answer(self.answer_deadline)
        self.hello(conn)

    def message(self, conn: _ClientConnection, msg: Any) -> None:
        if isinstance(conn, RelayConnection):
            if isinstance(msg, m.RelayOk):
                if not conn.ticket or conn.ticket != self.ticket or self.control is None:
                    conn.close()
                    return
                conn.answered()
                self.relay = conn
                # Slower than the control connection, which notices a dead server.
                interval = 3 * self.keepalive_interval()
                conn.start_keepalive(interval, 3 * interval)
                self._relay_ready()
            return
        if conn is not self.control:
            return  # a connection left behind (after a redirect)
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
            elif not self.ticket or conn.ticket != self.ticket:
                return  # a relay of an earlier session
            # The relay is part of the session: start over on the control side.
            if self.control is not None and self.control.connected:
                self.control.close()
            return
        if conn is self.control:
            self._lost(error)
        elif conn.attempt in self._attempts:
            assert conn.attempt is not None
            self._attempt_failed(conn.attempt, error)

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

    def session_ended(self, lasted: float) -> None:
        """A session that had logged in is over after ``lasted`` seconds."""

    def on_final_error(self, error: ClientError) -> None:
        log.error("giving up: {error}", error=error)


# --------------------------------------------------------------------------
# Encoder


@attrs.frozen
class Hop:
    """One step of an encoder's way through the cluster (``EncoderClient.history``)."""

    #: When (reactor seconds).
    at: float
    #: "session" (logged in on ``server_id``), "redirect" (``server_id`` sent
    #: us to ``target`` for ``reason``), or "redirect-ignored" (a loop).
    kind: str
    server_id: str
    target: str = ""
    reason: str = ""


class EncoderClient(_ReconnectingClient):
    """An encoder: streams samples from ``source`` while the server asks for them.

    ``source`` yields ``evserver.media.Sample``-like objects (``keyframe``,
    ``codec``, ``data``) and has an ``fps``.  Samples are paced on the reactor.
    After StartStream or KeyframeRequest the encoder skips ahead to the
    source's next keyframe, so a viewer starts at once.
    """

    control_class = EncoderControlConnection
    MAX_SKIP = 1000
    #: Hops kept in ``history``.
    HISTORY = 64

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
        #: Redirects obeyed, and redirects ignored (a redirect loop).
        self.redirects = 0
        self.redirects_ignored = 0
        #: The last redirect obeyed or ignored: (from server, to server id, reason name).
        self.last_redirect: tuple[str, str, str] | None = None
        #: When the redirects obeyed since the last session that lasted came.
        self._recent_redirects: list[float] = []
        self._ignore_redirects_until = float("-inf")
        #: The latest sessions and redirects, oldest first.
        self.history: collections.deque[Hop] = collections.deque(maxlen=self.HISTORY)

    def port_of(self, info: m.ServerInfo) -> int:
        return info.encoder_port

    def hello(self, conn: _ClientConnection) -> None:
        conn.send(m.EncoderAuth(self.encoder_id, self.secret, SOFTWARE, self.placed_by))

    def control_message(self, msg: Any) -> None:
        assert self.control is not None
        if isinstance(msg, m.EncoderAuthOk):
            self._authenticated(self.control, msg.ticket, msg.keepalive_ms, msg.server_id,
                                msg.servers)
            self.history.append(Hop(self.reactor.seconds(), "session", msg.server_id))
        elif isinstance(msg, m.EncoderRedirect):
            self._redirected(msg)
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

    # -- redirects -------------------------------------------------------

    #: More than REDIRECT_LOOP redirects within REDIRECT_WINDOW seconds, with
    #: no session lasting REDIRECT_SETTLED seconds in between, is a loop:
    #: redirects are then ignored for REDIRECT_IGNORE seconds.
    REDIRECT_LOOP = 3
    REDIRECT_WINDOW = 10.0
    REDIRECT_SETTLED = 1.0
    REDIRECT_IGNORE = 30.0

    def _redirected(self, msg: m.EncoderRedirect) -> None:
        """The server sends us to another (placement at login, or a move later).

        Not a failure: no back-off, no ``on_lost``.  The connections to the
        redirecting server are closed, the target is tried at once (naming
        the redirecting server in ``placed_by``) and, if it does not answer,
        the redirecting server alongside (it reached us a moment ago), then the
        known servers as after a lost connection.
        """
        now = self.reactor.seconds()
        source = self.address
        assert source is not None
        from_id = self._redirecting_server_id()
        reason = m.REDIRECT_REASONS.get(msg.reason, str(msg.reason))
        target = Address(msg.server.host, msg.server.encoder_port)
        self._end_session()
        self._remember(target)
        self._recent_redirects = [t for t in self._recent_redirects
                                  if now - t < self.REDIRECT_WINDOW]
        self.last_redirect = (from_id, msg.server.server_id, reason)
        if now < self._ignore_redirects_until or (
                len(self._recent_redirects) >= self.REDIRECT_LOOP):
            if now >= self._ignore_redirects_until:
                self._ignore_redirects_until = now + self.REDIRECT_IGNORE
                log.warn("{e}: {n} redirects within {w:.0f} s (the last from {a} to {b}, "
                         "{r}): ignoring redirects for {i:.0f} s", e=self.encoder_id,
                         n=len(self._recent_redirects) + 1, w=self.REDIRECT_WINDOW, a=from_id,
                         b=msg.server.server_id, r=reason, i=self.REDIRECT_IGNORE)
            self.redirects_ignored += 1
            self.history.append(Hop(now, "redirect-ignored", from_id, msg.server.server_id,
                                    reason))
            # Stay: back to the redirecting server, as placed there (it does not
            # redirect a placed encoder at login), after the back-off: a server
            # that redirects us over and over must not make us spin.
            self._attempt += 1
            self._retry_call = self.reactor.callLater(self._backoff(), self._start_attempt,
                                                      source, from_id)
            return
        self.redirects += 1
        self.history.append(Hop(now, "redirect", from_id, msg.server.server_id, reason))
        self._placement = from_id
        self._fallback = source
        self._recent_redirects.append(now)
        log.info("{e}: {a} sends us to {b} at {address} ({r})", e=self.encoder_id, a=from_id,
                 b=msg.server.server_id, address=target, r=reason)
        self._start_attempt(target, from_id)

    def _redirecting_server_id(self) -> str:
        """The id of the server of the control connection (its address if not known)."""
        if self._session_started is not None:
            return self.server_id
        # Redirected at login: EncoderAuthOk, which names the server, did not
        # come.  A server list heard before may name it.
        for info in self.server_infos.values():
            if Address(info.host, info.encoder_port) == self.address:
                return info.server_id
        return str(self.address)

    def _end_session(self) -> None:
        """Close the control and relay connections, as no failure."""
        conn, self.control = self.control, None
        relay, self.relay = self.relay, None
        self.ticket = b""
        self._end_session_clock()
        self._halt()
        for c in (relay, conn):
            if c is not None and c.connected:
                c.close()

    def session_ended(self, lasted: float) -> None:
        if lasted >= self.REDIRECT_SETTLED:
            self._recent_redirects.clear()

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


def _ignore(_: object) -> None:
    return None


@attrs.frozen
class _Word:
    """What a session of a ClusterViewer last said of an encoder."""

    #: When the viewer heard it, in the order of all it heard (higher: newer).
    serial: int
    #: The server that said it.
    speaker: str
    info: m.EncoderInfo

    @property
    def host(self) -> str:
        """The server it says hosts the encoder ("" when it says offline)."""
        return self.info.server_id if self.info.state != m.EncoderState.OFFLINE else ""

    @property
    def own(self) -> bool:
        """The speaker says it hosts the encoder itself."""
        return bool(self.host) and self.host == self.speaker


class _ClusterSession(ViewerClient):
    """A ViewerClient driven by a ClusterViewer, which decides what it watches where.

    After a reconnection it watches nothing by itself (the ClusterViewer
    places every encoder again, on the server hosting it now).  A session
    ``pinned_to`` a server stays with that server: a ServerList does not send
    it elsewhere.  The home session (``pinned_to`` "") follows the server list.
    """

    def __init__(self, owner: ClusterViewer, pinned_to: str, reactor: Any,
                 servers: list[Address], account: str, password: str, tls: TLSConfig,
                 **kwargs: Any) -> None:
        super().__init__(reactor, servers, account, password, tls, **kwargs)
        self.owner = owner
        self.pinned_to = pinned_to
        #: When the session was lost (None while it is up or has never been).
        self.down_since: float | None = None

    @property
    def up(self) -> bool:
        return self.control is not None and self.relay is not None

    def _set_servers(self, servers: tuple[m.ServerInfo, ...]) -> None:
        if not self.pinned_to:
            super()._set_servers(servers)
        else:
            self.server_infos = {s.server_id: s for s in servers}
        self.owner._servers_told(self, servers)

    def _relay_ready(self) -> None:
        self.down_since = None
        self.watched.clear()
        self._by_stream.clear()
        self.first_ready(self)

    def on_lost(self, error: ClientError) -> None:
        super().on_lost(error)  # fails the requests under way
        self.watched.clear()
        self._by_stream.clear()
        if self.down_since is None:
            self.down_since = self.reactor.seconds()
        self.owner._session_lost(self)

    def on_final_error(self, error: ClientError) -> None:
        self.owner._session_gave_up(self, error)


class ClusterViewer:
    """A viewer that follows its encoders across the servers of a cluster.

    A *home* session (to any server of the list; it moves to another on
    failure) lists the domain's encoders after every login and receives
    their updates, which name the server hosting each.  Each watched encoder
    is watched on its hosting server, through one session per server, opened
    when first needed and closed once nothing is watched there.  A Redirect
    answer is followed.  When an update says an encoder moved (a failover, a
    rebalance), the watch moves with it.  An offline encoder stays watched
    where it was (it comes back there, or an update says where), unless
    that server's session has been down for ``FALLBACK_DELAY``: then it is
    watched at home.  No action of the user is needed.

    Every session lists the domain's encoders when it logs in, and so is
    told their updates too: two servers cut from each other may each count
    the other dead while the viewer reaches both, and then the home never
    hears where an encoder went.  What the sessions say is weighed (see
    ``_best``): a server is the authority on its own registrations, so its
    word that it hosts an encoder beats another's "offline", and its word
    that it does not beats another's word that it does; otherwise the newest
    word wins.  A server that counts the host dead says "offline", but that
    never moves a watch away from a host that says it has the encoder.
    While a watched encoder is lost (held offline, or on a server whose
    session was lost), the servers the viewer knows of that the home does
    not name (it counts them dead: they may only be cut off from it) are
    asked too, through a session to each, kept while an encoder is lost.

    Callbacks: ``on_media(encoder_id, media)`` for each frame (only from the
    server where the encoder is watched now); ``on_update(info)`` each time
    what the viewer holds of an encoder (``infos``) changes, unless by the
    home's listing; ``on_list(infos)`` with the listing after each
    login of the home; ``on_watch_error(encoder_id, error)`` when a watch is
    refused for good (NOT_FOUND, LIMIT_EXCEEDED: the encoder is no longer
    watched); ``on_final_error(error)`` when the home session gives up after
    having logged in (the first login's failure fails ``start()`` instead).
    ``client_kwargs`` go to every ViewerClient (``connector``, ``rng``, ...).
    """

    MAX_REDIRECTS = 3
    #: Wait this long before asking again after a redirect loop or a session given up.
    RETRY_DELAY = 1.0
    #: Offline encoders leave a server whose session has been down this long.
    FALLBACK_DELAY = 3.0
    #: A server the home does not name, asked where lost encoders are, that
    #: cannot be used is asked again after this long (doubled each time, up
    #: to SCOUT_RETRY_MAX).
    SCOUT_RETRY = 2.0
    SCOUT_RETRY_MAX = 60.0

    def __init__(self, reactor: Any, servers: list[Address], account: str, password: str,
                 tls: TLSConfig, on_media: Callable[[str, m.Media], None] | None = None,
                 on_update: Callable[[m.EncoderInfo], None] | None = None,
                 on_list: Callable[[tuple[m.EncoderInfo, ...]], None] | None = None,
                 on_watch_error: Callable[[str, ClientError], None] | None = None,
                 on_final_error: Callable[[ClientError], None] | None = None,
                 **client_kwargs: Any) -> None:
        self.reactor = reactor
        self.account = account
        self.password = password
        self.tls = tls
        self.on_media = on_media
        self.on_update = on_update
        self.on_list = on_list
        self.on_watch_error = on_watch_error
        self.on_final_error = on_final_error
        self.client_kwargs = client_kwargs
        self.home = self._new_session("", servers)
        self.home.on_update = self._update
        self.home.on_session = self._home_ready
        #: Sessions by server id (the home under its current server, unless a
        #: session pinned to that server was there first).
        self.sessions: dict[str, _ClusterSession] = {}
        #: What the viewer holds of each encoder of the domain: the best of
        #: what its sessions say (the last word heard, while nobody says anything).
        self.infos: dict[str, m.EncoderInfo] = {}
        #: The encoders to watch, in the order asked.
        self.wanted: dict[str, None] = {}
        #: encoder id -> the server id where it is watched (or about to be).
        self.placed: dict[str, str] = {}
        #: How many times the video of a watched encoder moved: its watch left
        #: the server its last frames came from for another.
        self.moves = 0
        #: Frames delivered to ``on_media``, by the server they came from.
        self.frames_by_server: dict[str, int] = {}
        self.stopped = False
        self._home_sid = ""
        #: encoder id -> the session a Watch of it is under way on
        self._placing: dict[str, _ClusterSession] = {}
        #: encoder id -> the server its last frame came from
        self._video_from: dict[str, str] = {}
        #: encoder id -> where a Redirect said it is (newer than the word held)
        self._hints: dict[str, m.ServerInfo] = {}
        #: Servers' addresses learnt from Redirects.
        self._addresses: dict[str, m.ServerInfo] = {}
        self._retry_calls: dict[str, IDelayedCall] = {}
        self._fallback_calls: dict[str, IDelayedCall] = {}
        #: session -> encoder id -> what the session last said of it, while it
        #: is up (the words of a lost session are forgotten: they may be stale).
        self._words: dict[_ClusterSession, dict[str, _Word]] = {}
        #: server id -> encoder id -> what the sessions to it that were closed
        #: (nothing to watch there) last said: news as old as it is, no more.
        self._archive: dict[str, dict[str, _Word]] = {}
        self._serial = 0
        #: Every server named to a session or by a Redirect, by id (the latest word).
        self._known_servers: dict[str, m.ServerInfo] = {}
        #: server id -> sessions to it in a row that could not be used, and
        #: when it may be asked where lost encoders are again.
        self._scout_failures: dict[str, int] = {}
        self._scout_after: dict[str, float] = {}
        self._scout_call: IDelayedCall | None = None

    def _new_session(self, pinned_to: str, servers: list[Address]) -> _ClusterSession:
        session = _ClusterSession(self, pinned_to, self.reactor, servers, self.account,
                                  self.password, self.tls, **self.client_kwargs)
        session.on_media = lambda encoder_id, media: self._media(session, encoder_id, media)
        return session

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Deferred[ClusterViewer]:
        """Log in at home; fires with this viewer, or fails on a final error."""
        self.stopped = False
        d = self.home.start()
        d.addCallback(lambda _: self)
        return d

    def stop(self) -> None:
        self.stopped = True
        if self._scout_call is not None and self._scout_call.active():
            self._scout_call.cancel()
        self._scout_call = None
        for calls in (self._retry_calls, self._fallback_calls):
            for call in calls.values():
                if call.active():
                    call.cancel()
            calls.clear()
        self.home.stop()
        for session in self.sessions.values():
            if session is not self.home:
                session.stop()
        self.sessions.clear()
        self._words.clear()
        self._archive.clear()

    @property
    def domain(self) -> str:
        return self.home.domain

    # -- watching --------------------------------------------------------

    def watch(self, encoder_id: str) -> None:
        """Watch ``encoder_id`` wherever it is, now and after it moves."""
        if encoder_id in self.wanted:
            return
        self.wanted[encoder_id] = None
        self._place(encoder_id)

    def unwatch(self, encoder_id: str) -> None:
        if encoder_id in self.wanted:
            del self.wanted[encoder_id]
            self._forget(encoder_id)

    def _forget(self, encoder_id: str) -> None:
        self._hints.pop(encoder_id, None)
        self._video_from.pop(encoder_id, None)
        call = self._retry_calls.pop(encoder_id, None)
        if call is not None and call.active():
            call.cancel()
        server_id = self.placed.pop(encoder_id, None)
        if server_id is not None:
            self._drop_watch(server_id, encoder_id)
        self._collect()

    def _drop_watch(self, server_id: str, encoder_id: str) -> None:
        """Stop watching ``encoder_id`` on ``server_id`` (an answer under way: when it comes)."""
        session = self.sessions.get(server_id)
        watched = session.watched.get(encoder_id) if session is not None else None
        if session is not None and watched is not None and watched.stream_id:
            session.unwatch(encoder_id).addErrback(_ignore)

    def _where(self, encoder_id: str) -> str:
        """The server to watch ``encoder_id`` on ("" while the home is not logged in)."""
        hint = self._hints.get(encoder_id)
        if hint is not None:
            return hint.server_id
        info = self.infos.get(encoder_id)
        if info is not None and info.server_id:
            return info.server_id
        # Offline or unknown: stay where it is watched (it comes back there, or an
        # update says where), unless that server has been out of reach for long.
        current = self.placed.get(encoder_id)
        session = self.sessions.get(current) if current else None
        if current and session is not None and not self._gone(session):
            return current
        return self._home_sid

    def _gone(self, session: _ClusterSession) -> bool:
        return (not session.up and session.down_since is not None
                and self.reactor.seconds() - session.down_since >= self.FALLBACK_DELAY - 1e-6)

    def _place(self, encoder_id: str, target: m.ServerInfo | None = None,
               redirects: int = 0) -> None:
        """Watch ``encoder_id`` where it is (unless it is watched there or about to be)."""
        if self.stopped or encoder_id not in self.wanted:
            return
        server_id = target.server_id if target is not None else self._where(encoder_id)
        if not server_id:
            return  # the home is not logged in: placed once it is
        session = self._session_for(server_id)
        if session is None:
            # A server we have no address of: ask at home, whose Redirect carries it.
            server_id = self._home_sid
            session = self._session_for(server_id) if server_id else None
            if session is None:
                return
        if self._placing.get(encoder_id) is session:
            return  # the answer is under way
        old = self.placed.get(encoder_id)
        if old == server_id:
            watched = session.watched.get(encoder_id)
            if watched is not None and watched.stream_id:
                return
        elif old is not None:
            if self._video_from.get(encoder_id) == old:
                self.moves += 1
            self._drop_watch(old, encoder_id)
        self.placed[encoder_id] = server_id
        if not session.up:
            return  # placed when the session is ready
        self._placing[encoder_id] = session
        d = session.watch(encoder_id)
        d.addCallbacks(self._watch_ok, self._watch_failed,
                       callbackArgs=(server_id, session),
                       errbackArgs=(encoder_id, server_id, session, redirects))

    def _watch_ok(self, watched: Watched, server_id: str, session: _ClusterSession) -> None:
        encoder_id = watched.encoder_id
        if self._placing.get(encoder_id) is session:
            del self._placing[encoder_id]
        if (encoder_id not in self.wanted or self.placed.get(encoder_id) != server_id
                or self.sessions.get(server_id) is not session):
            # Moved or unwatched while the Watch was under way.
            session.unwatch(encoder_id).addErrback(_ignore)
            self._collect()

    def _watch_failed(self, failure: Failure, encoder_id: str, server_id: str,
                      session: _ClusterSession, redirects: int) -> None:
        if self._placing.get(encoder_id) is session:
            del self._placing[encoder_id]
        if (encoder_id not in self.wanted or self.placed.get(encoder_id) != server_id
                or self.sessions.get(server_id) is not session):
            return  # a stale answer
        error = failure.value
        if not session.up:
            return  # the session was lost: placed again when it is back
        if isinstance(error, RedirectedTo):
            target = error.server
            self._addresses[target.server_id] = target
            self._known_servers[target.server_id] = target
            if target.server_id == server_id or redirects >= self.MAX_REDIRECTS:
                log.info("redirect loop for {e} (last {a} -> {b}); asking again later",
                         e=encoder_id, a=server_id, b=target.server_id)
                self._retry_later(encoder_id)
                return
            self._hints[encoder_id] = target
            self._place(encoder_id, target, redirects + 1)
            self._collect()
        elif isinstance(error, ClientError) and error.code is not None and \
                error.code != ErrorCode.DUPLICATE:
            # Refused for good (NOT_FOUND: no such encoder in our domain; LIMIT_EXCEEDED).
            self.wanted.pop(encoder_id, None)
            self._forget(encoder_id)
            if self.on_watch_error is not None:
                self.on_watch_error(encoder_id, error)
            else:
                log.warn("cannot watch {e}: {f}", e=encoder_id, f=error)
        else:
            log.warn("watching {e} on {s}: {f}", e=encoder_id, s=server_id,
                     f=failure.getErrorMessage())

    def _retry_later(self, encoder_id: str) -> None:
        self._hints.pop(encoder_id, None)
        if encoder_id not in self._retry_calls:
            self._retry_calls[encoder_id] = self.reactor.callLater(
                self.RETRY_DELAY, self._retry, encoder_id)

    def _retry(self, encoder_id: str) -> None:
        del self._retry_calls[encoder_id]
        self._place(encoder_id)
        self._collect()

    # -- sessions ----------------------------------------------------------

    def _session_for(self, server_id: str) -> _ClusterSession | None:
        session = self.sessions.get(server_id)
        if session is not None:
            return session
        if server_id == self._home_sid:
            self.sessions[server_id] = self.home
            return self.home
        info = self._server_info(server_id)
        if info is None:
            return None
        session = self._new_session(server_id, [Address(info.host, info.viewer_port)])
        session.on_session = lambda: self._session_ready(session)
        session.on_update = lambda info: self._heard(session, info)
        self.sessions[server_id] = session
        session.start().addErrback(lambda f: self._session_gave_up(session, f.value))
        return session

    def _server_info(self, server_id: str) -> m.ServerInfo | None:
        """The address of ``server_id``: as the home last named it, a Redirect, another session."""
        return (self.home.server_infos.get(server_id) or self._addresses.get(server_id)
                or self._known_servers.get(server_id))

    def _home_ready(self) -> None:
        self._home_sid = self.home.server_id
        self.sessions.setdefault(self._home_sid, self.home)
        # Every (re)login of the home: learn the encoders and where they are.
        self.home.list_encoders().addCallbacks(self._listed, _ignore)

    def _session_ready(self, session: _ClusterSession) -> None:
        server_id = session.pinned_to
        if self.sessions.get(server_id) is not session:
            return
        self._scout_failures.pop(server_id, None)
        self._scout_after.pop(server_id, None)
        # Every (re)login: subscribe to the updates, as the home is.
        session.list_encoders().addCallbacks(
            lambda infos: self._session_listed(session, infos), _ignore)
        for encoder_id in [e for e, s in self.placed.items() if s == server_id]:
            self._place(encoder_id)
        self._collect()

    def _session_lost(self, session: _ClusterSession) -> None:
        if self.stopped:
            return
        if session is self.home:
            # It logs in elsewhere by itself, lists again and everything is placed again.
            self.sessions = {s: v for s, v in self.sessions.items() if v is not self.home}
            self._home_sid = ""
        else:
            server_id = session.pinned_to
            if self.sessions.get(server_id) is session and server_id not in self._fallback_calls:
                self._fallback_calls[server_id] = self.reactor.callLater(
                    self.FALLBACK_DELAY, self._fallback, server_id)
        # What it said may be stale by now; it says it again when it is back.
        if session in self._words:
            self._place_all(self._unsay(session))
            self._collect()

    def _fallback(self, server_id: str) -> None:
        """A session down for FALLBACK_DELAY: its offline encoders are watched at home."""
        del self._fallback_calls[server_id]
        session = self.sessions.get(server_id)
        if session is None or session.up or session.down_since is None:
            return
        left = session.down_since + self.FALLBACK_DELAY - self.reactor.seconds()
        if left > 1e-6:  # it was back and lost again meanwhile
            self._fallback_calls[server_id] = self.reactor.callLater(left, self._fallback,
                                                                     server_id)
            return
        for encoder_id in [e for e, s in self.placed.items() if s == server_id]:
            self._place(encoder_id)
        self._collect()

    def _session_gave_up(self, session: _ClusterSession, error: Any) -> None:
        if session is self.home:
            if self.on_final_error is not None and isinstance(error, ClientError):
                self.on_final_error(error)
            else:
                log.error("giving up: {error}", error=error)
            return
        server_id = session.pinned_to
        log.info("cannot use {s}: {f}", s=server_id, f=error)
        session.stop()
        if self.sessions.get(server_id) is not session:
            return
        del self.sessions[server_id]
        failures = self._scout_failures[server_id] = self._scout_failures.get(server_id, 0) + 1
        after = self._scout_after[server_id] = self.reactor.seconds() + min(
            self.SCOUT_RETRY_MAX, self.SCOUT_RETRY * 2 ** min(failures - 1, 16))
        self._scout_at(after)
        for encoder_id in [e for e, s in self.placed.items() if s == server_id]:
            self._retry_later(encoder_id)
        if session in self._words:
            self._place_all(self._unsay(session))
            self._collect()

    def _collect(self) -> None:
        """Close the sessions (but the home) where nothing is watched any more.

        Those to servers the home does not name are kept while a watched
        encoder is lost; while one is, such servers are asked (``_scout``).
        """
        while True:
            needed = set(self.placed.values())
            if self._lost_encoders():
                needed.update(self._unnamed())
            changed: list[str] = []
            for server_id, session in list(self.sessions.items()):
                if session is self.home or server_id in needed:
                    continue
                del self.sessions[server_id]
                call = self._fallback_calls.pop(server_id, None)
                if call is not None and call.active():
                    call.cancel()
                session.stop()
                changed += self._unsay(session, archive=True)
            if not changed:
                break
            # The words of the sessions closed lost their weight: others may be
            # the best, placed again, which may leave another session idle.
            self._place_all(changed)
        self._scout()

    # -- servers the home counts dead ----------------------------------------

    def _lost_encoders(self) -> bool:
        """Whether a watched encoder is held offline, or on a server whose session was lost."""
        for encoder_id in self.wanted:
            info = self.infos.get(encoder_id)
            if info is None:
                continue  # not listed yet
            if info.state == m.EncoderState.OFFLINE or not info.server_id:
                return True
            session = self.sessions.get(info.server_id)
            if session is not None and session.down_since is not None:
                return True
        return False

    def _unnamed(self) -> list[str]:
        """The servers the viewer knows of that the home does not name (counts dead)."""
        return [sid for sid in self._known_servers
                if sid != self._home_sid and sid not in self.home.server_infos]

    def _scout(self) -> None:
        """While a watched encoder is lost, ask the servers the home does not name.

        Two servers cut from each other (and from any third that could
        probe for them) count each other dead while the viewer reaches
        both: the home then never hears of the encoders of the other.  A
        session to it (listing, so told the updates) says where they are.
        """
        if self.stopped or not self._home_sid or not self._lost_encoders():
            return
        now = self.reactor.seconds()
        for server_id in self._unnamed():
            if server_id in self.sessions:
                continue
            after = self._scout_after.get(server_id)
            if after is not None and after > now + 1e-6:
                self._scout_at(after)
                continue
            log.info("asking {s}, which {h} does not name, where lost encoders are",
                     s=server_id, h=self._home_sid)
            self._session_for(server_id)

    def _scout_at(self, when: float) -> None:
        call = self._scout_call
        if call is not None and call.active() and call.getTime() <= when:
            return
        if call is not None and call.active():
            call.cancel()
        self._scout_call = self.reactor.callLater(max(0.0, when - self.reactor.seconds()),
                                                  self._scout_due)

    def _scout_due(self) -> None:
        self._scout_call = None
        self._collect()

    # -- what the sessions say --------------------------------------------

    def _listed(self, infos: tuple[m.EncoderInfo, ...]) -> None:
        """The home's listing (after each of its logins)."""
        if self.stopped:
            return
        self._say(self.home, infos, listing=True, notify=False)
        if self.on_list is not None:
            self.on_list(infos)
        for encoder_id in list(self.wanted):
            self._place(encoder_id)
        self._collect()

    def _update(self, info: m.EncoderInfo) -> None:
        """An EncoderUpdate pushed to the home."""
        self._heard(self.home, info)

    def _session_listed(self, session: _ClusterSession,
                        infos: tuple[m.EncoderInfo, ...]) -> None:
        """The listing of a session to another server than the home's (after each login)."""
        if self.stopped or self.sessions.get(session.pinned_to) is not session:
            return
        self._place_all(self._say(session, infos, listing=True))
        self._collect()

    def _heard(self, session: _ClusterSession, info: m.EncoderInfo) -> None:
        """An EncoderUpdate pushed to ``session``."""
        if self.stopped or (session is not self.home
                            and self.sessions.get(session.pinned_to) is not session):
            return  # a session closed meanwhile
        self._place_all(self._say(session, (info,)))
        self._collect()

    def _say(self, session: _ClusterSession, infos: tuple[m.EncoderInfo, ...],
             listing: bool = False, notify: bool = True) -> list[str]:
        """Keep what ``session`` says of ``infos`` (a ``listing``: all it says).

        Returns the encoders to place again: those of which the viewer holds
        something new, or the word just heard.
        """
        self._serial += 1
        words = self._words.setdefault(session, {})
        before = set(words) if listing else set()
        if listing:
            words.clear()
            # It says it all again: what it said before the last close is moot.
            self._archive.pop(session.server_id, None)
        for info in infos:
            words[info.encoder_id] = _Word(self._serial, session.server_id, info)
        return self._weigh([*dict.fromkeys([*(i.encoder_id for i in infos), *before])],
                           heard_from=session, notify=notify)

    def _unsay(self, session: _ClusterSession, archive: bool = False) -> list[str]:
        """Forget what ``session`` said: the encoders to place again.

        ``archive`` (a session closed, not lost): keep it as plain news, which
        newer news beats, without the weight of a server speaking of itself.
        """
        words = self._words.pop(session, {})
        if archive:
            for encoder_id, word in words.items():
                kept = self._archive.setdefault(word.speaker, {})
                if encoder_id not in kept or kept[encoder_id].serial < word.serial:
                    kept[encoder_id] = word
        return self._weigh(list(words))

    def _weigh(self, encoder_ids: list[str], heard_from: _ClusterSession | None = None,
               notify: bool = True) -> list[str]:
        """Hold the best word on each of ``encoder_ids``: those to place again."""
        out = []
        for encoder_id in encoder_ids:
            best = self._best(encoder_id)
            if best is None:
                continue  # nobody says anything: what was last heard stays
            taken = (heard_from is not None
                     and self._words.get(heard_from, {}).get(encoder_id) is best)
            if taken:
                # Newer than where a Redirect said it is.
                self._hints.pop(encoder_id, None)
            changed = self.infos.get(encoder_id) != best.info
            if changed:
                self.infos[encoder_id] = best.info
                if notify and self.on_update is not None:
                    self.on_update(best.info)
            if taken or changed:
                out.append(encoder_id)
        return out

    def _best(self, encoder_id: str) -> _Word | None:
        """What to hold of ``encoder_id``, of what the sessions say of it.

        A server is the authority on its own registrations.  Its word, through
        a session that is up, that it hosts the encoder beats every "offline"
        (of a server that counts it dead, or of one that relays the end of a
        registration it superseded), and any word that places the encoder on
        a server whose session was lost.  Its word that it does not host the
        encoder (offline, or elsewhere) beats any word that it does (older
        words only, once its session is closed).  Of the words left, the
        newest.
        """
        live = [w for said in self._words.values()
                if (w := said.get(encoder_id)) is not None]
        words = live + [w for said in self._archive.values()
                        if (w := said.get(encoder_id)) is not None]
        if not words:
            return None
        live_ids = {id(w) for w in live}
        latest: dict[str, _Word] = {}  # each server's newest word
        for word in words:
            if word.speaker not in latest or word.serial > latest[word.speaker].serial:
                latest[word.speaker] = word
        hosts = [w for w in latest.values() if w.own and id(w) in live_ids]

        def credible(word: _Word) -> bool:
            if not word.host:
                return not hosts
            said = latest.get(word.host)
            if (said is not None and said.host != word.host
                    and (id(said) in live_ids or said.serial > word.serial)):
                return False  # the server it names says otherwise of itself
            if hosts and word.host != word.speaker:
                session = self.sessions.get(word.host)
                if session is not None and session.down_since is not None:
                    return False  # a server whose session was lost
            return True

        return max([w for w in words if credible(w)] or words, key=lambda w: w.serial)

    def _place_all(self, encoder_ids: list[str]) -> None:
        for encoder_id in encoder_ids:
            if encoder_id in self.wanted:
                self._place(encoder_id)

    def _servers_told(self, session: _ClusterSession,
                      servers: tuple[m.ServerInfo, ...]) -> None:
        """``session`` was told the cluster's servers (at its login, or pushed).

        Pushed: an encoder held to be on a server of which the viewer had no
        address was watched at home (or nowhere): where it is, now that it
        has one.
        """
        for server in servers:
            self._known_servers[server.server_id] = server
        if self.stopped or not session.up:
            return  # at the login: the listing that follows places everything
        for encoder_id in list(self.wanted):
            info = self.infos.get(encoder_id)
            host = (info.server_id if info is not None
                    and info.state != m.EncoderState.OFFLINE else "")
            if (host and self.placed.get(encoder_id) != host
                    and encoder_id not in self._hints and self._server_info(host) is not None):
                self._place(encoder_id)
        self._collect()

    # -- media -------------------------------------------------------------

    def _media(self, session: _ClusterSession, encoder_id: str, media: m.Media) -> None:
        server_id = self.placed.get(encoder_id)
        if server_id is None or self.sessions.get(server_id) is not session:
            return  # from where it was watched before a move: the new place is the one
        self.frames_by_server[server_id] = self.frames_by_server.get(server_id, 0) + 1
        self._video_from[encoder_id] = server_id
        if self.on_media is not None:
            self.on_media(encoder_id, media)
