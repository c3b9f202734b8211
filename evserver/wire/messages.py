"""Messages of the encoder, viewer and relay protocols, and the codec, without I/O.

Each message is an attrs class whose fields carry their wire kind in the
field metadata; one generic codec encodes and decodes them all, so a message
is declared in one place.  The media frame, the only per-frame message, has a
hand-written fast path (``encode_media_header`` / ``decode_media``).  The
peer protocol's messages use the same codec and live in ``peer.py``.

``protocol-spec/`` is normative; ``tests/test_wire_vectors.py`` holds this
module to the byte vectors written there.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import attrs

from evserver.wire.framing import (
    FRAME_HEADER,
    ErrorCode,
    ProtocolName,
    ProtocolViolation,
)

# --------------------------------------------------------------------------
# Field kinds


class Malformed(ProtocolViolation):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.MALFORMED, message)


class Kind:
    """A wire field kind: how one value is written and read."""

    name: ClassVar[str]

    def encode(self, value: Any, out: list[bytes]) -> None:
        raise NotImplementedError

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        raise NotImplementedError


class _Int(Kind):
    def __init__(self, fmt: str, name: str) -> None:
        self._s = struct.Struct("!" + fmt)
        self.name = name  # type: ignore[misc]
        self.max = (1 << (8 * self._s.size)) - 1

    def encode(self, value: Any, out: list[bytes]) -> None:
        if not isinstance(value, int) or not 0 <= value <= self.max:
            raise ValueError(f"{value!r} does not fit {self.name}")
        out.append(self._s.pack(value))

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        end = pos + self._s.size
        if end > len(data):
            raise Malformed(f"truncated {self.name}")
        return self._s.unpack_from(data, pos)[0], end


U8 = _Int("B", "u8")
U16 = _Int("H", "u16")
U32 = _Int("I", "u32")
U64 = _Int("Q", "u64")
_U16 = struct.Struct("!H")


class _Bytes16(Kind):
    """u16 length, then that many bytes; at most ``max_len`` (65535 by default)."""

    name = "bytes16"

    def __init__(self, max_len: int = 0xFFFF) -> None:
        if not 0 <= max_len <= 0xFFFF:
            raise ValueError("max_len must be 0..65535")
        self.max_len = max_len

    def encode(self, value: Any, out: list[bytes]) -> None:
        if len(value) > self.max_len:
            raise ValueError(f"{self.name} value longer than {self.max_len} bytes")
        out.append(_U16.pack(len(value)))
        out.append(bytes(value))

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        if pos + 2 > len(data):
            raise Malformed("truncated length")
        (n,) = _U16.unpack_from(data, pos)
        if n > self.max_len:
            # Refused on the length alone, before any of the value is read.
            raise Malformed(f"{self.name} of {n} bytes exceeds {self.max_len}")
        end = pos + 2 + n
        if end > len(data):
            raise Malformed("truncated bytes")
        return data[pos + 2 : end], end


class _Str(_Bytes16):
    """u16 length, then UTF-8 text without NUL or other C0 control characters."""

    name = "str"

    def encode(self, value: Any, out: list[bytes]) -> None:
        if any(ord(c) < 0x20 or c == "\x7f" for c in value):
            raise ValueError("string contains control characters")
        super().encode(value.encode("utf-8"), out)

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        raw, end = super().decode(data, pos)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("string is not valid UTF-8") from None
        if any(ord(c) < 0x20 or c == "\x7f" for c in text):
            raise Malformed("string contains control characters")
        return text, end


BYTES16 = _Bytes16()
STR = _Str()
#: A bytes16 kind with a smaller maximum length: ``Bytes16(16384)``.
Bytes16 = _Bytes16


class Checked(_Str):
    """A str whose text must also pass ``check`` (an identifier, a stamp).

    It is written exactly as a str; ``name`` is the kind's name in the spec
    tables and ``what`` completes the error message "... is not {what}".
    """

    def __init__(self, name: str, check: Callable[[str], bool], what: str) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self._check = check
        self._what = what

    def encode(self, value: Any, out: list[bytes]) -> None:
        if not isinstance(value, str) or not self._check(value):
            raise ValueError(f"{value!r} is not {self._what}")
        super().encode(value, out)

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        text, end = super().decode(data, pos)
        if not self._check(text):
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise Malformed(f"{shown!r} is not {self._what}")
        return text, end


class Choice(Kind):
    """An integer kind restricted to a set of defined values (an enumeration, a flag)."""

    def __init__(self, base: _Int, values: Iterable[int]) -> None:
        self.base = base
        self.values = frozenset(values)
        self.name = base.name  # type: ignore[misc]

    def encode(self, value: Any, out: list[bytes]) -> None:
        if value not in self.values:
            raise ValueError(f"{value!r} is not a defined {self.name} value here")
        self.base.encode(value, out)

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        value, end = self.base.decode(data, pos)
        if value not in self.values:
            raise Malformed(f"undefined value {value}")
        return value, end


class Fixed(Kind):
    """Exactly ``size`` bytes, with no length prefix (a digest)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.name = f"{size} bytes"  # type: ignore[misc]

    def encode(self, value: Any, out: list[bytes]) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) != self.size:
            raise ValueError(f"expected exactly {self.size} bytes")
        out.append(bytes(value))

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        end = pos + self.size
        if end > len(data):
            raise Malformed(f"truncated {self.name}")
        return data[pos:end], end


