"""Message codecs (evserver.wire.messages) against protocol-spec/: round trips,
truncation, direction checks and hostile bodies."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evserver.wire import messages as m
from evserver.wire.framing import (
    ErrorCode,
    FrameDecoder,
    ProtocolName,
    ProtocolViolation,
    encode_frame,
)

ENC, VIEW, RELAY = ProtocolName.ENCODER, ProtocolName.VIEWER, ProtocolName.RELAY
CLIENT_PROTOCOLS = (ENC, VIEW, RELAY)
#: The message types of the client protocols; the peer protocol's are tested
#: in test_wire_peer.py.
CLIENT_TYPES = {t for p in CLIENT_PROTOCOLS for s in (True, False) for t in m.allowed(p, s)}
ALL_CLASSES: list[type] = [
    *(m.MESSAGES[t] for t in sorted(m.MESSAGES) if t in CLIENT_TYPES), m.Media
]

# --------------------------------------------------------------------------
# Strategies, built from the wire kinds of each class's fields

#: Characters a str field may carry: any Unicode scalar value except C0
#: controls and DEL (surrogates cannot be encoded in UTF-8).
TEXT_CHARS = st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters="\x7f")


def kind_strategy(kind: m.Kind) -> st.SearchStrategy[Any]:
    if isinstance(kind, m.ListOf):
        return st.lists(record_strategy(kind.record), max_size=min(3, kind.max_items)).map(tuple)
    if isinstance(kind, m.Embedded):
        return record_strategy(kind.record)
    if kind is m.STR:
        return st.text(TEXT_CHARS, max_size=12)
    if kind is m.BYTES16:
        return st.binary(max_size=40)
    if isinstance(kind, m.Choice):
        return st.sampled_from(sorted(kind.values))
    assert isinstance(kind, m._Int), kind
    return st.integers(min_value=0, max_value=kind.max)


def record_strategy(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{f.name: kind_strategy(f.metadata["wire"]) for f in attrs.fields(cls)})


U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
MEDIA_STRATEGY = st.builds(
    m.Media,
    stream_id=U32,
    codec=st.sampled_from([1, 255]) | st.integers(0, 255),
    flags=st.sampled_from([0, m.FLAG_KEYFRAME]),
    timestamp_us=U64,
    capture_time_us=U64,
    payload=st.binary(max_size=64),
)


def message_strategy(cls: type) -> st.SearchStrategy[Any]:
    return MEDIA_STRATEGY if cls is m.Media else record_strategy(cls)


ANY_MESSAGE = st.one_of([message_strategy(cls) for cls in ALL_CLASSES])


def split(frame: bytes) -> tuple[int, bytes]:
    (length,) = struct.unpack_from("!I", frame)
    assert length == len(frame) - 4
    return frame[4], frame[5:]


def directions_of(msg_type: int) -> list[tuple[ProtocolName, bool]]:
    return [(p, s) for p in CLIENT_PROTOCOLS for s in (True, False) if msg_type in m.allowed(p, s)]


# --------------------------------------------------------------------------
# Round trips


def per_class(
    classes: list[type], max_examples: int
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register one Hypothesis test per class, named ``test_<check>_<Class>``.

    ``@given`` under ``@pytest.mark.parametrize`` is wrapped twice by
    pytest-twisted and fails, so each class gets a test function of its own.
    """

    def register(check: Callable[[Any], None]) -> Callable[[Any], None]:
        for cls in classes:
            test = settings(max_examples=max_examples, deadline=None)(
                given(msg=message_strategy(cls))(_calling(check))
            )
            name = f"test_{check.__name__.lstrip('_')}_{cls.__name__}"
            test.__name__ = test.__qualname__ = name
            globals()[name] = test
        return check

    return register


def _calling(check: Callable[[Any], None]) -> Callable[[Any], None]:
    def test(msg: Any) -> None:
        check(msg)

    return test


@per_class(ALL_CLASSES, max_examples=60)
def _round_trip(msg: Any) -> None:
    frame = m.encode(msg)
    msg_type, body = split(frame)
    assert msg_type == type(msg).TYPE
    assert m.decode(msg_type, body) == msg
    places = directions_of(msg_type)
    assert places, "a message that may be sent nowhere"
    for protocol, from_server in places:
        assert m.decode_for(protocol, from_server, msg_type, body) == msg
    decoder = FrameDecoder(len(frame), expect_preamble=False)
    assert list(decoder.feed(frame)) == [(msg_type, body)]


