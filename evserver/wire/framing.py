"""Preamble and length-prefixed framing, without I/O.

Every evserver connection opens with a 16-byte preamble from each side
(sent at once by both, so it costs no round trip), followed by frames:

    +----------------+---------+----------------------+
    | length (u32be) | type u8 | body (length-1 bytes)|
    +----------------+---------+----------------------+

``length`` counts the type byte and the body.  A length over the current limit
is refused as soon as the four length bytes are known: none of the body is
buffered.  See ``protocol-spec/framing.rst``, which is normative.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator

import attrs

MAGIC = b"EVSP"
PREAMBLE = struct.Struct("!4s8sHH")
PREAMBLE_SIZE = PREAMBLE.size  # 16
FRAME_HEADER = struct.Struct("!IB")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 5
LENGTH = struct.Struct("!I")

#: Protocol version spoken by this code.  Peers with the same major version
#: and a minor version at least MIN_MINOR are accepted.
VERSION = (1, 0)
MIN_VERSION = (1, 0)


class ProtocolName(enum.Enum):
    """The protocols, one per listening port."""

    ENCODER = b"encoder"
    VIEWER = b"viewer"
    RELAY = b"relay"
    PEER = b"peer"


class ErrorCode(enum.IntEnum):
    """Error codes carried by ERROR frames (protocol-spec/errors.rst; 21-25: peer.rst)."""

    PROTOCOL_VIOLATION = 1
    BAD_PREAMBLE = 2
    WRONG_PROTOCOL = 3
    VERSION_TOO_OLD = 4
    FRAME_TOO_LARGE = 5
    MALFORMED = 6
    UNEXPECTED_MESSAGE = 7
    KEEPALIVE_TIMEOUT = 8
    AUTH_FAILED = 10
    NOT_FOUND = 11
    SUPERSEDED = 13
    BAD_TICKET = 14
    SHUTTING_DOWN = 15
    STALLED = 16
    LIMIT_EXCEEDED = 17
    INTERNAL = 18
    RATE_LIMITED = 19
    DUPLICATE = 20
    # Peer protocol (protocol-spec/peer.rst).
    WRONG_CLUSTER = 21
    BAD_TOKEN = 22
    CLUSTER_FULL = 23
    REMOVED = 24
    SERVER_ID_IN_USE = 25


class WireError(Exception):
    """Base of the errors raised by the wire layer.

    ``fatal`` errors are protocol violations: the receiver answers with an
    ERROR frame and closes the connection.
    """

    fatal = True

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class ProtocolViolation(WireError):
    """The peer broke the protocol; the connection must be closed."""


class FrameTooLarge(ProtocolViolation):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes exceeds the limit of {limit}"
        )
        self.length = length
        self.limit = limit


@attrs.frozen
class Preamble:
    name: ProtocolName
    version: tuple[int, int]


def encode_preamble(name: ProtocolName, version: tuple[int, int] = VERSION) -> bytes:
    return PREAMBLE.pack(MAGIC, name.value, version[0], version[1])


def decode_preamble(data: bytes) -> Preamble:
    """Decode exactly PREAMBLE_SIZE bytes; raise ProtocolViolation if they are wrong."""
    if len(data) != PREAMBLE_SIZE:
        raise ProtocolViolation(ErrorCode.BAD_PREAMBLE, "truncated preamble")
    magic, raw_name, major, minor = PREAMBLE.unpack(data)
    if magic != MAGIC:
        raise ProtocolViolation(ErrorCode.BAD_PREAMBLE, "not an evserver connection (bad magic)")
    stripped = raw_name.rstrip(b"\0")
    try:
        name = ProtocolName(stripped)
    except ValueError:
        raise ProtocolViolation(
            ErrorCode.WRONG_PROTOCOL,
            f"unknown protocol {stripped.decode('ascii', 'replace')!r}",
        ) from None
    return Preamble(name, (major, minor))


def check_peer_preamble(preamble: Preamble, expected: ProtocolName,
                        peer_is_server: bool = False) -> None:
    """Raise ProtocolViolation unless the peer speaks ``expected`` in a version we accept.

    ``peer_is_server`` words the message for a client that reached a server
    port of another protocol.
    """
    if preamble.name is not expected:
        ours, theirs = expected.value.decode(), preamble.name.value.decode()
        raise ProtocolViolation(
            ErrorCode.WRONG_PROTOCOL,
            f"the server on this port speaks {theirs!r}, not {ours!r}" if peer_is_server
            else f"this port speaks {ours!r}, not {theirs!r}",
        )
    major, minor = preamble.version
    if major != VERSION[0] or (major, minor) < MIN_VERSION:
        raise ProtocolViolation(
            ErrorCode.VERSION_TOO_OLD
            if (major, minor) < MIN_VERSION
            else ErrorCode.WRONG_PROTOCOL,
            f"protocol version {major}.{minor} is not supported; "
            f"this side speaks {VERSION[0]}.{VERSION[1]} "
            f"(oldest accepted {MIN_VERSION[0]}.{MIN_VERSION[1]})",
        )


def encode_frame(msg_type: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body) + 1, msg_type) + body


class FrameDecoder:
    """Incremental decoder: preamble first, then frames.

    ``feed`` returns the complete frames received so far as (type, body)
    pairs; the preamble, once complete, is available as ``preamble``.  The
    limit may be changed at any time (it is checked when a frame's length is
    read).  Errors are raised as ProtocolViolation; after one, the decoder
    must not be fed again.
    """

    __slots__ = ("_buf", "_expect_preamble", "max_frame", "preamble")

    def __init__(self, max_frame: int, expect_preamble: bool = True) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self.preamble: Preamble | None = None
        self._expect_preamble = expect_preamble

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[Preamble | tuple[int, bytes]]:
        """Yield the preamble (once) and then each complete (type, body) frame.

        The generator is lazy: the caller may change ``max_frame`` between
        frames (for example after authentication) and it applies to the next.
        """
        buf = self._buf
        buf += data
        if self._expect_preamble:
            if len(buf) < PREAMBLE_SIZE:
                # Fail fast on a wrong magic even before 16 bytes have arrived.
                n = min(len(buf), len(MAGIC))
                if buf[:n] != MAGIC[:n]:
                    raise ProtocolViolation(
                        ErrorCode.BAD_PREAMBLE, "not an evserver connection (bad magic)"
                    )
                return
            self.preamble = decode_preamble(bytes(buf[:PREAMBLE_SIZE]))
            del buf[:PREAMBLE_SIZE]
            self._expect_preamble = False
            # The caller checks the preamble before any frame is decoded.
            yield self.preamble
        while len(buf) >= 4:
            (length,) = LENGTH.unpack_from(buf, 0)
            if length == 0:
                raise ProtocolViolation(ErrorCode.MALFORMED, "frame of length 0")
            if length > self.max_frame:
                raise FrameTooLarge(length, self.max_frame)
            end = 4 + length
            if len(buf) < end:
                return
            msg_type = buf[4]
            with memoryview(buf) as view:
                body = bytes(view[5:end])
            del buf[:end]
            yield (msg_type, body)