class ListOf(Kind):
    """u16 count, then each element (a record class with wire fields)."""

    name = "list"

    def __init__(self, record: type, max_items: int = 0xFFFF) -> None:
        self.record = record
        self.max_items = max_items

    def encode(self, value: Any, out: list[bytes]) -> None:
        if len(value) > self.max_items:
            raise ValueError(f"list longer than {self.max_items}")
        out.append(_U16.pack(len(value)))
        for item in value:
            if not isinstance(item, self.record):
                raise TypeError(f"expected {self.record.__name__}, not {type(item).__name__}")
            _encode_fields(item, out)

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        if pos + 2 > len(data):
            raise Malformed("truncated list count")
        (n,) = _U16.unpack_from(data, pos)
        if n > self.max_items:
            raise Malformed(f"list of {n} items exceeds {self.max_items}")
        pos += 2
        items = []
        for _ in range(n):
            item, pos = _decode_fields(self.record, data, pos)
            items.append(item)
        return tuple(items), pos


class Embedded(Kind):
    """A record's fields written in place, with no length or count."""

    name = "record"

    def __init__(self, record: type) -> None:
        self.record = record

    def encode(self, value: Any, out: list[bytes]) -> None:
        _encode_fields(value, out)

    def decode(self, data: bytes, pos: int) -> tuple[Any, int]:
        return _decode_fields(self.record, data, pos)


def wire(kind: Kind, **kwargs: Any) -> Any:
    """An attrs field that is written on the wire as ``kind``."""
    return attrs.field(metadata={"wire": kind}, **kwargs)


def _encode_fields(obj: Any, out: list[bytes]) -> None:
    for f in attrs.fields(type(obj)):
        f.metadata["wire"].encode(getattr(obj, f.name), out)


def _decode_fields(cls: type, data: bytes, pos: int) -> tuple[Any, int]:
    values = []
    for f in attrs.fields(cls):
        value, pos = f.metadata["wire"].decode(data, pos)
        values.append(value)
    return cls(*values), pos


# --------------------------------------------------------------------------
# Records used inside messages


@attrs.frozen
class ServerInfo:
    """One server of the cluster as clients should reach it (its external address)."""

    server_id: str = wire(STR)
    host: str = wire(STR)
    encoder_port: int = wire(U16)
    viewer_port: int = wire(U16)
    relay_port: int = wire(U16)


class EncoderState:
    OFFLINE = 0
    ONLINE = 1
    STREAMING = 2


@attrs.frozen
class EncoderInfo:
    encoder_id: str = wire(STR)
    name: str = wire(STR)
    state: int = wire(U8)
    server_id: str = wire(STR)  # the hosting server, "" when offline


# --------------------------------------------------------------------------
# Messages

M = TypeVar("M")
MESSAGES: dict[int, type] = {}
_DIRECTIONS: dict[tuple[ProtocolName, bool], set[int]] = {}


def message(
    msg_type: int, *, protocols: tuple[ProtocolName, ...], from_server: bool | None
) -> Callable[[type[M]], type[M]]:
    """Register an attrs message class under ``msg_type``.

    ``from_server`` says who may send it: True (server to client), False
    (client to server) or None (either).
    """

    def register(cls: type[M]) -> type[M]:
        if msg_type in MESSAGES:
            raise RuntimeError(f"message type {msg_type:#x} registered twice")
        cls.TYPE = msg_type  # type: ignore[attr-defined]
        MESSAGES[msg_type] = cls
        for proto in protocols:
            for sender_is_server in (True, False):
                if from_server is None or from_server == sender_is_server:
                    _DIRECTIONS.setdefault((proto, sender_is_server), set()).add(msg_type)
        return cls

    return register


ALL = (ProtocolName.ENCODER, ProtocolName.VIEWER, ProtocolName.RELAY)
#: Error, Ping and Pong: every protocol, the peer protocol included.
COMMON = (*ALL, ProtocolName.PEER)
ENC = (ProtocolName.ENCODER,)
VIEW = (ProtocolName.VIEWER,)
RELAY = (ProtocolName.RELAY,)