@settings(max_examples=100, deadline=None)
@given(msg=MEDIA_STRATEGY)
def test_media_fast_path_matches_the_generic_frame(msg: m.Media) -> None:
    header = m.encode_media_header(
        msg.stream_id,
        msg.codec,
        msg.flags,
        msg.timestamp_us,
        msg.capture_time_us,
        len(msg.payload),
    )
    assert len(header) == m.MEDIA_HEADER_SIZE == 27
    assert header + msg.payload == m.encode(msg)
    assert m.encode(msg) == encode_frame(
        m.MEDIA,
        struct.pack(
            "!IBBQQ", msg.stream_id, msg.codec, msg.flags, msg.timestamp_us, msg.capture_time_us
        )
        + msg.payload,
    )
    assert m.decode_media(m.encode(msg)[5:]) == msg
    assert msg.keyframe == (msg.flags == m.FLAG_KEYFRAME)


# --------------------------------------------------------------------------
# Truncation and trailing bytes


@per_class(ALL_CLASSES, max_examples=40)
def _every_truncation_is_malformed(msg: Any) -> None:
    msg_type, body = split(m.encode(msg))
    # A Media payload is "the rest of the frame": only its header can be cut.
    cut_range = range(m.MEDIA_OVERHEAD) if type(msg) is m.Media else range(len(body))
    for cut in cut_range:
        with pytest.raises(m.Malformed) as info:
            m.decode(msg_type, body[:cut])
        assert info.value.code is ErrorCode.MALFORMED and info.value.fatal


@per_class([c for c in ALL_CLASSES if c is not m.Media], max_examples=30)
def _trailing_bytes_are_malformed(msg: Any) -> None:
    msg_type, body = split(m.encode(msg))
    for extra in (b"\x00", b"\xff" * 7):
        with pytest.raises(m.Malformed):
            m.decode(msg_type, body + extra)


# --------------------------------------------------------------------------
# Directions: which types each side may send on each protocol (framing.rst)

_COMMON = {"Error", "Ping", "Pong"}
EXPECTED_DIRECTIONS: dict[tuple[ProtocolName, bool], set[str]] = {
    (ENC, False): _COMMON | {"EncoderAuth"},
    (ENC, True): _COMMON
    | {
        "EncoderAuthOk",
        "ServerList",
        "StartStream",
        "StopStream",
        "KeyframeRequest",
        "EncoderRedirect",
    },
    (VIEW, False): _COMMON | {"Login", "ListEncoders", "Watch", "Unwatch"},
    (VIEW, True): _COMMON
    | {
        "LoginOk",
        "ServerList",
        "EncoderList",
        "EncoderUpdate",
        "WatchOk",
        "UnwatchOk",
        "Redirect",
    },
    (RELAY, False): _COMMON | {"RelayHello", "Media"},
    (RELAY, True): _COMMON | {"RelayOk", "Media"},
}
_TYPE_OF = {cls.__name__: cls.TYPE for cls in ALL_CLASSES}  # type: ignore[attr-defined]


@pytest.mark.parametrize("where", list(EXPECTED_DIRECTIONS), ids=lambda w: f"{w[0].name}-{w[1]}")
def test_allowed_types(where: tuple[ProtocolName, bool]) -> None:
    assert m.allowed(*where) == {_TYPE_OF[name] for name in EXPECTED_DIRECTIONS[where]}


@pytest.mark.parametrize("where", list(EXPECTED_DIRECTIONS), ids=lambda w: f"{w[0].name}-{w[1]}")
def test_decode_for_refuses_types_not_allowed(where: tuple[ProtocolName, bool]) -> None:
    protocol, from_server = where
    samples = {cls.TYPE: m.encode(_sample(cls))[5:] for cls in ALL_CLASSES}  # type: ignore[attr-defined]
    for msg_type in range(256):
        body = samples.get(msg_type, b"")
        if msg_type in m.allowed(protocol, from_server):
            assert msg_type == type(m.decode_for(protocol, from_server, msg_type, body)).TYPE
            continue
        with pytest.raises(ProtocolViolation) as info:
            m.decode_for(protocol, from_server, msg_type, body)
        known = msg_type in m.MESSAGES or msg_type == m.MEDIA
        assert info.value.code is (
            ErrorCode.UNEXPECTED_MESSAGE if known else ErrorCode.MALFORMED
        ), hex(msg_type)


def _sample(cls: type) -> Any:
    """A small valid instance of ``cls``."""
    if cls is m.Media:
        return m.Media(0, 255, 1, 0, 0, b"x")
    return _minimal(cls)


