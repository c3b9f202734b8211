"""A raw client protocol for tests: sends exactly the bytes it is told, records everything.

``RawClient`` sends nothing by itself (not even a preamble), so a test can
write any byte sequence to a server; it decodes what the server sends with
the wire layer and keeps it: the server's preamble, every message in order
(``Media`` frames as :class:`evserver.wire.messages.Media`), the ERROR frames
among them, and whether and how the connection ended.  A server that sends
bytes the wire layer cannot decode is recorded in ``decode_error``: for a
test that is a bug of the server.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from evserver.testing.memnet import MemoryNetwork, MemoryTransport
from evserver.wire import messages as m
from evserver.wire.framing import (
    VERSION,
    FrameDecoder,
    Preamble,
    ProtocolName,
    WireError,
    encode_preamble,
)

#: What a raw client accepts from a server: the media limit plus slack.
RAW_MAX_FRAME = 8 * 1024 * 1024


class RawClient(Protocol):
    """Records and decodes everything received; sends only what it is told.

    ``answer_pings`` makes it answer each Ping with a Pong (to keep an
    otherwise idle control connection alive through the server's keepalive).
    """

    def __init__(self, answer_pings: bool = False, max_frame: int = RAW_MAX_FRAME) -> None:
        self.answer_pings = answer_pings
        self.decoder = FrameDecoder(max_frame)
        self.received = bytearray()
        self.preamble: Preamble | None = None
        self.messages: list[Any] = []
        self.decode_error: WireError | None = None
        self.connected = False
        self.closed = False
        self.close_reason: Failure | None = None
        self.bytes_sent = 0

    # -- Twisted ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.decode_error is not None:
            return
        try:
            for item in self.decoder.feed(data):
                if isinstance(item, Preamble):
                    self.preamble = item
                    continue
                msg_type, body = item
                msg = m.decode(msg_type, body)
                self.messages.append(msg)
                if self.answer_pings and isinstance(msg, m.Ping):
                    self.send(m.Pong(msg.nonce))
        except WireError as err:
            self.decode_error = err

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.connected = False
        self.closed = True
        self.close_reason = reason

    # -- sending ---------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.bytes_sent += len(data)
            self.transport.write(data)

    def send_preamble(self, name: ProtocolName, version: tuple[int, int] = VERSION) -> None:
        self.send_raw(encode_preamble(name, version))

    def send(self, *msgs: Any) -> None:
        """Encode and send messages (``Media`` included) in one write."""
        self.send_raw(b"".join(m.encode(msg) for msg in msgs))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.mem.abortConnection()

    @property
    def mem(self) -> MemoryTransport:
        """This end's transport on the in-memory network (``.other`` is the server's end)."""
        assert isinstance(self.transport, MemoryTransport)
        return self.transport

    # -- what was received -----------------------------------------------

    @property
    def errors(self) -> list[m.Error]:
        return [msg for msg in self.messages if isinstance(msg, m.Error)]

    @property
    def fatal_errors(self) -> list[m.Error]:
        return [e for e in self.errors if e.fatal]

    def of_type(self, cls: type) -> list[Any]:
        return [msg for msg in self.messages if isinstance(msg, cls)]

    def take(self) -> list[Any]:
        """The messages received since the last call; forget them and the raw bytes."""
        out, self.messages = self.messages, []
        self.received = bytearray()
        return out


class _RawFactory(Factory):
    def __init__(self, client: RawClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> RawClient:
        return self.client


def connect(net: MemoryNetwork, host: str, port: int, source: str = "127.0.0.1",
            **kwargs: Any) -> RawClient:
    """Connect a new RawClient to ``host:port`` on ``net``; raise if refused.

    The in-memory network connects at once, so the client is returned
    connected (the server's preamble arrives with the next flush).
    """
    client = RawClient(**kwargs)
    out: list[Any] = []
    net.endpoint(host, port, source).connect(_RawFactory(client)).addBoth(out.append)
    if not out or isinstance(out[0], Failure):
        if out and isinstance(out[0], Failure):
            out[0].raiseException()
        raise RuntimeError(f"no connection to {host}:{port}")
    return client