@message(0x01, protocols=COMMON, from_server=None)
@attrs.frozen
class Error:
    """A refused request (fatal=0) or a protocol violation (fatal=1, then close)."""

    code: int = wire(U16)
    request_id: int = wire(U32)
    fatal: int = wire(U8)
    message: str = wire(STR)


@message(0x02, protocols=COMMON, from_server=None)
@attrs.frozen
class Ping:
    nonce: int = wire(U64)


@message(0x03, protocols=COMMON, from_server=None)
@attrs.frozen
class Pong:
    nonce: int = wire(U64)


# Encoder control ----------------------------------------------------------


@message(0x10, protocols=ENC, from_server=False)
@attrs.frozen
class EncoderAuth:
    encoder_id: str = wire(STR)
    secret: str = wire(STR)
    software: str = wire(STR)
    #: The server whose EncoderRedirect sent the encoder here ("" if none):
    #: such an encoder is not redirected again.
    placed_by: str = wire(STR, default="")


@message(0x11, protocols=ENC, from_server=True)
@attrs.frozen
class EncoderAuthOk:
    ticket: bytes = wire(BYTES16)
    keepalive_ms: int = wire(U32)
    server_id: str = wire(STR)
    servers: tuple[ServerInfo, ...] = wire(ListOf(ServerInfo, 64), converter=tuple)


@message(0x12, protocols=ENC + VIEW, from_server=True)
@attrs.frozen
class ServerList:
    servers: tuple[ServerInfo, ...] = wire(ListOf(ServerInfo, 64), converter=tuple)


@message(0x13, protocols=ENC, from_server=True)
@attrs.frozen
class StartStream:
    pass


@message(0x14, protocols=ENC, from_server=True)
@attrs.frozen
class StopStream:
    pass


@message(0x15, protocols=ENC, from_server=True)
@attrs.frozen
class KeyframeRequest:
    pass


class RedirectReason:
    """Why a server sends an encoder elsewhere (``EncoderRedirect.reason``)."""

    PLACEMENT = 1  # on connect: another server should host it (lighter, or its pool)
    BALANCE = 2  # an idle encoder moved to even out the load
    POOL = 3  # an idle encoder moved back into its server pool



REDIRECT_REASONS = {RedirectReason.PLACEMENT: "placement", RedirectReason.BALANCE: "balance",
                    RedirectReason.POOL: "pool"}


@message(0x16, protocols=ENC, from_server=True)
@attrs.frozen
class EncoderRedirect:
    """Connect to ``server`` instead (naming this server in ``EncoderAuth.placed_by``)."""

    server: ServerInfo = wire(Embedded(ServerInfo))  # noqa: RUF009 (an attrs field)
    reason: int = wire(Choice(U8, (RedirectReason.PLACEMENT, RedirectReason.BALANCE,
                                   RedirectReason.POOL)))


# Viewer control -----------------------------------------------------------


@message(0x20, protocols=VIEW, from_server=False)
@attrs.frozen
class Login:
    account: str = wire(STR)
    password: str = wire(STR)
    software: str = wire(STR)


@message(0x21, protocols=VIEW, from_server=True)
@attrs.frozen
class LoginOk:
    ticket: bytes = wire(BYTES16)
    keepalive_ms: int = wire(U32)
    server_id: str = wire(STR)
    domain: str = wire(STR)
    servers: tuple[ServerInfo, ...] = wire(ListOf(ServerInfo, 64), converter=tuple)


@message(0x22, protocols=VIEW, from_server=False)
@attrs.frozen
class ListEncoders:
    request_id: int = wire(U32)


@message(0x23, protocols=VIEW, from_server=True)
@attrs.frozen
class EncoderList:
    request_id: int = wire(U32)
    encoders: tuple[EncoderInfo, ...] = wire(ListOf(EncoderInfo), converter=tuple)


@message(0x24, protocols=VIEW, from_server=True)
@attrs.frozen
class EncoderUpdate:
    encoder: EncoderInfo = wire(Embedded(EncoderInfo))  # noqa: RUF009 (an attrs field)


@message(0x25, protocols=VIEW, from_server=False)
@attrs.frozen
class Watch:
    request_id: int = wire(U32)
    encoder_id: str = wire(STR)


@message(0x26, protocols=VIEW, from_server=True)
@attrs.frozen
class WatchOk:
    request_id: int = wire(U32)
    encoder_id: str = wire(STR)
    stream_id: int = wire(U32)


@message(0x27, protocols=VIEW, from_server=False)
@attrs.frozen
class Unwatch:
    request_id: int = wire(U32)
    stream_id: int = wire(U32)


@message(0x28, protocols=VIEW, from_server=True)
@attrs.frozen
class UnwatchOk:
    request_id: int = wire(U32)
    stream_id: int = wire(U32)


@message(0x29, protocols=VIEW, from_server=True)
@attrs.frozen
class Redirect:
    """The encoder of a Watch is hosted by another server of the cluster: watch it there."""

    request_id: int = wire(U32)
    encoder_id: str = wire(STR)
    server: ServerInfo = wire(Embedded(ServerInfo))  # noqa: RUF009 (an attrs field)