def _minimal(cls: type) -> Any:
    values: list[Any] = []
    for f in attrs.fields(cls):
        kind = f.metadata["wire"]
        if isinstance(kind, m.ListOf):
            values.append(())
        elif isinstance(kind, m.Embedded):
            values.append(_minimal(kind.record))
        elif kind is m.STR:
            values.append("x")
        elif kind is m.BYTES16:
            values.append(b"\x01")
        else:
            values.append(1)
    return cls(*values)


def test_media_is_not_allowed_on_control_protocols() -> None:
    body = m.encode(m.Media(1, 1, 1, 0, 0, b""))[5:]
    for protocol in (ENC, VIEW):
        for from_server in (True, False):
            with pytest.raises(ProtocolViolation) as info:
                m.decode_for(protocol, from_server, m.MEDIA, body)
            assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


# --------------------------------------------------------------------------
# Hostile bodies


@settings(max_examples=500, deadline=None)
@given(
    msg_type=st.integers(0, 255) | st.sampled_from(sorted(_TYPE_OF.values())),
    body=st.binary(max_size=120),
    protocol=st.sampled_from(list(ProtocolName)),
    from_server=st.booleans(),
)
def test_random_bodies_raise_only_protocol_violations(
    msg_type: int, body: bytes, protocol: ProtocolName, from_server: bool
) -> None:
    try:
        msg = m.decode(msg_type, body)
    except ProtocolViolation as e:
        assert isinstance(e, m.Malformed)
    else:
        assert m.encode(msg) == encode_frame(msg_type, body)
    try:
        m.decode_for(protocol, from_server, msg_type, body)
    except ProtocolViolation as e:
        assert e.code in (ErrorCode.MALFORMED, ErrorCode.UNEXPECTED_MESSAGE)


@settings(max_examples=400, deadline=None)
@given(
    msg=ANY_MESSAGE,
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete"]), st.integers(0, 500), st.integers(0, 255)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_valid_bodies_raise_only_malformed(
    msg: Any, edits: list[tuple[str, int, int]]
) -> None:
    """Valid bodies with a few bytes changed reach deep into the decoders."""
    msg_type, body = split(m.encode(msg))
    mutated = bytearray(body)
    for op, pos, value in edits:
        if op == "insert":
            mutated.insert(pos % (len(mutated) + 1), value)
        elif mutated:
            i = pos % len(mutated)
            if op == "set":
                mutated[i] = value
            else:
                del mutated[i]
    try:
        decoded = m.decode(msg_type, bytes(mutated))
    except m.Malformed:
        return
    assert m.encode(decoded) == encode_frame(msg_type, bytes(mutated))


# --------------------------------------------------------------------------
# Field kinds: strings, integers, bytes, lists


@pytest.mark.parametrize("char", [chr(c) for c in range(0x20)] + ["\x7f"], ids=repr)
def test_control_characters_are_malformed(char: str) -> None:
    body = struct.pack("!H", 3) + f"a{char}b".encode() + b"\x00\x00" * 2
    with pytest.raises(m.Malformed):
        m.decode(m.Login.TYPE, body)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "text", ["", " ", "~", "\x80", "\x9f", "\u00a0", "\u2028", "\ufeff", "\ufffe", "😀", "a" * 300]
)
def test_other_characters_round_trip(text: str) -> None:
    msg = m.Login(text, text, text)
    assert m.decode(msg.TYPE, m.encode(msg)[5:]) == msg  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
)
def test_invalid_utf8_is_malformed(raw: bytes) -> None:
    body = struct.pack("!H", len(raw)) + raw + b"\x00\x00" * 2
    with pytest.raises(m.Malformed):
        m.decode(m.Login.TYPE, body)  # type: ignore[attr-defined]


def test_string_length_limit_counts_utf8_bytes() -> None:
    longest = m.Watch(1, "a" * 0xFFFF)
    assert m.decode(longest.TYPE, m.encode(longest)[5:]) == longest  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        m.encode(m.Watch(1, "a" * 0x10000))
    with pytest.raises(ValueError):
        m.encode(m.Watch(1, "é" * 0x8000))  # 32768 characters, 65536 bytes


def test_bytes16_length_limit() -> None:
    longest = m.RelayHello(bytes(0xFFFF))
    assert m.decode(longest.TYPE, m.encode(longest)[5:]) == longest  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        m.encode(m.RelayHello(bytes(0x10000)))


@pytest.mark.parametrize(
    "msg",
    [
        m.Ping(-1),
        m.Ping(2**64),
        m.ListEncoders(2**32),
        m.Error(0x10000, 0, 1, ""),
        m.Error(1, 0, 256, ""),
        m.EncoderUpdate(m.EncoderInfo("e", "n", 256, "")),
        m.ServerList((m.ServerInfo("s", "h", 70000, 1, 1),)),
    ],
)
def test_out_of_range_integers_are_refused_on_encode(msg: Any) -> None:
    with pytest.raises(ValueError):
        m.encode(msg)