# Video relay --------------------------------------------------------------


@message(0x30, protocols=RELAY, from_server=False)
@attrs.frozen
class RelayHello:
    ticket: bytes = wire(BYTES16)


@message(0x31, protocols=RELAY, from_server=True)
@attrs.frozen
class RelayOk:
    pass


# Media --------------------------------------------------------------------

MEDIA = 0x40
#: length, type, stream_id, codec, flags, timestamp_us, capture_time_us
MEDIA_HEADER = struct.Struct("!IBIBBQQ")
MEDIA_FIELDS = struct.Struct("!IBBQQ")
MEDIA_HEADER_SIZE = MEDIA_HEADER.size  # 27
MEDIA_OVERHEAD = MEDIA_FIELDS.size  # 22 bytes of body before the payload
FLAG_KEYFRAME = 0x01
_DIRECTIONS.setdefault((ProtocolName.RELAY, True), set()).add(MEDIA)
_DIRECTIONS.setdefault((ProtocolName.RELAY, False), set()).add(MEDIA)


@attrs.frozen
class Media:
    """One access unit of a stream (type 0x40).

    On the uplink (encoder to server) ``stream_id`` is 0; the server writes
    the stream's id into the frame it fans out.
    """

    stream_id: int
    codec: int
    flags: int
    timestamp_us: int
    capture_time_us: int
    payload: bytes

    TYPE: ClassVar[int] = MEDIA

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & FLAG_KEYFRAME)


def encode_media_header(
    stream_id: int, codec: int, flags: int, timestamp_us: int, capture_time_us: int,
    payload_len: int,
) -> bytes:
    """The 27 bytes that precede a payload of ``payload_len`` bytes."""
    if flags & ~FLAG_KEYFRAME:
        raise ValueError(f"undefined media flags {flags:#x}")
    try:
        return MEDIA_HEADER.pack(
            1 + MEDIA_OVERHEAD + payload_len, MEDIA, stream_id, codec, flags,
            timestamp_us, capture_time_us,
        )
    except struct.error as e:
        raise ValueError(f"media field out of range: {e}") from None


def decode_media(body: bytes) -> Media:
    if len(body) < MEDIA_OVERHEAD:
        raise Malformed("truncated media header")
    stream_id, codec, flags, ts, capture = MEDIA_FIELDS.unpack_from(body, 0)
    if flags & ~FLAG_KEYFRAME:
        raise Malformed(f"unknown media flags {flags:#x}")
    return Media(stream_id, codec, flags, ts, capture, body[MEDIA_OVERHEAD:])


# --------------------------------------------------------------------------
# The generic codec


def encode(msg: Any) -> bytes:
    """The complete frame (length, type, body) for a message."""
    if isinstance(msg, Media):
        return encode_media_header(
            msg.stream_id, msg.codec, msg.flags, msg.timestamp_us, msg.capture_time_us,
            len(msg.payload),
        ) + msg.payload
    out: list[bytes] = []
    _encode_fields(msg, out)
    body = b"".join(out)
    return FRAME_HEADER.pack(len(body) + 1, msg.TYPE) + body


def decode(msg_type: int, body: bytes) -> Any:
    """Decode a frame's body; raise Malformed for unknown types, truncation or trailing bytes."""
    if msg_type == MEDIA:
        return decode_media(body)
    cls = MESSAGES.get(msg_type)
    if cls is None:
        raise Malformed(f"unknown message type {msg_type:#04x}")
    msg, end = _decode_fields(cls, body, 0)
    if end != len(body):
        raise Malformed(f"{len(body) - end} trailing bytes after {cls.__name__}")
    return msg


def allowed(protocol: ProtocolName, from_server: bool) -> frozenset[int]:
    """The message types that may be sent on ``protocol`` in one direction."""
    return frozenset(_DIRECTIONS.get((protocol, from_server), ()))


def decode_for(protocol: ProtocolName, from_server: bool, msg_type: int, body: bytes) -> Any:
    """Decode a frame received on ``protocol``; refuse types not allowed in that direction."""
    if msg_type not in _DIRECTIONS.get((protocol, from_server), ()):
        if msg_type == MEDIA or msg_type in MESSAGES:
            raise ProtocolViolation(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"message type {msg_type:#04x} is not allowed here",
            )
        raise Malformed(f"unknown message type {msg_type:#04x}")
    return decode(msg_type, body)


# The peer protocol's messages (protocol-spec/peer.rst) are declared in their
# own module with this codec.  Importing it here registers them whatever
# module is imported first, so the registry and the answers of ``decode_for``
# never depend on import order.
from evserver.wire import peer as _peer  # noqa: E402, F401