def _servers(n: int) -> tuple[m.ServerInfo, ...]:
    return tuple(m.ServerInfo(f"ev{i}", f"10.0.0.{i}", 5510, 5520, 5530) for i in range(n))


def test_server_list_limit() -> None:
    ok = m.ServerList(_servers(64))
    assert m.decode(ok.TYPE, m.encode(ok)[5:]) == ok  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        m.encode(m.ServerList(_servers(65)))
    with pytest.raises(ValueError):
        m.encode(m.LoginOk(b"", 1000, "ev0", "d", _servers(65)))
    # A count over the limit is refused even when all the records follow.
    body = (
        struct.pack("!H", 65)
        + m.encode(m.ServerList(_servers(65)[:64]))[7:]
        + m.encode(m.ServerList(_servers(1)))[7:]
    )
    with pytest.raises(m.Malformed):
        m.decode(m.ServerList.TYPE, body)  # type: ignore[attr-defined]


def test_large_encoder_list_round_trips() -> None:
    encoders = tuple(m.EncoderInfo(f"cam-{i}", f"Kamera {i}", i % 3, "ev1") for i in range(2000))
    msg = m.EncoderList(9, encoders)
    assert m.decode(msg.TYPE, m.encode(msg)[5:]) == msg  # type: ignore[attr-defined]


def test_lists_accept_any_sequence_and_hold_tuples() -> None:
    msg = m.ServerList([m.ServerInfo("a", "b", 1, 2, 3)])  # type: ignore[arg-type]
    assert isinstance(msg.servers, tuple)
    assert m.decode(msg.TYPE, m.encode(msg)[5:]) == msg  # type: ignore[attr-defined]


def test_error_fatal_value_is_kept_for_the_receiver_to_judge() -> None:
    """errors.rst: a receiver treats any fatal value other than 0 as 1."""
    body = struct.pack("!HIB", ErrorCode.INTERNAL, 0, 7) + struct.pack("!H", 0)
    error = m.decode(m.Error.TYPE, body)  # type: ignore[attr-defined]
    assert error.fatal == 7 and bool(error.fatal)
    assert m.decode(m.Error.TYPE, struct.pack("!HIBH", 999, 5, 0, 0)).code == 999  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Media


@pytest.mark.parametrize("flags", range(256))
def test_only_the_keyframe_flag_is_defined(flags: int) -> None:
    body = struct.pack("!IBBQQ", 0, 1, flags, 0, 0) + b"payload"
    if flags in (0, m.FLAG_KEYFRAME):
        media = m.decode_media(body)
        assert media.keyframe == bool(flags) and media.payload == b"payload"
    else:
        with pytest.raises(m.Malformed):
            m.decode_media(body)


def test_media_with_empty_payload_and_reserved_codec() -> None:
    msg = m.Media(7, 42, 0, 1, 2, b"")
    frame = m.encode(msg)
    assert len(frame) == m.MEDIA_HEADER_SIZE and m.MEDIA_OVERHEAD == 22
    assert m.decode(m.MEDIA, frame[5:]) == msg


# --------------------------------------------------------------------------
# The encoder refuses what every peer's decoder would refuse.


@pytest.mark.parametrize("text", ["a\nb", "\x00", "tab\there", "del\x7f"])
def test_encode_refuses_control_characters(text: str) -> None:
    with pytest.raises(ValueError):
        m.encode(m.EncoderUpdate(m.EncoderInfo("cam-01", text, 1, "ev1")))


def test_encode_refuses_undefined_media_flags() -> None:
    with pytest.raises(ValueError):
        m.encode(m.Media(0, 1, 0x02, 0, 0, b""))


@pytest.mark.parametrize("field", ["stream_id", "codec", "timestamp_us", "capture_time_us"])
def test_encode_media_out_of_range_raises_value_error(field: str) -> None:
    values = {"stream_id": 0, "codec": 1, "flags": 0, "timestamp_us": 0, "capture_time_us": 0}
    values[field] = -1
    with pytest.raises(ValueError):
        m.encode(m.Media(payload=b"", **values))


def test_encode_refuses_records_of_the_wrong_type() -> None:
    with pytest.raises((TypeError, ValueError)):
        m.encode(m.EncoderList(1, (m.ServerInfo("ev1", "h", 1, 2, 3),)))  # type: ignore[arg-type]
